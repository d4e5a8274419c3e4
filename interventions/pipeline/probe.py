"""Does an intermediate token hold a partial result? A linear probe on three-operand prompts.

Design. For ``A op1 B op2 C`` prompts, read the clean model's residual ``h_k`` (every layer) at
the *site*: the last token before ``C`` (the second operator in ``Calculate: 3+4-5=``). Its state
depends only on ``(A, B)``, so there is one point per operand pair. Fit linear probes for two
targets of the partial result ``P = A op1 B`` and score them on operand pairs **never seen in
training** (cross-validation over pairs):

* ``value``: ``P`` itself (ridge regression; R^2 and exact accuracy after rounding);
* ``parity``: whether ``P`` is odd (least-squares linear classifier; accuracy).

Why parity, and why held-out pairs: ``value`` is linearly decodable from any state that merely
*holds* A and B (P is linear in them), and with few pairs and many dimensions any nonlinear
mixture of A and B decodes anything on pairs it has seen. Parity of ``A + B`` is the XOR of the
operands' parities: no additive code ``f(A) + g(B)`` separates it linearly, and a mixture that is
not organised by ``P`` gives no way to predict it for an unseen pair. The controls make this
concrete: the same probes on ``[h_0 at A ; h_0 at B]`` (both operands present, no interaction),
and on shuffled labels, stay at chance for parity.

What it can show: by which layer the site's state is organised by the partial result (parity on
unseen pairs above the controls), i.e. that the full model forms partial results at an
intermediate token. What it cannot show: that the model *uses* that state (decodable is not
causal), or anything about AF1's own computation: under AF1 intermediate tokens read no other
token, so they hold no partial result by construction. AF1 faithfulness on the three-operand tasks
says whether the full model's intermediate partial results are *needed*; this probe says whether
they *exist*.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..mechanisms.traced import residual_state

RIDGE_LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def site_offsets(tokenizer, prompts: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
    """For each prompt, the position of the last token of ``prefix``, counted from the end
    (``-1`` is the prompt's last token). ``-0`` never occurs; a prefix that does not tokenize as
    a prefix of its prompt gives ``0`` (the prompt is then skipped)."""
    full = tokenizer(list(prompts))["input_ids"]
    head = tokenizer(list(prefixes))["input_ids"]
    offsets = np.zeros(len(prompts), dtype=np.int64)
    for i, (f, h) in enumerate(zip(full, head)):
        if len(h) <= len(f) and f[:len(h)] == h:
            offsets[i] = len(h) - len(f) - 1
    return offsets


def collect_states(model, prompts: Sequence[str], offsets: np.ndarray, layers: Sequence[int],
                   batch_size: int = 32, backend_for=None) -> np.ndarray:
    """Clean residuals ``h_k`` at one position per prompt: ``(N, len(layers), D)`` float32.

    ``offsets`` counts from the end (left padding keeps the end aligned); ``h_L`` is the last
    layer's output before the final norm. ``backend_for(label)`` gives an nnsight backend per
    trace (a remote client's, for NDIF); ``None`` runs locally. What a server returns is
    checked (detached, on the CPU, float, ``(B, len(layers), D)``) before use.
    """
    from ..executors.remote.received import received_tensor

    hidden = model.hf.config.get_text_config().hidden_size
    out = np.zeros((len(prompts), len(layers), hidden), dtype=np.float32)
    batches = model.encode_batches(list(prompts), batch_size)
    for n, (indices, enc) in enumerate(batches, 1):
        columns = torch.as_tensor(enc["input_ids"].shape[1] + offsets[indices], dtype=torch.long)
        backend = backend_for(f"probe states, batch {n} of {len(batches)}") if backend_for \
            else None
        states = _states_trace(model.lm, model.sites, backend, enc, columns, list(layers))
        out[indices] = received_tensor(states, "the probe's states",
                                       (len(indices), len(layers), hidden), "float").numpy()
    return out


def _states_trace(lm, sites, backend, enc, columns, layers):
    """One trace saving ``h_k[row, columns[row]]`` for each layer: ``(B, len(layers), D)``.

    Takes plain arguments only: on NDIF the block ships with exactly the values it names."""
    rows = torch.arange(len(columns))
    with torch.no_grad(), lm.trace(enc, backend=backend):
        picked = []
        for k in layers:
            h = residual_state(sites, k)
            picked.append(h[rows, columns.to(h.device)].float().cpu())
        states = torch.stack(picked, 1).save()
    return states


def _standardise(train, test):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def _ridge_fit_predict(x_train, y_train, x_test):
    """Ridge regression (dual form, N << D) with the strength chosen by exact leave-one-out
    error on the training points only."""
    a, b = _standardise(x_train, x_test)
    y_mean = y_train.mean()
    centred = y_train - y_mean
    eigval, eigvec = np.linalg.eigh(a @ a.T)
    proj = eigvec.T @ centred
    best = None
    for lam in RIDGE_LAMBDAS:
        shrink = eigval / (eigval + lam)
        fitted = eigvec @ (shrink * proj)
        leverage = (eigvec ** 2) @ shrink
        loo = ((centred - fitted) / (1 - leverage)) ** 2
        if best is None or loo.mean() < best[0]:
            best = (loo.mean(), lam)
    alpha = eigvec @ (proj / (eigval + best[1]))
    return b @ (a.T @ alpha) + y_mean


def cross_validated(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold ridge predictions of ``y`` (``(N,)``) from ``x`` (``(N, D)``): every point is
    predicted by a probe that never saw it."""
    order = np.random.default_rng(seed).permutation(len(y))
    pred = np.zeros(len(y), dtype=np.float64)
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        pred[test] = _ridge_fit_predict(x[train], y[train], x[test])
    return pred


def probe_scores(x: np.ndarray, value: np.ndarray, seed: int = 0) -> dict:
    """R^2 and exact accuracy for ``value``, accuracy for its parity, and the parity accuracy of
    a probe trained on shuffled labels (chance as measured)."""
    parity = np.where(value % 2 == 1, 1.0, -1.0)
    pred_value = cross_validated(x, value, seed=seed)
    pred_parity = cross_validated(x, parity, seed=seed)
    shuffled = np.random.default_rng(seed + 1).permutation(parity)
    pred_shuffled = cross_validated(x, shuffled, seed=seed)
    ss_res = ((pred_value - value) ** 2).sum()
    ss_tot = ((value - value.mean()) ** 2).sum()
    return {
        "value_r2": float(1 - ss_res / ss_tot) if ss_tot > 0 else None,
        "value_exact": float((np.rint(pred_value) == value).mean()),
        "parity_accuracy": float((np.sign(pred_parity) == parity).mean()),
        "parity_shuffled_accuracy": float((np.sign(pred_shuffled) == shuffled).mean()),
        "parity_majority": float(max((parity > 0).mean(), (parity < 0).mean())),
    }


def partial_result_probe(model, dataset, batch_size: int = 32, seed: int = 0,
                         backend_for=None) -> dict:
    """Run the probe on a three-operand task data set (any style with ``{A}``, ``{B}`` before
    ``{C}``). One prompt per operand pair is read (the site's state depends on no later token).

    Returns ``{"site", "partial", "n_pairs", "layers", "scores": [per-layer dict],
    "control_operands_h0": dict}``.
    """
    template = dataset[0]["template"]
    if "{C}" not in template or template.index("{B}") > template.index("{C}"):
        raise ValueError("the partial-result probe needs a three-operand template with {A} and "
                         "{B} before {C}")
    ops = dataset[0]["operators"]
    first = {}
    for i, (x, y) in enumerate(zip(dataset["A"], dataset["B"])):
        first.setdefault((x, y), i)
    pairs = sorted(first)
    prompts = [dataset[first[p]]["prompt"] for p in pairs]
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    from tasks import task_metadata

    # The text put before the template (the BOS, where the data set needed one as its sink).
    lead = task_metadata(dataset).get("sink", {}).get("prefix", "")
    before_c = lead + template.split("{C}")[0]
    before_b = lead + template.split("{B}")[0]
    tok = model.tokenizer
    site = site_offsets(tok, prompts, [before_c.format(A=x, B=y) for x, y in zip(a, b)])
    at_a = site_offsets(tok, prompts, [before_b.split("{A}")[0] + str(x) for x in a])
    at_b = site_offsets(tok, prompts, [before_b.format(A=x) + str(y) for x, y in zip(a, b)])
    keep = np.flatnonzero((site < 0) & (at_a < 0) & (at_b < 0))
    if len(keep) < 20:
        raise ValueError(f"only {len(keep)} operand pairs have locatable tokens; the probe "
                         "needs at least 20")
    prompts = [prompts[i] for i in keep]
    layers = list(range(model.n_layers + 1))
    states = collect_states(model, prompts, site[keep], layers, batch_size, backend_for)
    operand_a = collect_states(model, prompts, at_a[keep], [0], batch_size, backend_for)[:, 0]
    operand_b = collect_states(model, prompts, at_b[keep], [0], batch_size, backend_for)[:, 0]
    value = (a + b if ops[0] == "+" else a - b)[keep].astype(np.float64)
    scores = [{"layer": k, **probe_scores(states[:, j], value, seed)}
              for j, k in enumerate(layers)]
    control = probe_scores(np.concatenate([operand_a, operand_b], 1), value, seed)
    return {"site": "last token before C", "partial": f"A{ops[0]}B", "n_pairs": len(keep),
            "layers": layers, "scores": scores, "control_operands_h0": control}
