"""Benchmark: the fast AF1 executor against the nnsight reference path, on SmolLM2 on the CPU.

Run ``python benchmarks/bench_fast.py`` (about 90 s on 2 quiet CPU cores). In one process, on
the default task (``A+B``, style ``calculate``: 36 prompts of 7 tokens), float32, sdpa, it
measures side by side and prints as a table:

(a) one configuration (``L_wait=20, L_transfer=3``), ``run()`` of each executor, warm, the
    median over ``--repeats`` interleaved runs;
(b) the whole grid, ``L_wait 0..29 x L_transfer 1..4`` without the cells where
    ``L_wait + L_transfer > 30`` (114 cells), ``run_many()`` of each executor one ``L_wait`` at a
    time, back to back (the reference once, the fast executor the median of ``--repeats``),
    summed; the fast executor's ``run_many()`` over the whole grid in one call; and how far the
    results differ;
(c) the FLOP limit of each: reference FLOPs / fast FLOPs, counted analytically (below);
(d) building the CAMA table: prompts/s, tokens/s, and the peak resident memory the build adds
    (RSS sampled every millisecond by a thread; torch's CPU allocator is invisible to
    ``tracemalloc``) against the table's size in bytes.

FLOP counting. A token-layer is one token through one decoder layer; it costs ``2 * W`` FLOPs
where ``W`` is the number of weights in the layer's matrices (attention projections and MLP;
norms, biases, rotary and the attention scores are left out: ``T * D`` multiply-adds per
token-layer against ``W`` = 3.5M, under 1% at ``T = 7``). A logit vector costs ``2 * V * D``.
* Reference, per cell: every prompt's ``T`` tokens through all ``L`` layers, and the head on all
  ``T`` positions (Hugging Face computes the logits of every position): ``L*T`` token-layers +
  ``T`` logit vectors per prompt.
* Fast, per ``L_wait`` group of cells (``L_transfer`` values ``S``), per prompt: ``T_pad *
  max(S)`` token-layers over all positions of its padded batch (the transfer layers, run once for
  the group; no wait layers), then per cell ``L - L_wait - L_transfer`` token-layers of the
  last token alone and one logit vector.
Both are timed warm, and one-off costs are left out of both counts: the reference's and the fast
executor's tokenization, and the fast executor's sink pass (``L`` token-layers once per distinct
sink token, cached for every later cell; its cold first call is printed separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interventions import AF1Plan, NnsightExecutor, build_cama_table, load_model  # noqa: E402
from interventions.executors.fast import FastExecutor  # noqa: E402
from tasks import build_task, task_fingerprint  # noqa: E402

SINGLE = (20, 3)
L_TRANSFERS = (1, 2, 3, 4)


class PeakRss:
    """Largest resident set size seen while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def added(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def weights_per_token_layer(model) -> int:
    layer = model.adapter.layer_modules(model.hf)[0]
    return sum(p.numel() for p in layer.parameters() if p.dim() == 2)


def reference_flops(model, executor: NnsightExecutor, cells) -> float:
    """FLOPs of the reference path over ``cells`` (see the module docstring)."""
    w, head = weights_per_token_layer(model), model.hf.get_output_embeddings().weight.numel()
    tokens = sum(len(indices) * enc["input_ids"].shape[1] for indices, enc in executor.batches)
    return len(cells) * 2 * tokens * (model.n_layers * w + head)


def fast_flops(model, executor: FastExecutor, cells) -> float:
    """FLOPs of the fast path over ``cells`` of AF1 plans (see the module docstring)."""
    w, head = weights_per_token_layer(model), model.hf.get_output_embeddings().weight.numel()
    n_layers = model.n_layers
    padded_tokens = sum(b.input_ids.numel() for b in executor.batches)
    n_prompts = executor.n_prompts
    groups: dict[int, list[int]] = {}
    for _, plan, _ in cells:
        groups.setdefault(plan.l_wait, []).append(plan.l_transfer)
    token_layers = logits = 0
    for l_wait, l_transfers in groups.items():
        token_layers += padded_tokens * max(l_transfers)
        token_layers += n_prompts * sum(n_layers - l_wait - t for t in l_transfers)
        logits += n_prompts * len(l_transfers)
    return 2 * (token_layers * w + logits * head)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of (a) and of the fast grid (median reported)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    model = load_model("smollm2", device="cpu", dtype="float32", attn_implementation="sdpa")
    build = build_task(model.tokenizer, "A+B", style="calculate")
    prompts = build.dataset["prompt"]
    answers = build.dataset["answer_token_id"]
    n_tokens = sum(build.dataset["n_tokens"])
    fingerprint = task_fingerprint(build.dataset)
    n_layers = model.n_layers

    # (d) first, so that the memory it adds is not hidden by the executors' high-water mark,
    # after one clean forward pass: the weights are memory-mapped and paged in by the first.
    with torch.no_grad():
        model.hf(**model.encode(prompts[:1]))
    cama_times, cama_peaks = [], []
    for _ in range(3):
        with PeakRss() as rss:
            cama_s, table = timed(lambda: build_cama_table(model, prompts, fingerprint,
                                                           progress=False))
        cama_times.append(cama_s)
        cama_peaks.append(rss.added)
    cama_s = statistics.median(cama_times)
    accumulator = len(table.layers) * len(table.keys) * table.means.shape[-1] * 8
    # The clean traces run the whole model, head included: its logits are one batch's largest
    # activation.
    batch_ids = model.encode_batches(prompts, 32)[0][1]["input_ids"]
    batch_logits = batch_ids.numel() * model.hf.config.vocab_size * 4

    cama_of = {w: table.layer(w) for w in range(1, n_layers)}
    plan = AF1Plan(*SINGLE)
    cama = cama_of[SINGLE[0]]
    reference = NnsightExecutor(model, prompts, answers)
    reference.run(plan, cama)  # warm-up
    cold_s, fast = timed(lambda: FastExecutor(model, prompts, answers))
    cold_s += timed(lambda: fast.run(plan, cama))[0]  # tokenization and the sink pass included

    # (a) one configuration.
    ref_single, fast_single = [], []
    for _ in range(args.repeats):
        ref_single.append(timed(lambda: reference.run(plan, cama))[0])
        fast_single.append(timed(lambda: fast.run(plan, cama))[0])
    ref_single_s, fast_single_s = statistics.median(ref_single), statistics.median(fast_single)

    # (b) the whole grid: one run_many() of each, and the same grid timed per L_wait group,
    # reference and fast back to back (CPU time shared with other processes hits both alike).
    cells = [((w, t), AF1Plan(w, t), cama_of.get(w)) for w in range(n_layers)
             for t in L_TRANSFERS if w + t <= n_layers]
    fast_whole_s, fast_preds = timed(lambda: dict(fast.run_many(cells)))
    ref_preds, ref_grid_s, fast_grid_s = {}, 0.0, 0.0
    for l_wait in range(n_layers):
        group = [cell for cell in cells if cell[1].l_wait == l_wait]
        ref_s, preds = timed(lambda: dict(reference.run_many(group)))
        ref_preds.update(preds)
        ref_grid_s += ref_s
        fast_grid_s += statistics.median(timed(lambda: dict(fast.run_many(group)))[0]
                                         for _ in range(args.repeats))
    same_preds = sum(np.array_equal(ref_preds[tag].pred_ids, fast_preds[tag].pred_ids)
                     for tag, _, _ in cells)
    max_diff = max(float(np.abs(ref_preds[tag].answer_logits - fast_preds[tag].answer_logits)
                         .max()) for tag, _, _ in cells)

    # (c) FLOP limits.
    single_cells = [(SINGLE, plan, cama)]
    single_limit = (reference_flops(model, reference, single_cells)
                    / fast_flops(model, fast, single_cells))
    grid_limit = reference_flops(model, reference, cells) / fast_flops(model, fast, cells)
    single_speedup = ref_single_s / fast_single_s
    grid_speedup = ref_grid_s / fast_grid_s

    rows = [
        ("(a) one config L_wait=20, L_transfer=3", ref_single_s, fast_single_s, single_speedup,
         single_limit),
        (f"(b) grid, {len(cells)} cells", ref_grid_s, fast_grid_s, grid_speedup, grid_limit),
    ]
    print(f"SmolLM2-135M, CPU ({torch.get_num_threads()} threads), float32, sdpa; default task "
          f"{len(prompts)} prompts x {n_tokens // len(prompts)} tokens; repeats={args.repeats}")
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    print()
    print(f"| {'measurement':<40} | {'reference':>10} | {'fast':>8} | {'speedup':>7} "
          f"| {'FLOP limit (c)':>14} | {'speedup / limit':>15} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 16}|{'-' * 17}|")
    for label, ref_s, fast_s, speedup, limit in rows:
        print(f"| {label:<40} | {ref_s:>9.3f}s | {fast_s:>7.3f}s | {speedup:>6.2f}x "
              f"| {limit:>13.2f}x | {speedup / limit:>15.2f} |")
    print()
    print(f"(a) the fast executor cold (construction, tokenization, sink pass, first run): "
          f"{cold_s:.3f}s")
    print(f"(b) the fast executor's run_many() over all {len(cells)} cells in one call: "
          f"{fast_whole_s:.3f}s")
    print(f"(b) exactness: identical predictions in {same_preds}/{len(cells)} cells; max |answer "
          f"logit difference| {max_diff:.2e}")
    print(f"(d) CAMA table build ({len(prompts)} prompts, {n_tokens} tokens, {len(table.layers)} "
          f"layers, median of {len(cama_times)}): {cama_s:.3f}s = "
          f"{len(prompts) / cama_s:.1f} prompts/s, {n_tokens / cama_s:.0f} tokens/s; peak RSS "
          f"added per build {', '.join(f'{b / 2**20:.1f}' for b in cama_peaks)} MiB; table "
          f"{table.nbytes / 2**20:.2f} MiB ({table.nbytes} bytes; {len(table.keys)} keys x "
          f"{table.means.shape[-1]} x {len(table.layers)} layers, float32), float64 accumulator "
          f"{accumulator / 2**20:.2f} MiB, all-position logits of one batch of "
          f"{len(batch_ids)}x{batch_ids.shape[1]} tokens {batch_logits / 2**20:.1f} MiB")
    print(f"single_speedup={single_speedup:.2f} grid_speedup={grid_speedup:.2f} "
          f"single_flop_limit={single_limit:.2f} grid_flop_limit={grid_limit:.2f}")


if __name__ == "__main__":
    main()
