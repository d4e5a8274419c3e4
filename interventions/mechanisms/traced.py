"""The code that runs *inside* an nnsight trace: ABP masks, CAMA look-ups and reductions.

Everything here may execute on an NDIF server, so its functions use only ``torch`` and the module
is shipped by value with remote requests (registered at the end). Architecture quirks are
resolved *outside* the trace by :mod:`~interventions.mechanisms.adapters` into a
:class:`ModelSites`, which travels with the request (its envoys pickle as references to the server's own modules).

Typical use inside a user's own trace (see docs/notebook.md)::

    with model.lm.trace(prompts):
        apply_af1(model.sites, AF1Plan(l_wait=15, l_transfer=2), cama=table.layer(15))
        ids = model.lm.lm_head.output[:, -1].argmax(-1).save()

Shapes: ``B`` batch, ``T`` padded length (left padding), ``D`` hidden size, ``K`` table keys
(each ``(position, token, prompt length, group)``: :data:`KEY_COLUMNS`).
"""

import sys

import nnsight
import torch

from ..nnsight_internals import current_batch_group
from . import plan as _plan


class ModelSites:
    """Where AF1 acts in one wrapped model (built by ``ArchAdapter.sites``; do not build by hand).

    Attributes:
        root: the nnsight model envoy (its ``.inputs`` carry ``input_ids``/``attention_mask``).
        layers: the decoder-layer envoys, in execution order.
        mask_index: positional index of the 4D attention mask in a layer call, or ``None``
            when the mask is passed by keyword (resolved from the layer's signature).
        mask_name: keyword under which the layer receives the mask.
        attn_implementation: ``"eager"`` or ``"sdpa"``; decides the mask dtype when the model
            itself passed none (sdpa uses its causal flag when there is no padding).
        windows: per layer, the sliding window ``w`` of the layer's own attention (a query
            reads keys ``q - w < k <= q``) or ``None``; a rule's mask is intersected with it.
    """

    __slots__ = ("root", "layers", "mask_index", "mask_name", "attn_implementation", "windows")

    def __init__(self, root, layers, mask_index, mask_name, attn_implementation, windows=None):
        self.root = root
        self.layers = list(layers)
        self.mask_index = mask_index
        self.mask_name = mask_name
        self.attn_implementation = attn_implementation
        self.windows = [None] * len(self.layers) if windows is None else list(windows)

    def __reduce__(self):
        return (ModelSites, (self.root, self.layers, self.mask_index, self.mask_name,
                             self.attn_implementation, self.windows))

    @property
    def n_layers(self):
        return len(self.layers)


# The columns of a CAMA table key (``keys``: ``(K, 4)`` int64 rows). The spec groups prompts by
# template and token length "so that positions line up": a key holds the prompt's length and a
# group (a template's index; 0 when a data set has one template), so that prompts of different
# lengths or templates never share a mean. Token ``-1`` matches any token (a position-only mean).
KEY_POSITION, KEY_TOKEN, KEY_LENGTH, KEY_GROUP = 0, 1, 2, 3
KEY_COLUMNS = ("position", "token", "length", "group")


class CamaLayer:
    """One layer of a CAMA table, the only part of a table a trace needs.

    Attributes:
        layer: the residual index ``k`` (``h_k`` enters decoder layer ``k``).
        keys: ``(K, 4)`` int64 rows ``(position, token_id, prompt length, group)`` (see
            :data:`KEY_COLUMNS`); token ``-1`` matches any token (a position-only mean).
        means: ``(K, D)`` float32 mean of the clean ``h_k`` over the prompts with that key.
        kind: ``"cama"`` or ``"position_mean"``.
    """

    __slots__ = ("layer", "keys", "means", "kind")

    def __init__(self, layer, keys, means, kind="cama"):
        self.layer = int(layer)
        self.keys = keys
        self.means = means
        self.kind = kind

    def __reduce__(self):
        return (CamaLayer, (self.layer, self.keys, self.means, self.kind))

    def __repr__(self):
        return f"CamaLayer(layer={self.layer}, kind={self.kind!r}, keys={tuple(self.keys.shape)[0]})"


def prompt_layout(input_ids, attention_mask):
    """Real-token mask and positions counted from each prompt's first real token.

    Args:
        input_ids: ``(B, T)`` token ids (left padded).
        attention_mask: ``(B, T)`` 1 for real tokens, or ``None`` for no padding.
    Returns:
        ``real`` ``(B, T)`` bool and ``positions`` ``(B, T)`` int64 (0 at the sink).
    """
    if attention_mask is None:
        real = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    else:
        real = attention_mask.to(torch.bool)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return real, positions


def read_prompt(sites):
    """Inside a trace: the batch's ``input_ids``, real-token mask and positions.

    Must be called before any layer is read (nnsight serves values in execution order).
    """
    args, kwargs = sites.root.inputs
    input_ids = kwargs.get("input_ids", args[0] if len(args) > 0 else None)
    if input_ids is None:
        raise ValueError("AF1 needs token ids in the trace input (got inputs_embeds only)")
    real, positions = prompt_layout(input_ids, kwargs.get("attention_mask"))
    return input_ids, real, positions


def allowed_keys(real, last_rule, other_rule, window=None):
    """Which keys each query may attend to under one layer's attention rules.

    Args:
        real: ``(B, T)`` bool, real (non-padding) tokens.
        last_rule / other_rule: ``"all"``, ``"sink_self"`` or ``"self"`` for the last real query
            and for every other real query.
        window: the layer's sliding window, or ``None``: a rule never lets a query read a key
            its layer cannot (``q - window < k``; the sink drops out of a far query's
            ``sink_self``). Real tokens are contiguous, so columns count positions.
    Returns:
        ``(B, 1, T, T)`` bool, ``True`` where query (row) may attend to key (column). Padding
        queries attend only to themselves (never read by real tokens; avoids empty rows).
    """
    batch, length = real.shape
    device = real.device
    idx = torch.arange(length, device=device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    if window is not None:
        causal = causal & (idx[None, :] > idx[:, None] - window)
    eye = idx[None, :] == idx[:, None]
    all_keys = causal[None] & real[:, None, :]  # (B, T, T)
    sink_col = real.long().argmax(-1)  # first real token of each row
    is_sink = idx[None, :] == sink_col[:, None]  # (B, T): key column is the sink
    sink_self = all_keys & (is_sink[:, None, :] | eye[None])
    choices = {"all": all_keys, "sink_self": sink_self, "self": eye[None].expand(batch, -1, -1)}
    allow = choices[other_rule].clone()
    last = (real.long() * idx[None, :]).argmax(-1)  # last real token of each row
    rows = torch.arange(batch, device=device)
    allow[rows, last] = choices[last_rule][rows, last]
    allow = torch.where(real[:, :, None], allow, eye[None])
    return allow[:, None]


def mask_like(allow, existing, attn_implementation, dtype):
    """Encode an allowed-keys mask the way the layer expects it.

    A boolean mask stays boolean (sdpa with padding; writing a float into one invoke's slice
    would promote the whole batch mask), a float mask becomes an additive mask of its own
    dtype, and where the model passed no mask (sdpa, no padding) eager gets an additive mask of
    the hidden-state dtype and sdpa a boolean one.

    Args:
        allow: ``(B, 1, T, T)`` bool.
        existing: the mask the model passed to this layer, or ``None``.
        dtype: the hidden-state dtype.
    """
    if existing is not None:
        allow = allow.to(existing.device)
        if existing.dtype == torch.bool:
            return allow
        dtype = existing.dtype
    elif attn_implementation != "eager":
        return allow
    zeros = torch.zeros(allow.shape, dtype=dtype, device=allow.device)
    return zeros.masked_fill(~allow, torch.finfo(dtype).min)


def token_keys(input_ids, real, positions, groups=None):
    """Every token's CAMA key: ``(B, T, 4)`` int64 ``(position, token, length, group)``.

    Args:
        input_ids, real, positions: ``(B, T)`` as from :func:`read_prompt`.
        groups: ``(B,)`` int64 group of each prompt (its template's index), or ``None``: all 0.
    """
    lengths = real.long().sum(-1)
    if groups is None:
        groups = torch.zeros_like(lengths)
    per_prompt = torch.stack([lengths, groups.to(lengths.device, torch.long)], -1)  # (B, 2)
    return torch.cat([positions[..., None], input_ids[..., None],
                      per_prompt[:, None, :].expand(-1, positions.shape[1], -1)], -1)


def match_keys(keys, input_ids, real, positions, groups=None):
    """Row of ``keys`` ``(K, 4)`` for each token: ``(B, T)`` int64, ``-1`` where no key matches.

    A key matches a token when its position, prompt length and group are the token's and its
    token id is the token's id or ``-1`` (any). A table built with groups (any group id above 0)
    needs ``groups``: without them every prompt would fall into group 0.
    """
    keys = keys.to(input_ids.device)
    if groups is None and bool((keys[:, KEY_GROUP] > 0).any()):
        raise ValueError("this CAMA table groups prompts (by template); pass groups=, the (B,) "
                         "group of each prompt in the batch")
    same = token_keys(input_ids, real, positions, groups)[..., None, :] == keys  # (B, T, K, 4)
    same[..., KEY_TOKEN] |= keys[:, KEY_TOKEN] == -1
    match = same.all(-1)
    found = match.any(-1)
    first = match.int().argmax(-1)
    return torch.where(found, first, torch.full_like(first, -1))


def wait_replacement(intervention, cama, input_ids, real, positions, groups=None):
    """Values that replace ``h_{replace_layer}`` and where: ``(B, T, D)`` (or a broadcastable
    zero) and ``(B, T)`` bool.

    Every real non-sink position is replaced; the sink keeps its clean state (its state never
    depends on other tokens, so no stage changes it). ``groups``: see :func:`match_keys`.
    """
    where = real & (positions > 0)
    layer = intervention.replace_layer
    if intervention.replacement == "zero":
        return torch.zeros((), device=real.device), where
    if cama is None:
        raise ValueError(f"replacing h_{layer} needs a CAMA table layer "
                         f"(cama=table.layer({layer}))")
    if cama.layer != layer:
        raise ValueError(f"the intervention replaces h_{layer} but the CAMA layer given is "
                         f"h_{cama.layer}")
    if cama.kind != intervention.replacement:
        raise ValueError(f"replacing h_{layer} by {intervention.replacement!r} needs a "
                         f"{intervention.replacement!r} table layer, got {cama.kind!r}")
    rows = match_keys(cama.keys, input_ids, real, positions, groups)
    missing = where & (rows < 0)
    if bool(missing.any()):
        absent = token_keys(input_ids, real, positions, groups)[missing].unique(dim=0)
        raise KeyError(
            "CAMA table has no entry for (position, token, length, group) "
            + ", ".join(str(tuple(key)) for key in absent[:8].tolist())
            + (" ..." if len(absent) > 8 else "")
            + ": build the table on a data set that contains these prompts"
        )
    values = cama.means.to(real.device)[rows.clamp(min=0)]
    return values, where


def _layer_mask(sites, args, kwargs):
    if sites.mask_index is not None and len(args) > sites.mask_index:
        return args[sites.mask_index]
    return kwargs.get(sites.mask_name)


def apply_rules(sites, rules, replace_layer=None, replacement=None, real=None):
    """Inside a trace: restrict attention per layer and optionally overwrite one residual.

    Args:
        sites: the model's :class:`ModelSites`.
        rules: ``{layer: (last_rule, other_rule)}``; layers not named run unchanged.
        replace_layer: ``k`` whose input ``h_k`` is overwritten, or ``None``.
        replacement: ``(values (B, T, D), where (B, T) bool)`` for ``replace_layer``.
        real: ``(B, T)`` real-token mask (from :func:`read_prompt`), needed when ``rules``.
    """
    touched = sorted(set(rules) | ({replace_layer} if replace_layer is not None else set()))
    allow_cache = {}
    for k in touched:
        layer = sites.layers[k]
        args, kwargs = layer.inputs
        args = list(args)
        kwargs = dict(kwargs)
        hidden = args[0]
        if k == replace_layer:
            values, where = replacement
            where = where.to(hidden.device)
            hidden = torch.where(where[..., None], values.to(hidden.device, hidden.dtype), hidden)
            args[0] = hidden
        if k in rules:
            rule = rules[k]
            window = sites.windows[k]
            if (rule, window) not in allow_cache:
                allow_cache[(rule, window)] = allowed_keys(real.to(hidden.device), rule[0],
                                                           rule[1], window)
            allow = allow_cache[(rule, window)].to(hidden.device)
            existing = _layer_mask(sites, args, kwargs)
            # Where the model passed no mask (sdpa without padding), an edit of ``None`` cannot be
            # spliced into one invoke's rows: the first invoke to edit it writes a whole-batch
            # mask (plain causal on the other invokes' rows), which later invokes edit row-wise.
            rows = current_batch_group(sites.root) if existing is None else None
            if rows is not None:
                start, total = rows
                whole = torch.ones(total, allow.shape[-1], dtype=torch.bool, device=allow.device)
                full = allowed_keys(whole, "all", "all", window)
                full[start:start + allow.shape[0]] = allow
                allow = full
            mask = mask_like(allow, existing, sites.attn_implementation, hidden.dtype)
            if sites.mask_index is not None and len(args) > sites.mask_index:
                args[sites.mask_index] = mask
            else:
                kwargs[sites.mask_name] = mask
        layer.inputs = (tuple(args), kwargs)


def apply_intervention(sites, intervention, cama=None, groups=None):
    """Inside a trace: apply an :class:`~.plan.Intervention` to the traced batch.

    Args:
        sites: ``model.sites`` of an :class:`interventions.AF1Model`.
        intervention: per-layer attention rules and an optional residual replacement.
        cama: the :class:`CamaLayer` for ``intervention.replace_layer`` when it needs one.
        groups: ``(B,)`` group of each traced prompt, only for a table built with groups
            (several templates); by default the group is 0 and the length is each prompt's own.
    """
    input_ids, real, positions = read_prompt(sites)
    replacement = None
    if intervention.replace_layer is not None:
        replacement = wait_replacement(intervention, cama, input_ids, real, positions, groups)
    apply_rules(sites, intervention.rules, intervention.replace_layer, replacement, real)


def apply_af1(sites, plan, cama=None, groups=None):
    """Inside a trace: apply an AF1 plan to the traced batch.

    Layers ``0..l_wait-1`` run unchanged; ``h_{l_wait}`` is replaced at every real non-sink
    position (by ``cama``, a :class:`CamaLayer` for layer ``l_wait``, or as the plan's
    ``wait_ablation`` says); transfer and compute layers get the ABP masks.

    Args:
        sites: ``model.sites`` of an :class:`interventions.AF1Model`.
        plan: an :class:`interventions.AF1Plan`.
        cama: ``table.layer(plan.l_wait)`` (``table.position_mean_layer`` for that ablation);
            not needed when ``l_wait == 0`` or the ablation is ``"zero"``/``"none"``.
        groups: see :func:`apply_intervention` (not needed for a data set of one template).
    """
    apply_intervention(sites, plan.intervention(sites.n_layers), cama, groups)


def residual_state(sites, k: int):
    """Inside a trace: ``h_k`` ``(B, T, D)``, what enters layer ``k`` (for ``k = L``, what the
    last layer returns, before the final norm)."""
    if k < sites.n_layers:
        return sites.layers[k].inputs[0][0]
    out = sites.layers[sites.n_layers - 1].output
    return out[0] if isinstance(out, tuple) else out


def last_token_predictions(sites, answer_ids=None):
    """Inside a trace, after the interventions: greedy prediction at the last position.

    Returns ``(pred_ids (B,), answer_logits (B,) or None)``; small enough to ``.save()``
    and bring back from a remote run.
    """
    logits = sites.root.output.logits[:, -1]
    pred = logits.argmax(-1)
    if answer_ids is None:
        return pred, None
    answer = logits.gather(-1, answer_ids.to(logits.device)[:, None])[:, 0]
    return pred, answer


def logit_measures(logits, answer_ids, reference=None, reference_rows=None):
    """The greedy prediction and the continuous measures from last-position logits.

    Args:
        logits: ``(B, V)`` last-position logits (any float dtype; measured in float32).
        answer_ids: ``(B,)`` the answer token of each row.
        reference: ``(R, V)`` float32 log-probabilities of the reference (clean) pass for the
            rows ``reference_rows`` ``(R,)`` of the batch, or ``None``.
    Returns:
        ``pred (B,)`` int64 argmax, ``answer_logit (B,)`` float32, ``answer_logprob (B,)``
        float32 (log-softmax at the answer), and ``kl (B,)`` float32 ``KL(reference || this)``
        in nats, NaN for rows without a reference (``None`` without ``reference``).
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, -1)
    answers = answer_ids.to(logits.device)[:, None]
    pred = logits.argmax(-1)
    answer_logit = logits.gather(-1, answers)[:, 0]
    answer_logprob = logprobs.gather(-1, answers)[:, 0]
    kl = None
    if reference is not None:
        rows = reference_rows.to(logits.device)
        ref = reference.to(logits.device, torch.float32)
        kl = torch.full(pred.shape, float("nan"), device=logits.device)
        kl[rows] = (ref.exp() * (ref - logprobs[rows])).sum(-1)
    return pred, answer_logit, answer_logprob, kl


def last_token_measures(sites, answer_ids, reference=None, reference_rows=None):
    """Inside a trace, after the interventions: :func:`logit_measures` of the last position
    (``(B,)`` tensors, small enough to ``.save()`` and bring back from a remote run)."""
    return logit_measures(sites.root.output.logits[:, -1], answer_ids, reference,
                          reference_rows)


def accumulate_residuals(sites, layers, keys, sums, groups=None):
    """Inside a clean trace: add each token's ``h_k`` to its key's running sum.

    Args:
        layers: ascending residual indices ``k`` in ``0..L`` (``h_L`` is the last layer's output).
        keys: ``(K, 4)`` int64 table keys (:data:`KEY_COLUMNS`); tokens without a key are skipped.
        sums: ``(len(layers), K, D)`` float64 accumulator, updated in place (and returned).
        groups: ``(B,)`` group of each traced prompt, or ``None`` (see :func:`match_keys`).
    """
    input_ids, real, positions = read_prompt(sites)
    rows = match_keys(keys, input_ids, real, positions, groups)
    rows = torch.where(real, rows, torch.full_like(rows, -1)).reshape(-1)
    keep = rows >= 0
    rows = rows[keep].to(sums.device)
    for j, k in enumerate(layers):
        hidden = residual_state(sites, k)
        flat = hidden.reshape(-1, hidden.shape[-1])[keep.to(hidden.device)]
        sums[j].index_add_(0, rows, flat.to(device=sums.device, dtype=sums.dtype))
    return sums


# This module and the plan classes run inside traces on NDIF, where this package is not
# installed: ship them by value with every request (registered as soon as they can be used).
nnsight.register(sys.modules[__name__])
nnsight.register(_plan)
