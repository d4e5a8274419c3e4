"""What runs on the server in each trace of a request and at its end (shipped by value).

:func:`~.trace_site.run_traces` lists the traces with ``traces(state)``, calls
``step(sites, state, extra)`` inside each and ``finish(state)`` once; the three make a kind of
request. They use only torch and the traced
mechanisms (``mechanisms/traced.py``), and this module is registered with nnsight, so NDIF,
where this package is not installed, receives them by value. ``state`` is a dict that travels
with the request and lives on the server while it runs.

Shapes: ``B`` prompts in a batch, ``T`` tokens, ``D`` hidden size, ``K`` table keys.
"""

import sys

import nnsight
import torch
from nnsight import save

from ...mechanisms.traced import (accumulate_residuals, apply_intervention, apply_rules,
                                  last_token_measures, read_prompt, wait_replacement)

# -- evaluation and the CAMA build -----------------------------------------------------------------


def batch_groups(state):
    """The CAMA groups of each batch of ``state["batches"]``: ``state["groups"]`` (one ``(B,)``
    tensor per batch, for a data set of several templates), else ``None`` per batch."""
    return state.get("groups") or [None] * len(state["batches"])


def cell_traces(state):
    """Every cell of ``state["cells"]`` (``(intervention or None, cama)``) on every batch of
    ``state["batches"]`` (``(encoding, answers)``), cell-major: ``(encoding, (answers,
    intervention, cama, groups, batch, role))`` for :func:`predictions_step`. With
    ``state["kl"]`` a clean trace of every batch comes first (``role`` ``"reference"``): its
    last-position log-probabilities stay on the server as the reference of the cells' KL."""
    batches = list(enumerate(zip(state["batches"], batch_groups(state))))
    reference = [(enc, (answers, None, None, groups, b, "reference"))
                 for b, ((enc, answers), groups) in batches] if state.get("kl") else []
    return reference + [(enc, (answers, intervention, cama, groups, b, "cell"))
                        for intervention, cama in state["cells"]
                        for b, ((enc, answers), groups) in batches]


def batch_traces(state):
    """``state["batches"]`` as they are: ``(encoding, extra)``."""
    return state["batches"]


def sum_traces(state):
    """Every batch of ``state["batches"]`` (``(encoding, answers or None)``) with its groups:
    ``(encoding, (answers, groups))`` for :func:`residual_sums_step`."""
    return [(enc, (answers, groups))
            for (enc, answers), groups in zip(state["batches"], batch_groups(state))]


def append_predictions(state, measures):
    """Append one trace's ``(pred, answer_logit, answer_logprob, kl or None)`` ``(B,)`` each
    to the state's lists (int32 ids, float32 measures; KL only where measured)."""
    ids, logits, logprobs, kl = measures
    state["pred_ids"].append(ids.to(torch.int32))
    state["answer_logits"].append(logits.float())
    state.setdefault("answer_logprobs", []).append(logprobs.float())
    if kl is not None:
        state.setdefault("kl_values", []).append(kl.float())


def predictions_step(sites, state, extra):
    """One trace. ``extra``: ``(answers (B,), intervention or None, cama, groups (B,) or None,
    batch index, role)``.

    ``role`` ``"reference"``: the clean pass; keeps the log-probabilities ``(R, V)`` of the rows
    it gets right and those rows ``(R,)`` in ``state["reference"][batch]``, on the server.
    ``"cell"``: applies the intervention and appends the last position's argmax (int32), the
    answer's logit and log-probability and, against the batch's reference where the request
    has one, ``KL(clean || this)`` (float32, NaN where the clean pass is wrong), ``(B,)`` each.
    """
    answers, intervention, cama, groups, batch, role = extra
    if role == "reference":
        logits = sites.root.output.logits[:, -1].float()
        rows = (logits.argmax(-1) == answers.to(logits.device)).nonzero()[:, 0]
        state.setdefault("reference", {})[batch] = (torch.log_softmax(logits, -1)[rows], rows)
        return
    if intervention is not None:
        apply_intervention(sites, intervention, cama, groups)
    reference, rows = state.get("reference", {}).get(batch, (None, None))
    append_predictions(state, last_token_measures(sites, answers, reference, rows))


def residual_sums_step(sites, state, extra):
    """A clean trace adding each token's ``h_k`` into its key's float64 sum.

    ``state``: ``layers`` (ascending ``k``), ``keys`` ``(K, 4)``, ``shape`` ``(len(layers), K, D)``;
    the sums are made on the server at the first trace (never uploaded). ``extra``: ``(answers,
    groups)``: the batch's answers ``(B,)`` to also save the clean predictions, or ``None``; its
    CAMA groups ``(B,)``, or ``None``.
    """
    answers, groups = extra
    if "sums" not in state:
        state["sums"] = torch.zeros(state["shape"], dtype=torch.float64)
    accumulate_residuals(sites, state["layers"], state["keys"], state["sums"], groups)
    if answers is not None:
        append_predictions(state, last_token_measures(sites, answers))


def predictions_finish(state):
    """The saved result: ``pred_ids``/``answer_logits``/``answer_logprobs`` (and ``kl`` where
    measured) concatenated in trace order, and ``residual_sums`` ``(len(layers), K, D)`` float32
    when the traces summed residuals. Nothing vocabulary-sized is returned."""
    out = {}
    if "sums" in state:
        out["residual_sums"] = state["sums"].float()
    if state["pred_ids"]:
        out["pred_ids"] = torch.cat(state["pred_ids"])
        out["answer_logits"] = torch.cat(state["answer_logits"])
        out["answer_logprobs"] = torch.cat(state["answer_logprobs"])
        if state.get("kl_values"):
            out["kl"] = torch.cat(state["kl_values"])
    return save(out)


# -- the self-check on arrival ---------------------------------------------------------------------


def relative_difference(a, b):
    """``max |a - b|`` over each row's last dimension, relative to that row's ``max |b|``, the
    largest over rows: a float32 scalar on the CPU (0 for equal tensors; ``b`` the clean one)."""
    scale = b.abs().amax(-1).float().clamp(min=torch.finfo(torch.float32).tiny)
    return ((a - b).abs().amax(-1).float() / scale).max().cpu()


def self_check_step(sites, state, extra):
    """One trace of the self-check (``selfcheck.py``); ``extra``: ``(kind, intervention, cama)``.

    ``"clean"`` keeps ``h_0 .. h_w`` (``w = state["write_layer"]``) and the last position's
    logits; ``"write"`` compares ``h_0 .. h_w`` before the CAMA write with the clean ones, writes
    ``h_w`` and compares what layer ``w`` then receives with what it should: the CAMA row of each
    non-sink real token (``state["expected_rows"]`` ``(B, T)``, ``-1`` elsewhere), the clean
    state elsewhere. Any other kind applies its intervention and keeps the logits. Differences
    are relative to the clean row's largest value (:func:`relative_difference`).
    """
    kind, intervention, cama = extra
    layer = state["write_layer"]
    if kind == "clean":
        state["clean_states"] = [sites.layers[k].inputs[0][0].clone() for k in range(layer + 1)]
    elif kind == "write":
        input_ids, real, positions = read_prompt(sites)
        before = [sites.layers[k].inputs[0][0] for k in range(layer + 1)]
        state["before_write"] = torch.stack([relative_difference(b, c) for b, c in
                                             zip(before, state["clean_states"])]).max()
        apply_rules(sites, {}, layer, wait_replacement(intervention, cama, input_ids, real,
                                                       positions), real)
        written = sites.layers[layer].inputs[0][0]
        clean = state["clean_states"][layer]
        rows = state["expected_rows"].to(written.device)
        replaced = (rows >= 0)[..., None]
        means = cama.means.to(written.device, written.dtype)
        expected = torch.where(replaced, means[rows.clamp(min=0)], clean)
        state["write_error"] = relative_difference(written, expected)
        state["write_change"] = relative_difference(torch.where(replaced, written, clean), clean)
    else:
        apply_intervention(sites, intervention, cama)
    state["logits"][kind] = sites.root.output.logits[:, -1].clone()


def self_check_finish(state):
    """The saved result: float32 scalars, relative differences (:func:`relative_difference`).
    ``all_allowed`` and ``sink_self``: logits against the clean ones; ``before_write``:
    ``h_0 .. h_w`` against the clean ones; ``write_error``: the written ``h_w`` against what it
    should be; ``write_change``: the written ``h_w`` against the clean one at the replaced
    positions."""
    clean = state["logits"]["clean"]
    return save({"all_allowed": relative_difference(state["logits"]["all_allowed"], clean),
                 "sink_self": relative_difference(state["logits"]["sink_self"], clean),
                 "before_write": state["before_write"], "write_error": state["write_error"],
                 "write_change": state["write_change"]})


# NDIF does not have this package: ship these functions by value with every request.
nnsight.register(sys.modules[__name__])
