"""Shared by the remote tests (test_remote*.py): data, cells, comparisons, transports that
record or fail on purpose, and the separate-process NDIF worker (remote_worker.py).

Their fixtures (``llama``, ``data``, ``llama_table``, ``llama_reference``) are in conftest.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteError

from interventions import AF1Plan
from interventions.executors.remote.client import RemoteClient
from interventions.executors.remote.ndif_server import NDIF_INSTALL, ndif_missing
from interventions.executors.remote.transport import LocalTransport
from interventions.mechanisms.plan import Intervention

WORKER = Path(__file__).with_name("remote_worker.py")
N_LAYERS = 4


# Tests of NDIF's own server code. Skipped where it is not installed, except in CI
# (AF1_REQUIRE_NDIF=1, set by .ci/run), where its absence must fail loudly.
needs_ndif = pytest.mark.skipif(
    ndif_missing() is not None and os.environ.get("AF1_REQUIRE_NDIF") != "1",
    reason=f"NDIF's server code is not installed ({NDIF_INSTALL})")


def arithmetic(tokenizer, n=30):
    """``Calculate: A+B=`` prompts of two token lengths (so several batches) and answers."""
    pairs = [(a, b) for a in (3, 7, 12, 25, 41) for b in range(1, 7)][:n]
    prompts = [f"Calculate: {a}+{b}=" for a, b in pairs]
    answers = [tokenizer.convert_tokens_to_ids(str(a + b)[0]) for a, b in pairs]
    return prompts, answers


def digit_prompts_with_templates(tokenizer, n=24):
    """Prompts of two templates (the same first token, the sink) with each prompt's template
    as its CAMA group: ``(prompts, answers, groups)``."""
    pairs = [(a, b) for a in (3, 7, 12, 25) for b in range(1, 7)][:n // 2]
    prompts, answers, groups = [], [], []
    for group, template in enumerate(("Calculate: {}+{}=", "Calculate {} plus {}: ")):
        for a, b in pairs:
            prompts.append(template.format(a, b))
            answers.append(tokenizer.convert_tokens_to_ids(str(a + b)[0]))
            groups.append(group)
    return prompts, answers, groups


def af1_cells(table):
    """A grid, the necessity interventions and the AF1 variants, with the table layer each
    needs: ``[(tag, plan_or_intervention, cama)]``."""
    plans = [AF1Plan(w, t) for w in range(N_LAYERS) for t in (1, 2) if w + t <= N_LAYERS]
    plans += [AF1Plan(2, 1, sink=False), AF1Plan(2, 1, wait_ablation="zero"),
              AF1Plan(2, 1, wait_ablation="position_mean"), AF1Plan(1, 2, transfer_peek="all")]
    cells = [(p, p, table.for_intervention(p.intervention(N_LAYERS))) for p in plans]
    necessity = [Intervention({k: ("sink_self", "all")}) for k in range(N_LAYERS)]
    return cells + [(iv, iv, None) for iv in necessity]


def intervention_of(plan):
    return plan if isinstance(plan, Intervention) else plan.intervention(N_LAYERS)


def assert_same(expected, got):
    """Identical predictions; answer logits within float32 rounding of the tiny models'
    O(1) logits (both paths run the same float32 ops, batched alike)."""
    assert np.array_equal(expected.pred_ids, got.pred_ids)
    np.testing.assert_allclose(expected.answer_logits, got.answer_logits, rtol=1e-5, atol=1e-5)


def assert_tables_close(expected, got):
    """Same keys and counts; means within float32 rounding (the sums are float64 on both
    sides, added in another order)."""
    assert expected.layers == got.layers
    assert torch.equal(expected.keys, got.keys) and torch.equal(expected.counts, got.counts)
    torch.testing.assert_close(got.means, expected.means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.position_means, expected.position_means, rtol=1e-5, atol=1e-6)
    assert set(got.metadata) == set(expected.metadata)


class Recording:
    """A transport that keeps every request blob and counts calls, around another transport;
    ``failures`` are raised, one per call, before the inner transport is reached."""

    def __init__(self, inner, failures=()):
        self.inner = inner
        self.name, self.host = "recording", None
        self.failures = list(failures)
        self.blobs = []
        self.calls = {"send": 0, "submit": 0, "poll": 0}

    def _maybe_fail(self):
        if self.failures:
            raise self.failures.pop(0)

    def send(self, blob, compress):
        self.calls["send"] += 1
        self.blobs.append(blob)
        self._maybe_fail()
        return self.inner.send(blob, compress)

    def submit(self, blob, compress):
        self.calls["submit"] += 1
        self.blobs.append(blob)
        self._maybe_fail()
        return self.inner.submit(blob, compress)

    def poll(self, job_id, compress):
        self.calls["poll"] += 1
        return self.inner.poll(job_id, compress)


def quiet_client(model, transport, **options):
    """A client that logs nothing and records its waits instead of sleeping (the backoff's
    jitter at its top, so each wait is the full exponential step)."""
    sleeps = []
    options = {"jitter": lambda: 1.0, **options}
    client = RemoteClient(model, transport=transport, log=lambda message: None,
                          sleep=sleeps.append, **options)
    return client, sleeps


def trusted(model):
    """NDIF's in-process path on ``model``: for tests of the client, where the server's path
    does not matter (the sandbox's are in test_remote_sandbox.py)."""
    return LocalTransport.for_model(model, server_path="trusted")


class WorkerTransport:
    """Sends each request to tests/remote_worker.py, an NDIF worker process of its own
    (``keep_source_cache``: one that never resets nnsight's source caches)."""

    name, host = "worker", None

    def __init__(self, checkpoint, directory, attn, dtype, keep_source_cache=False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = open(self.directory / "worker.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(checkpoint), attn, dtype]
            + (["--keep-source-cache"] if keep_source_cache else []), cwd=self.directory,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = self.proc.stdout.readline().split()
        self.sent = 0

    def send(self, blob, compress):
        self.sent += 1
        request = self.directory / f"{self.sent}.request"
        result = self.directory / f"{self.sent}.result"
        request.write_bytes(blob)
        self.proc.stdin.write(f"{request} {result} {int(compress)}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the worker died: " + (self.directory / "worker.log").read_text())
        answer = json.loads(line)
        if not answer["ok"]:
            raise RemoteError(answer["error"])
        return result.read_bytes(), None

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()
