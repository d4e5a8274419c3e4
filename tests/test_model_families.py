"""The model families beyond the fully tested ones, and what loading a family decides.

* Every architecture of ``tiny.MORE_ARCHITECTURES`` (Llama-like families whose quirks the full
  tests already cover, and Gemma-3's image-text class) against the independent hook
  implementation (windows, an all-allowed mask, AF1 plans) and the fast executor against the
  nnsight reference (a full grid, the clean model, necessity, no sink), in one compact test each.
* A rotary embedding that depends on the prompt length (Phi-3 ``longrope``): the fast path is
  exact while prompts fit the original context and falls back to the reference beyond it.
* Gemma-2 loads with eager attention unless told otherwise, locally and for NDIF; an explicit
  sdpa, an unsupported architecture and a bidirectional Gemma-3 are one ``error:`` line each.
* A sliding window shorter than a prompt: one warning line and a manifest entry.
* The remote path (requests serialized as for NDIF, run with the project hidden) equals the
  local path on sliding-window models.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, Gemma3TextConfig

import reference
import run
import tiny
from conftest import wrap_tiny
from interventions import UserError, load_model
from interventions.executors.fast import FastExecutor
from interventions.executors.reference import NnsightExecutor
from interventions.executors.remote.executor import RemoteExecutor, load_remote_model
from interventions.executors.remote.transport import LocalTransport
from interventions.mechanisms.adapters import ADAPTERS
from interventions.mechanisms.cama import build_cama_table
from interventions.mechanisms.models import wrap_model
from interventions.mechanisms.plan import AF1Plan, Intervention
from test_af1_exactness import nnsight_logits
from test_fast_executor import PROMPTS, answer_ids, check_cells, grid
from test_remote import af1_cells, arithmetic, assert_same, assert_tables_close, quiet_client


@pytest.mark.parametrize("arch", tiny.MORE_ARCHITECTURES)
def test_more_families_equal_the_references(arch, digit_tok):
    model = wrap_tiny(arch, digit_tok, "sdpa")
    n_layers = model.n_layers
    assert model.sites.windows == reference.model_windows(model.hf)
    # An explicit mask that allows what the model allows reproduces it bit for bit.
    enc, clean = nnsight_logits(model, PROMPTS)
    _, masked = nnsight_logits(model, PROMPTS, rules={k: ("all", "all") for k in range(n_layers)})
    real = enc["attention_mask"].bool()
    assert torch.equal(clean[real], masked[real])
    # AF1 in a padded batch equals plain hooks with masks built entry by entry.
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    cama = reference.brute_force_cama(model.hf, digit_tok, PROMPTS)
    for l_wait, l_transfer in [(0, 2), (1, 2), (2, 1)]:
        _, ours = nnsight_logits(model, PROMPTS, AF1Plan(l_wait, l_transfer), table)
        theirs = reference.af1_logits_with_hooks(
            model.hf, enc, reference.af1_rules(n_layers, l_wait, l_transfer), l_wait or None,
            cama)
        reference.assert_float32_close(model.hf, ours[real], theirs[real], enc,
                                       f"{arch} AF1({l_wait}, {l_transfer})")
    # The fast executor equals the reference path (the clean cell checks the head's scaling).
    cells = grid(n_layers, table) + [
        ("clean", Intervention({}), None),
        ("necessity", Intervention({1: ("sink_self", "all")}), None),
        ("no sink", AF1Plan(1, 2, sink=False), table.layer(1))]
    check_cells(model, cells, PROMPTS)


def _phi3_longrope(tokenizer, original_context):
    """The tiny Phi-3 with a ``longrope`` rotary whose short and long factors differ."""
    config = tiny.tiny_config("phi3", len(tokenizer))
    head_dim = config.hidden_size // config.num_attention_heads
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0] * (head_dim // 2),
                              "long_factor": [4.0] * (head_dim // 2),
                              "original_max_position_embeddings": original_context}
    config.original_max_position_embeddings, config.max_position_embeddings = original_context, 64
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return wrap_model(hf, tokenizer)


def test_rotary_that_depends_on_the_prompt_length_falls_back_beyond_its_context(digit_tok):
    """Phi-3 ``longrope`` switches to its long factors once a call's largest position reaches
    the original context: exact on the fast path below it (a token alone gets the short factors,
    as in its prompt); beyond it a token alone would not, so the reference path runs instead."""
    model = _phi3_longrope(digit_tok, original_context=15)
    assert model.adapter.rotary_length_limit(model.hf) == 15
    table = build_cama_table(model, PROMPTS, "test", progress=False)  # longest prompt: 15
    check_cells(model, grid(model.n_layers, table), PROMPTS)

    model = _phi3_longrope(digit_tok, original_context=8)
    answers = answer_ids(digit_tok, PROMPTS)
    fast = FastExecutor(model, PROMPTS, answers)
    assert fast.name == "nnsight" and "longer than 8 tokens" in fast.fallback_reason
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    expected = NnsightExecutor(model, PROMPTS, answers)
    for plan in (AF1Plan(1, 2), AF1Plan(0, 1)):
        cama = table.layer(plan.l_wait) if plan.l_wait else None
        assert_same(expected.run(plan, cama), fast.run(plan, cama))


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, digit_tok):
    return tiny.save_tiny_model("gemma2", tmp_path_factory.mktemp("gemma2"), digit_tok, "eager")


def run_cli(capsys, *argv):
    code = run.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gemma2_loads_with_eager_unless_told_otherwise(gemma2_dir, tmp_path, capsys):
    """transformers refuses Gemma-2 with sdpa: without --attn it loads eager and says so in
    one line; an explicit sdpa is one error line, locally, for NDIF and on the command line."""
    for loader in (load_model, load_remote_model):
        model = loader(gemma2_dir, dtype="float32")
        assert model.identity.attn_implementation == "eager"
        assert capsys.readouterr().out.splitlines() == [
            "[af1] note: gemma2 has no sdpa attention in transformers; loading it with eager"]
        with pytest.raises(UserError, match="gemma2 models cannot run sdpa attention"):
            loader(gemma2_dir, dtype="float32", attn_implementation="sdpa")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--model", gemma2_dir, "--attn", "sdpa", "--out", out)
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        "error: gemma2 models cannot run sdpa attention in transformers; use --attn eager, "
        "or leave --attn out"]


@pytest.mark.parametrize("config, expected", [
    (BloomConfig(n_layer=2, hidden_size=32, n_head=4), "unsupported architecture 'bloom'"),
    (Gemma3TextConfig(use_bidirectional_attention=True, num_hidden_layers=2, hidden_size=32,
                      intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8), "bidirectional attention"),
], ids=["unknown family", "Gemma-3 embedding model"])
def test_architectures_that_cannot_run_are_one_error_line(config, expected, tmp_path, capsys):
    config.save_pretrained(tmp_path / "model")  # refused from the config, before any weights
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--model", tmp_path / "model", "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not out.exists()
    assert expected in lines[0]
    if "unsupported" in expected:
        assert all(f"{name} (" in lines[0] for name in ADAPTERS)


def test_a_window_shorter_than_a_prompt_is_a_warning_and_in_the_manifest(digit_tok, tmp_path,
                                                                          capsys):
    model = wrap_tiny("mistral", digit_tok)  # every layer slides, window 4
    # The last query of a w-token prompt (position w - 1) still reads position 0; of w + 1 not.
    assert model.sink_outside_window(tiny.WINDOW) is None
    assert "5 tokens, more than the 4-token sliding window of layers 0, 1, 2, 3" in \
        model.sink_outside_window(tiny.WINDOW + 1)
    assert wrap_tiny("llama", digit_tok).sink_outside_window(100) is None

    checkpoint = tiny.save_tiny_model("mistral", tmp_path / "mistral", digit_tok, "sdpa")
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "--model", checkpoint, "--l-wait", "1",
                                "--l-transfer", "1", "--out", out)
    assert code == 0, err
    warnings = [line for line in stdout.splitlines() if line.startswith("[af1] warning:")]
    assert len(warnings) == 1 and "A+B-calculate: the longest prompt has 15 tokens" in warnings[0]
    entry = json.loads((out / "manifest.json").read_text())["tasks"]["A+B-calculate"]
    assert entry["sink_outside_window"] == warnings[0].split("A+B-calculate: ", 1)[1]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_remote_path_equals_local_path_with_sliding_windows(arch, digit_tok, tmp_path, capsys):
    """A weightless client model from a checkpoint directory, the server the same checkpoint
    with weights: every request is serialized as for NDIF and runs with the project hidden.
    Gemma-2 (eager, chosen by the remote loader) and Gemma-3 (sdpa, a rotary per layer type)
    slide every other layer, with windows shorter than the prompts."""
    attn = tiny.supported_attention(arch)
    checkpoint = tiny.save_tiny_model(arch, tmp_path / arch, digit_tok, attn)
    prompts, answers = arithmetic(digit_tok, n=12)
    local_model = load_model(checkpoint, dtype="float32", device="cpu")
    client_model = load_remote_model(checkpoint, dtype="float32")
    assert client_model.identity.attn_implementation == attn
    assert client_model.sites.windows == local_model.sites.windows == [tiny.WINDOW, None] * 2
    local = NnsightExecutor(local_model, prompts, answers, batch_size=8)
    local_table = build_cama_table(local_model, prompts, "fp", batch_size=8, progress=False)
    client, _ = quiet_client(client_model, LocalTransport.for_model(client_model))
    remote = RemoteExecutor(client_model, prompts, answers, batch_size=8, cells_per_request=16,
                            client=client)
    table = build_cama_table(client_model, prompts, "fp", local_table.layers, batch_size=8,
                             progress=False, runner=remote.cama_runner())
    assert_tables_close(local_table, table)
    assert_same(local.clean(), remote.clean())
    cells = af1_cells(table)
    got = dict(remote.run_many(cells))
    for tag, plan, cama in cells:
        intervention = plan.intervention(4) if isinstance(plan, AF1Plan) else plan
        assert_same(local.run(plan, local_table.for_intervention(intervention)), got[tag])
