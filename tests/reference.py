"""An independent AF1 implementation for tests: plain PyTorch hooks, explicit loops.

Nothing here imports the toolkit's mask, CAMA or trace code. Masks are built element by element
from the spec's wording, CAMA means by brute force over unbatched forward passes, and they are
injected with ``register_forward_pre_hook`` on the Hugging Face modules directly.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

# Where each architecture's decoder layers are, and the positional index of the attention mask
# in a GPT-2 block call (transformers 5.x: forward(hidden_states, past_key_values,
# attention_mask, ...)). Written out here on purpose, independent of
# interventions.mechanisms.adapters.
LAYERS = {"gpt_neox": "gpt_neox.layers", "gptj": "transformer.h", "gpt2": "transformer.h",
          "gemma3": "model.language_model.layers",
          **{arch: "model.layers" for arch in (
              "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "ministral", "mixtral", "phi3",
              "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "cohere",
              "starcoder2", "smollm3")}}
POSITIONAL_MASK_INDEX = {"gpt2": 2}


def decoder_layers(hf):
    obj = hf
    for part in LAYERS[hf.config.model_type].split("."):
        obj = getattr(obj, part)
    return obj


def model_windows(hf):
    """Per decoder layer, the sliding window the model's own mask enforces (``None``: every
    earlier token), read off the masks the model hands its layers in a clean forward on one
    unpadded prompt longer than ``config.sliding_window`` (which only sizes the probe)."""
    window = getattr(hf.config.get_text_config(), "sliding_window", None)
    length = window + 3 if window else 8
    masks = {}
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, k=k: masks.__setitem__(k, kwargs.get("attention_mask")),
        with_kwargs=True) for k, layer in enumerate(decoder_layers(hf))]
    ids = torch.full((1, length), 3)
    try:
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    windows = []
    for k in range(len(masks)):
        mask = masks[k]
        if mask is None or mask.dim() != 4:  # sdpa's causal flag, or GPT-2 positional
            windows.append(None)
            continue
        last_row = mask[0, 0, -1] if mask.dtype == torch.bool else mask[0, 0, -1] == 0
        seen = int(last_row.sum())
        windows.append(None if seen == length else seen)
    return windows


def allowed_matrix(attention_mask_row, last_rule, other_rule, window=None):
    """(T, T) numpy bool for one prompt, by the spec's words, one entry at a time; in a layer
    with a sliding window a query never reads a key ``window`` or more columns back."""
    real = [bool(x) for x in attention_mask_row]
    length = len(real)
    real_idx = [i for i in range(length) if real[i]]
    sink, last = real_idx[0], real_idx[-1]
    allow = np.zeros((length, length), dtype=bool)
    for q in range(length):
        if not real[q]:
            allow[q, q] = True  # padding query: itself only
            continue
        rule = last_rule if q == last else other_rule
        for k in range(length):
            if not real[k] or k > q or (window is not None and k <= q - window):
                continue
            if rule == "all":
                allow[q, k] = True
            elif rule == "sink_self":
                allow[q, k] = k == sink or k == q
            elif rule == "self":
                allow[q, k] = k == q
    return allow


def af1_rules(n_layers, l_wait, l_transfer, sink=True, all_peek=False):
    """{layer: (last_rule, other_rule)} of the spec's AF1 stages; ``sink=False`` restricts
    queries to themselves, ``all_peek`` lets every token read every earlier token in transfer."""
    alone = "sink_self" if sink else "self"
    rules = {}
    for k in range(l_wait, n_layers):
        if k < l_wait + l_transfer:
            rules[k] = ("all", "all" if all_peek else alone)
        else:
            rules[k] = (alone, alone)
    return rules


def clean_residuals(hf, tokenizer, prompt):
    """``(ids, [h_0 .. h_L])`` of one unbatched clean pass: ``ids`` a list of token ids and each
    ``h_k`` a ``(T, D)`` float64 numpy array.

    ``h_k`` for ``k < L`` is Hugging Face's ``hidden_states[k]``; ``h_L`` is the last decoder
    layer's output *before* the final norm (HF's ``hidden_states[L]`` is after it).
    """
    last_output = []
    handle = decoder_layers(hf)[-1].register_forward_hook(
        lambda module, args, out: last_output.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    hidden = list(hidden[:-1]) + [last_output.pop()]
    return ids[0].tolist(), [h[0].double().numpy() for h in hidden]


def brute_force_cama(hf, tokenizer, prompts):
    """{(layer, length, position, token): mean h_layer} from one unbatched clean pass per prompt.

    The spec's grouping: a prompt's tokens are averaged only with prompts of the same token
    ``length`` (so that positions line up), at the same position, with the same token.
    """
    sums = defaultdict(lambda: 0.0)
    counts = defaultdict(int)
    for prompt in prompts:
        ids, hidden = clean_residuals(hf, tokenizer, prompt)
        for layer, h in enumerate(hidden):
            for t, tok in enumerate(ids):
                key = (layer, len(ids), t, tok)
                sums[key] = sums[key] + h[t]
                counts[key] += 1
    return {key: sums[key] / counts[key] for key in sums}


def brute_force_position_mean(hf, tokenizer, prompts):
    """{(layer, length, position, token): mean h_layer over every prompt of that length at that
    position, whatever its token} -- the position-only mean, keyed like CAMA so the hook
    implementation can use either."""
    sums = defaultdict(lambda: 0.0)
    counts = defaultdict(int)
    tokens_seen = set()
    for prompt in prompts:
        ids, hidden = clean_residuals(hf, tokenizer, prompt)
        for layer, h in enumerate(hidden):
            for t, tok in enumerate(ids):
                sums[(layer, len(ids), t)] = sums[(layer, len(ids), t)] + h[t]
                counts[(layer, len(ids), t)] += 1
                tokens_seen.add((layer, len(ids), t, tok))
    return {(layer, length, t, tok): sums[(layer, length, t)] / counts[(layer, length, t)]
            for (layer, length, t, tok) in tokens_seen}


def af1_logits_with_hooks(hf, encoding, rules, replace_layer=None, cama=None):
    """Logits ``(B, T, V)`` of ``hf`` under per-layer attention rules and a CAMA replacement of
    ``h_{replace_layer}`` at real non-sink positions, with plain forward pre-hooks.

    ``cama`` maps ``(layer, prompt length, position, token)`` to the replacement (as
    :func:`brute_force_cama` returns it)."""
    mask2d = encoding["attention_mask"]
    batch, length = mask2d.shape
    eager = hf.config._attn_implementation == "eager"
    mask_index = POSITIONAL_MASK_INDEX.get(hf.config.model_type)
    dtype = next(hf.parameters()).dtype
    windows = model_windows(hf)
    handles = []

    def make_hook(k):
        def hook(module, args, kwargs):
            args = list(args)
            if k == replace_layer:
                hidden = args[0].clone()
                for b in range(batch):
                    real_idx = [i for i in range(length) if mask2d[b, i]]
                    for pos, i in enumerate(real_idx):
                        if pos == 0:
                            continue  # the sink keeps its clean state
                        tok = int(encoding["input_ids"][b, i])
                        value = cama[(k, len(real_idx), pos, tok)]
                        hidden[b, i] = torch.as_tensor(value, dtype=hidden.dtype)
                args[0] = hidden
            if k in rules:
                allow = torch.stack([torch.from_numpy(allowed_matrix(mask2d[b].tolist(),
                                                                     *rules[k], windows[k]))
                                     for b in range(batch)])[:, None]
                if eager:
                    mask = torch.zeros(allow.shape, dtype=dtype).masked_fill(
                        ~allow, torch.finfo(dtype).min)
                else:
                    mask = allow
                if mask_index is not None and len(args) > mask_index:
                    args[mask_index] = mask
                else:
                    kwargs["attention_mask"] = mask
            return tuple(args), kwargs
        return hook

    for k, layer in enumerate(decoder_layers(hf)):
        if k in rules or k == replace_layer:
            handles.append(layer.register_forward_pre_hook(make_hook(k), with_kwargs=True))
    try:
        with torch.no_grad():
            return hf(**encoding).logits
    finally:
        for handle in handles:
            handle.remove()


# -- comparing executors with this implementation ------------------------------------------


def hook_arguments(n_layers, l_wait, l_transfer, tables, sink=True, wait_ablation="cama",
                   transfer_peek="last"):
    """``(rules, replace_layer, means)`` for :func:`af1_logits_with_hooks` from the spec's
    words for an AF1 configuration and its alternatives.

    ``tables`` maps ``"cama"``, ``"position_mean"`` and ``"zero"`` to what replaces
    ``h_{l_wait}`` (brute-force means, or :func:`zero_means`); ``"none"`` replaces nothing, and
    neither does ``l_wait = 0`` (the identity).
    """
    rules = af1_rules(n_layers, l_wait, l_transfer, sink=sink, all_peek=transfer_peek == "all")
    if l_wait == 0 or wait_ablation == "none":
        return rules, None, None
    return rules, l_wait, tables[wait_ablation]


def necessity_rules(start, window):
    """The spec's necessity experiment: in layers ``start .. start+window-1`` the last token
    reads only the sink and itself; every other query keeps its causal attention."""
    return {k: ("sink_self", "all") for k in range(start, start + window)}


def zero_means(hidden_size):
    """A stand-in for a table that replaces every position by zeros (zero ablation)."""
    return defaultdict(lambda: np.zeros(hidden_size))


def last_logits_one_by_one(hf, encodings, rules, replace_layer=None, cama=None):
    """``(N, V)`` last-position logits with each prompt in its own forward pass
    (``encodings``: one unpadded encoding per prompt)."""
    return torch.cat([af1_logits_with_hooks(hf, enc, rules, replace_layer, cama)[:, -1]
                      for enc in encodings])


def keys_at_several_lengths(tokenizer, prompts):
    """Non-sink ``(position, token)`` pairs that occur in prompts of more than one token length.

    Where there are none, a table keyed by ``(position, token)`` and one keyed by
    ``(length, position, token)`` (the spec's grouping by token length) hold the same means for
    every position that is replaced (the sink never is).
    """
    lengths = defaultdict(set)
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        for t, tok in enumerate(ids[1:], start=1):
            lengths[(t, tok)].add(len(ids))
    return sorted(key for key, seen in lengths.items() if len(seen) > 1)


def clean_magnitude(hf, encoding) -> float:
    """The largest ``|value|`` of the clean forward pass on ``encoding`` (every hidden state and
    the logits): the ``magnitude`` of :func:`float32_rounding_bound` for that batch."""
    with torch.no_grad():
        out = hf(**encoding, output_hidden_states=True)
    return max(float(h.abs().max()) for h in (*out.hidden_states, out.logits))


def assert_float32_close(hf, got, want, encoding, what=""):
    """``got`` equals ``want`` up to :func:`float32_rounding_bound` at the larger of the clean
    pass's magnitude on ``encoding`` and the compared values' own (two float32 evaluations of
    the same arithmetic in different orders, or one through float32 sums). Returns the largest
    difference."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    magnitude = max(clean_magnitude(hf, encoding), float(got.abs().max()),
                    float(want.abs().max()))
    bound = float32_rounding_bound(hf, magnitude, encoding["input_ids"].shape[1])
    diff = float((got - want).abs().max())
    assert diff <= bound, f"{what}: |difference| {diff:.2e} > float32 bound {bound:.2e}"
    return diff


# -- how far two evaluations of the same arithmetic may differ ------------------------------
#
# Every comparison of two implementations (or of one implementation batched two ways) is a
# comparison of two evaluations of the same real-number function in floating point, whose
# results differ by rounding alone. Its tolerance is a bound on that rounding, computed from the
# precision (``eps``: the spacing of numbers at 1.0, 2^-23 for float32, 2^-7 for bfloat16; a
# rounding errs by at most ``u = eps / 2`` relative to the value rounded) and the magnitudes
# the computation reaches, read from the reference's own activations in the same run. It never
# comes from how far the reference differs from itself across batchings: that spread depends on
# which kernels a CPU picks for each shape, not on the arithmetic. Two bounds, for two regimes:
#
# * ``float32_rounding_bound`` (tiny random models, where every value is of order one): the
#   deterministic worst case. Every reduction of ``n`` terms rounds within ``n * u`` of the sum
#   of its terms' magnitudes (Higham's gamma_n), each term is at most ``magnitude``, and each
#   layer and the head add one such error: ``(L + 1) * n * u * magnitude``, ``n`` the widest
#   weight matrix or the sequence length. Rigorous up to amplification through the layers; the
#   measured differences are about 1% of it.
#
# * ``residual_rounding_bound`` (real checkpoints): there the worst case says nothing, because
#   the residual stream of real models carries a few huge activations (SmolLM2: |h| reaches
#   2.5e4 at the sink from layer 2 on, where float32 numbers are 2e-3 apart) while every
#   matrix product reads normalized inputs of order one. The rounding that matters is then the
#   residual stream's own: each layer adds its attention and its MLP output to ``h`` and rounds
#   every entry within ``u * |h| <= u * M``, ``M`` the largest ``|h|`` over the positions and
#   layers the cell runs (the sink included: the last token reads it in every layer). A
#   last-position logit reads those states through the norms, attention and the head; the model
#   taken here is that they carry a residual error to the logit without amplifying it (checked
#   in float64, free of any CPU's float32 kernels, by test_smollm2.py's
#   ``test_residual_rounding_reaches_the_logits_unamplified``). Over the ``N = 2 n + 1``
#   roundings of ``n`` layers (and the final norm's read) errors of independent signs grow as
#   ``sqrt(N)`` (Higham and Mary, "A new approach to probabilistic rounding error analysis",
#   SIAM J. Sci. Comput. 41(5), 2019: within ``lam * sqrt(N) * u`` except with probability
#   ``2 exp(-lam^2 / 2)``; ``lam = 3``). Two evaluations differ by at most the sum of their
#   errors: ``2 * lam * sqrt(N) * u * M = lam * sqrt(N) * eps * M``. On SmolLM2 at (0, 1),
#   ``M = 2.5e4``: 0.071, where fast and reference differ by 2.1e-3 to 2.5e-3 on the kernels
#   tried (avx512, avx2, default; 1 and 2 threads).
#
# Predictions are compared where they are decided: where the reference's top two logits are
# further apart than twice the bound (closer ones may swap under another evaluation order).

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
FLOAT32_EPS = 2.0 ** -23
BFLOAT16_EPS = 2.0 ** -7
ROUNDING_LAMBDA = 3.0


def float32_rounding_bound(hf, magnitude, length):
    """How far two float32 evaluations of the same forward pass, in different orders, may
    differ in any output of size at most ``magnitude``: ``(L + 1) * n * u * magnitude``, ``n``
    the longest reduction (the widest weight matrix of a layer or the sequence ``length``).
    The worst case of the comment above; for tiny models, where all values are of order one."""
    widest = max(max(p.shape) for p in decoder_layers(hf).parameters() if p.dim() == 2)
    n_layers = len(decoder_layers(hf))
    return (n_layers + 1) * max(widest, length) * FLOAT32_UNIT_ROUNDOFF * magnitude


def residual_rounding_bound(eps, magnitude, n_layers_run, evaluations=2):
    """How far a last-position logit may move by rounding at precision ``eps`` (the comment
    above): ``lam * sqrt(2 n + 1) * (eps / 2) * magnitude`` per evaluation, summed over
    ``evaluations`` (2: two evaluations compared; 1: one against an exact reference).

    Args:
        magnitude: the largest ``|h|`` over every position of the layers the cell runs
            (:class:`ResidualMagnitude`).
        n_layers_run: ``n``, the layers whose output the logit depends on (after a residual
            replacement at ``h_w``: ``L - w``).
    """
    return (evaluations * ROUNDING_LAMBDA * math.sqrt(2 * n_layers_run + 1) * (eps / 2)
            * magnitude)


def layers_run(n_layers, replace_layer=None):
    """The layers a last-position logit depends on: after a replacement of ``h_w`` only layers
    ``w .. L-1`` (what came before is a table look-up), else all ``L``."""
    return n_layers - (replace_layer or 0)


class ResidualMagnitude:
    """Records the largest ``|h_k|`` (every position, ``k >= first_layer``, and ``h_L``) of
    every forward pass of ``hf`` run inside the ``with`` block (plain forward hooks on the
    decoder layers: they fire under nnsight traces too, and whatever replaced ``h_k`` before
    layer ``k`` is what they read).

    ``value`` is the magnitude of :func:`residual_rounding_bound`."""

    def __init__(self, hf, first_layer=0):
        self.layers = decoder_layers(hf)
        self.first_layer = first_layer
        self.value = 0.0
        self._handles = []

    def _seen(self, tensor):
        if isinstance(tensor, tuple):
            tensor = tensor[0]
        self.value = max(self.value, float(tensor.detach().abs().max()))

    def __enter__(self):
        for k, layer in enumerate(self.layers):
            if k >= self.first_layer:
                self._handles.append(layer.register_forward_pre_hook(
                    lambda module, args, kwargs: self._seen(
                        args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        self._handles.append(self.layers[-1].register_forward_hook(
            lambda module, args, output: self._seen(output)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def decided_prompts(want, bound):
    """``(N,)`` numpy bool: prompts whose reference logits ``want`` ``(N, V)`` have their top two
    further apart than ``2 * bound`` (no rounding within the bound can swap them)."""
    top2 = want.topk(2, -1).values
    return (top2[:, 0] - top2[:, 1] > 2 * bound).numpy()


def assert_logits_close(got, want, bound, what, answers=None, each_decided=True):
    """``got`` (logits ``(N, V)``, or Predictions with ``answers``) equals the reference
    logits ``want`` ``(N, V)``: logits within ``bound`` and the same predictions wherever the
    reference's top two are further apart than twice the bound (closer ones are ties).
    Returns the largest difference and the number of prompts whose predictions were compared
    (``each_decided=False``: the caller checks that most were; else at least half must be)."""
    decided = decided_prompts(want, bound)
    # Random tiny models under heavy ablation (zero waits, short sliding windows) can tie on a
    # few prompts; most must be decided so that predictions are really compared.
    assert not each_decided or 2 * decided.sum() >= len(decided), \
        f"{what}: too many ties to compare predictions ({int(decided.sum())} of " \
        f"{len(decided)} decided at bound {bound:.2e})"
    if answers is None:
        diff = float((got - want).abs().max())
        pred = got.argmax(-1).numpy()
    else:
        want_answer = want.gather(-1, torch.tensor(answers)[:, None])[:, 0].numpy()
        diff = float(np.abs(got.answer_logits - want_answer).max())
        pred = got.pred_ids
    assert diff <= bound, f"{what}: |logit difference| {diff:.2e} > bound {bound:.2e}"
    assert np.array_equal(pred[decided], want.argmax(-1).numpy()[decided]), \
        f"{what}: predictions differ on prompts the bound decides"
    return diff, int(decided.sum())
