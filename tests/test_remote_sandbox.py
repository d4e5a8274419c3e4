"""Every kind of remote request through NDIF's sandbox, the path an ordinary API key takes there
(``ndif`` 0.1.2: each request's block in a fresh runner process that cannot import this project,
against a weightless model, every activation crossing a socket to the forward pass here), to
the numbers the user sees: the self-check, CAMA sums with groups, sweep, necessity and
alternative cells in one request, the partial-result probe, several invokes in one trace.
(``run.py --remote --remote-backend local``, sandbox by default, is in test_remote_cli.py.)

One sandbox serves the module (runners are slow to start: each imports torch and nnsight).
"""

import numpy as np
import pytest
import torch
from remote_helpers import (N_LAYERS, af1_cells, assert_same, assert_tables_close,
                            digit_prompts_with_templates, needs_ndif, quiet_client)

from interventions import AF1Plan, NnsightExecutor, apply_af1, build_cama_table
from interventions import nnsight_internals as internals
from interventions.executors.remote.executor import RemoteExecutor
from interventions.executors.remote.selfcheck import run_self_check
from interventions.executors.remote.transport import LocalTransport
from interventions.pipeline.probe import partial_result_probe

pytestmark = needs_ndif


@pytest.fixture(scope="module")
def sandbox(llama):
    transport = LocalTransport.for_model(llama)  # the sandbox: the default path
    yield transport
    transport.close()


def test_the_sandbox_is_ndifs_own_and_the_default(sandbox):
    assert (sandbox.server_path, sandbox.server_code) == ("sandbox", "ndif 0.1.2")
    server = internals.wrapped_module(sandbox.actor.lm)
    assert not any(p.requires_grad for p in server.parameters())  # as NDIF's actor loads it


def test_self_check_grouped_cama_sums_and_every_kind_of_cell(sandbox, llama, digit_tok):
    """Self-check; a CAMA build on two templates (groups) that also carries the full model's
    predictions; sweep, necessity and alternative cells in one request: each equal to the
    local path (predictions identical, tables within float32 rounding)."""
    prompts, answers, groups = digit_prompts_with_templates(digit_tok)
    client, _ = quiet_client(llama, sandbox, max_retries=0)
    check = run_self_check(client, llama, prompts)
    assert check.passed and {c["check"]: c["value"] for c in check.compared}["all_allowed"] == 0

    layers = list(range(1, N_LAYERS + 1))
    remote = RemoteExecutor(llama, prompts, answers, batch_size=16, cells_per_request=64,
                            client=client, groups=groups)
    table = build_cama_table(llama, prompts, "fp", layers, batch_size=16, progress=False,
                             runner=remote.cama_runner(), groups=groups)
    expected = build_cama_table(llama, prompts, "fp", layers, batch_size=16, progress=False,
                                groups=groups)
    assert_tables_close(expected, table)
    assert len({int(g) for g in table.keys[:, 3]}) == 2  # both templates have keys of their own
    local = NnsightExecutor(llama, prompts, answers, batch_size=16, groups=groups)
    assert_same(local.clean(), remote.clean())

    cells = af1_cells(expected)
    got = dict(remote.run_many(cells))
    for tag, plan, cama in cells:
        assert_same(local.run(plan, cama), got[tag])
    kinds = [r.kind for r in client.stats.requests]
    assert kinds == ["selfcheck", "cama", "cells"]  # the clean pass rode on the CAMA build
    assert client.stats.to_dict()["server_path"] == "sandbox"


def test_the_partial_result_probe(sandbox, llama, digit_tok):
    """The probe's states come back through the sandbox detached, on the CPU, float32, and its
    scores equal the local path's."""
    from tasks import build_task

    dataset = build_task(digit_tok, task="A+B-C", style="calculate", n_prompts=120).dataset
    client, _ = quiet_client(llama, sandbox, max_retries=0)
    local = partial_result_probe(llama, dataset, batch_size=128)
    remote = partial_result_probe(llama, dataset, batch_size=128,
                                  backend_for=lambda label: client.backend("probe", label))
    assert [r.kind for r in client.stats.requests] == ["probe"] * 3
    assert remote["n_pairs"] == local["n_pairs"] >= 20
    for mine, theirs in zip(remote["scores"], local["scores"]):
        assert mine["parity_accuracy"] == theirs["parity_accuracy"]
        assert mine["value_exact"] == theirs["value_exact"]
        np.testing.assert_allclose(mine["value_r2"], theirs["value_r2"], rtol=1e-4, atol=1e-6)


def test_several_invokes_keep_their_own_masks(sandbox, llama, digit_tok):
    """Two invokes of equal length under sdpa (the model passes no mask, so each invoke's rows
    are found from the running mediators): in the sandbox, where the runner's interleaver has
    no batcher, each invoke's logits equal its own trace's."""
    first = digit_tok(["Calculate: 3+4=", "Calculate: 7+1="], return_tensors="pt")
    second = digit_tok(["Calculate: 5+2=", "Calculate: 2+2="], return_tensors="pt")
    plan = AF1Plan(0, 2)
    lm, sites = llama.lm, llama.sites

    def alone(enc):
        with torch.no_grad(), lm.trace(enc):
            apply_af1(sites, plan)
            logits = lm.lm_head.output[:, -1].save()
        return logits

    client, _ = quiet_client(llama, sandbox, max_retries=0)
    backend = client.backend("probe", "two invokes")
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(first):
            apply_af1(sites, plan)
            logits_first = lm.lm_head.output[:, -1].save()
        with tracer.invoke(second):
            apply_af1(sites, plan)
            logits_second = lm.lm_head.output[:, -1].save()
    # the same float32 ops on the same rows; batching two invokes may reorder reductions
    torch.testing.assert_close(backend.result["logits_first"], alone(first), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(backend.result["logits_second"], alone(second), rtol=1e-5,
                               atol=1e-5)
