"""What a job is asked to do: :class:`JobConfig` (one field per CLI flag, and every flag's
default), :func:`config_from_args` (the parsed flags -> a ``JobConfig``) and the checks of the
user's input that need no model (layer values, grid, output directory, flag combinations).

Every check raises :class:`~interventions.errors.UserError` (one ``error:`` line from ``run.py``)
before anything is written.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..executors.remote.ndif_server import SERVER_PATHS
from ..mechanisms.plan import AF1Plan
from .experiments import DEFAULT_THRESHOLD, THRESHOLD_RULES

# How cells are evaluated locally (``--executor``): fast (the default; exact to the reference
# within float rounding) and the nnsight reference path, which stays the ground truth in tests.
EXECUTOR_NAMES = ("fast", "nnsight")
# How a prompt's answer is scored (``--answer``): its first token, or every token (teacher forcing).
ANSWER_SCORING = ("first", "full")
# Where --remote sends its requests (``--remote-backend``): NDIF, or NDIF's code run here.
REMOTE_BACKENDS = ("remote", "local")


@dataclass
class JobConfig:
    """Everything a job needs; the CLI's flags map one to one onto these fields
    (:func:`config_from_args`), and take their defaults from here."""

    model: str = "smollm2"
    experiments: str = "sweep"
    tasks: Sequence[str] = ("A+B",)  # operator forms and built-in families (tasks.families)
    dataset: str | None = None  # --dataset: a user's data set (tasks.records), run first
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    split: str = "train"
    style: str = "calculate"
    template: str | None = None
    l_wait: str | None = None  # None: every layer 0..L-1
    l_transfer: str = "1-4"
    threshold: float = DEFAULT_THRESHOLD  # the paper's criterion: keeps 85% of the full model
    threshold_on: str = "point"  # or "lower": the 95% interval's lower end must reach it
    holdout: float | None = None  # share of the right prompts that grade, not choose, the AF1
    # configuration (experiments.holdout_split); None: chosen and graded on the same prompts
    af1_config: str | None = None  # "L_WAIT,L_TRANSFER": skip the search for later experiments
    n_prompts: int | None = 200
    seed: int = 0
    operand_range: tuple[int, int] | None = None
    answer: str = "first"  # "full": teacher-force every answer token (see pipeline.taskrun)
    out: str | None = None
    batch_size: int = 32
    executor: str = "fast"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None  # None: sdpa, or the family's only one (Gemma-2)
    revision: str | None = None
    cama_table: str | None = None
    cache_dir: str | None = None
    remote: bool = False
    remote_backend: str = "remote"  # "local": the remote path run here (offline test)
    server_path: str | None = None  # --remote-backend local: "sandbox" (default) or "trusted"
    cells_per_request: int = 32
    max_request_mb: float = 16.0  # request byte budget (serialized, before compression)
    remote_timeout: str = "24h"  # overall client time-out of a remote job
    remote_silence: str = "65m"  # longest silence on NDIF's websocket before polling
    allow_version_drift: bool = False  # client and NDIF transformers major.minor may differ
    allow_nnsight_mismatch: bool = False  # run although NDIF's nnsight differs from this one
    dry_run: bool = False
    submit: bool = False
    progress: bool = True
    argv: list[str] | None = field(default=None, repr=False)

    @property
    def evaluates(self) -> bool:
        """Whether the job evaluates cells here and ends with complete results (not
        ``--dry-run``, which sends nothing, nor ``--submit``, which collects on a rerun): only
        then are there figures to draw."""
        return not (self.dry_run or self.submit)


# Flags whose value is not one field's value as parsed: converted by config_from_args.
CONVERTED_FLAGS = ("tasks", "operand_range", "no_progress")


def config_from_args(args, argv: list[str] | None = None) -> JobConfig:
    """The :class:`JobConfig` of parsed command-line arguments (an ``argparse.Namespace``):
    each flag's value goes to the field of its name (``--cells-per-request`` ->
    ``cells_per_request``), except :data:`CONVERTED_FLAGS`: ``--tasks`` (a comma list; unset:
    the default task, or none with ``--dataset``), ``--operand-range`` (``LO-HI`` -> a pair)
    and ``--no-progress`` (``progress``). ``argv``: the command line, for the manifest.

    Raises :class:`UserError` for a malformed ``--operand-range``, and ``TypeError`` for a
    parsed flag that has no field (a flag added to the parser only)."""
    given = dict(vars(args))
    names = {f.name for f in fields(JobConfig)}
    unmapped = sorted(set(given) - names - set(CONVERTED_FLAGS))
    if unmapped:
        raise TypeError(f"flags without a JobConfig field: {', '.join(unmapped)}")
    values = {name: value for name, value in given.items() if name in names}
    if given.get("tasks") is not None:
        values["tasks"] = [t.strip() for t in given["tasks"].split(",") if t.strip()]
    else:
        values["tasks"] = [] if given.get("dataset") else list(JobConfig.tasks)
    spec = given.get("operand_range")
    if spec:
        lo, _, hi = spec.partition("-")
        if not (lo.isdigit() and hi.isdigit()):
            raise UserError(f"--operand-range takes LO-HI, got {spec!r}")
        values["operand_range"] = (int(lo), int(hi))
    else:
        values["operand_range"] = None
    values["progress"] = not given.get("no_progress", False)
    return JobConfig(**values, argv=argv)


# -- argument checks -------------------------------------------------------------------------


def parse_layer_values(spec: str, name: str) -> list[int]:
    """``"5"``, ``"0-29"`` (inclusive), ``"1,2,4"`` or mixes like ``"0-3,8"`` -> sorted values."""
    values: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            if re.fullmatch(r"-\d+.*", part):
                raise UserError(f"--{name} values must be >= 0, got {spec!r}")
            raise UserError(f"--{name} takes a value, a range a-b or a list a,b,c; got {spec!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--{name} range {part!r} is empty (end before start)")
        values.update(range(lo, hi + 1))
    return sorted(values)


def grid_plans(l_waits: list[int], l_transfers: list[int], n_layers: int) -> list[AF1Plan]:
    """Every fitting (L_wait, L_transfer) pair; a value that fits with none of the others is an
    error (``L_wait + L_transfer > L``)."""
    fits = [(w, t) for w in l_waits for t in l_transfers if w + t <= n_layers and w < n_layers]
    bad_waits = sorted(set(l_waits) - {w for w, _ in fits})
    bad_transfers = sorted(set(l_transfers) - {t for _, t in fits})
    if bad_waits or bad_transfers:
        what = (f"L_wait {bad_waits}" if bad_waits else f"L_transfer {bad_transfers}")
        raise UserError(f"{what} cannot fit: L_wait + L_transfer must be <= the model's "
                        f"{n_layers} layers (L_wait {min(l_waits)}..{max(l_waits)}, "
                        f"L_transfer {min(l_transfers)}..{max(l_transfers)} requested)")
    return [AF1Plan(w, t) for w, t in fits]


def parse_af1_config(spec: str | None, n_layers: int) -> AF1Plan | None:
    if spec is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    if not match:
        raise UserError(f"--af1-config takes L_WAIT,L_TRANSFER (e.g. 20,4), got {spec!r}")
    return grid_plans([int(match.group(1))], [int(match.group(2))], n_layers)[0]


def default_out(model_spec: str) -> Path:
    """``runs/<model>``: a local path's folder name, or the Hub id with ``/`` as ``--``."""
    path = Path(model_spec).expanduser()
    name = path.resolve().name if path.exists() else model_spec.replace("/", "--")
    return Path("runs") / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model")


def check_out_writable(out: Path) -> None:
    """Fail early, before any work, if ``out`` cannot become a writable directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"--out {str(out)!r} is not writable: {str(probe_dir)!r} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".af1-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise UserError(f"--out {str(out)!r} is not writable ({err.strerror})") from None


def check_config(cfg: JobConfig) -> None:
    """Refuse flag values and combinations that cannot work, before any model is loaded."""
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.n_prompts is not None and cfg.n_prompts < 1:
        raise UserError(f"--n-prompts must be >= 1, got {cfg.n_prompts}")
    if not 0.0 < cfg.threshold <= 1.0:
        raise UserError(f"--threshold must lie in (0, 1], got {cfg.threshold}")
    if cfg.holdout is not None and not 0.0 < cfg.holdout < 1.0:
        raise UserError(f"--holdout takes the share of prompts held out to grade the AF1 "
                        f"configuration, strictly between 0 and 1 (e.g. 0.5), got {cfg.holdout}")
    if cfg.threshold_on not in THRESHOLD_RULES:
        raise UserError(f"--threshold-on must be one of {', '.join(THRESHOLD_RULES)}, got "
                        f"{cfg.threshold_on!r}")
    if cfg.executor not in EXECUTOR_NAMES:
        raise UserError(f"--executor must be one of {', '.join(EXECUTOR_NAMES)}, got "
                        f"{cfg.executor!r}")
    if (cfg.dry_run or cfg.submit) and not cfg.remote:
        raise UserError("--dry-run and --submit go with --remote")
    if not cfg.tasks and not cfg.dataset:
        raise UserError("no task: give --tasks, --dataset, or both")
    if cfg.answer not in ANSWER_SCORING:
        raise UserError(f"--answer must be one of {', '.join(ANSWER_SCORING)}, got "
                        f"{cfg.answer!r}")
    if cfg.remote_backend not in REMOTE_BACKENDS:
        raise UserError(f"--remote-backend must be remote or local, got {cfg.remote_backend!r}")
    if cfg.server_path is not None:
        if cfg.server_path not in SERVER_PATHS:
            raise UserError(f"--server-path must be one of {', '.join(SERVER_PATHS)}, got "
                            f"{cfg.server_path!r}")
        if not (cfg.remote and cfg.remote_backend == "local"):
            raise UserError("--server-path goes with --remote --remote-backend local (on NDIF "
                            "the API key decides: a key with the trusted tag runs in-process, "
                            "any other in the sandbox)")
    if cfg.cells_per_request < 1:  # the remote executor refuses it too, later
        raise UserError(f"cells per request (--cells-per-request) must be >= 1, got "
                        f"{cfg.cells_per_request}")
    if not cfg.max_request_mb > 0:
        raise UserError(f"--max-request-mb must be > 0, got {cfg.max_request_mb}")
    parse_duration(cfg.remote_timeout, "remote-timeout")
    parse_duration(cfg.remote_silence, "remote-silence")


def parse_duration(spec: str, name: str) -> float:
    """``"90"`` or ``"90s"``, ``"15m"``, ``"24h"`` -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(spec))
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--{name} takes a positive duration such as 90s, 15m or 24h, got "
                        f"{spec!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
