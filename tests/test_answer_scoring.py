"""Answers of several tokens: first-token and full (teacher-forced) scoring through every
executor, against plain hooks on prompts expanded by hand; and the token ids executors feed."""

import json

import numpy as np
import pytest

import reference
import run
import tiny
from conftest import wrap_tiny
from interventions import AF1Plan, NnsightExecutor, build_cama_table
from interventions.executors.base import Predictions
from interventions.executors.fast import FastExecutor
from interventions.executors.remote.client import RemoteClient
from interventions.executors.remote.executor import RemoteExecutor
from interventions.executors.remote.transport import LocalTransport
from interventions.pipeline.results import read_results
from interventions.pipeline.scoring import score
from tasks import build_task, expand_answer_prefixes, load_task, task_fingerprint

PLANS = [(1, 1), (2, 1), (1, 2), (3, 1)]


@pytest.fixture(scope="module")
def model(digit_tok):
    return wrap_tiny("llama", digit_tok, "sdpa")


@pytest.fixture(scope="module")
def base(digit_tok):
    """Sums of operands 3..60 in the symbolic style: answers of 1-3 digit tokens, prompts of
    several lengths, and a BOS put first (the digit tokenizer adds none)."""
    build = build_task(digit_tok, "A+B", style="symbolic", operand_range=(3, 60), n_prompts=10,
                       seed=1)
    assert build.bos_prepended
    assert {len(ids) for ids in build.dataset["answer_token_ids"]} == {1, 2, 3}
    return build.dataset


def by_hand(base, tokenizer):
    """Teacher forcing written out for a tokenizer with one token per character:
    ``(prompts, target ids, source rows)``."""
    prompts, targets, source = [], [], []
    for i, row in enumerate(base):
        for step, digit in enumerate(row["answer"]):
            prompts.append(row["prompt"] + row["answer"][:step])
            targets.append(tokenizer.convert_tokens_to_ids(digit))
            source.append(i)
    return prompts, targets, source


def remote_executor(model, prompts, answers):
    client = RemoteClient(model, transport=LocalTransport.for_model(model),
                          log=lambda message: None, sleep=lambda seconds: None)
    return RemoteExecutor(model, prompts, answers, batch_size=4, cells_per_request=8,
                          client=client)


def executors(model, prompts, answers):
    return {"nnsight": NnsightExecutor(model, prompts, answers, batch_size=4),
            "fast": FastExecutor(model, prompts, answers, batch_size=4),
            "remote-local": remote_executor(model, prompts, answers)}


def test_expansion_is_teacher_forcing(base, digit_tok):
    ds = expand_answer_prefixes(base, digit_tok)
    prompts, targets, source = by_hand(base, digit_tok)
    assert ds["prompt"] == prompts and ds["answer_token_id"] == targets
    assert ds["source_row"] == source


def test_full_scoring_equals_hooks_on_expanded_prompts(model, base, digit_tok):
    ds = expand_answer_prefixes(base, digit_tok)
    prompts, targets, source = by_hand(base, digit_tok)
    # The table is built on the expanded prompts, keyed by their lengths.
    table = build_cama_table(model, ds["prompt"], task_fingerprint(ds), batch_size=4,
                             progress=False)
    cama = reference.brute_force_cama(model.hf, digit_tok, prompts)
    assert len(table.keys) == len({key[1:] for key in cama})

    def hook_predictions(rules, replace):
        preds = []
        for prompt in prompts:  # one prompt at a time: no padding, nothing shared
            enc = digit_tok([prompt], return_tensors="pt")
            logits = reference.af1_logits_with_hooks(model.hf, enc, rules, replace, cama)
            preds.append(int(logits[0, -1].argmax()))
        return np.array(preds)

    clean = hook_predictions({}, None)
    expected = {plan: hook_predictions(reference.af1_rules(model.n_layers, *plan), plan[0])
                for plan in PLANS}
    for name, executor in executors(model, ds["prompt"], ds["answer_token_id"]).items():
        full = executor.clean()
        assert np.array_equal(full.pred_ids, clean), name
        got = dict(executor.run_many([(plan, AF1Plan(*plan), table.layer(plan[0]))
                                      for plan in PLANS]))
        for plan in PLANS:
            assert np.array_equal(got[plan].pred_ids, expected[plan]), (name, plan)
            # A prompt counts only when every one of its answer tokens is right.
            full_ok = [all(clean[r] == targets[r] for r in range(len(source)) if source[r] == i)
                       for i in range(len(base))]
            af1_ok = [all(expected[plan][r] == targets[r] for r in range(len(source))
                          if source[r] == i) for i in range(len(base))]
            both = sum(f and a for f, a in zip(full_ok, af1_ok))
            row = score(full, got[plan], ds["answer_token_id"], np.array(source))
            assert row["n_prompts"] == len(base)
            assert row["n_full_correct"] == sum(full_ok)
            assert row["n_af1_correct"] == sum(af1_ok)
            assert row["n_af1_correct_of_full"] == both
            assert row["faithfulness"] == (both / sum(full_ok) if sum(full_ok) else None)


def test_full_scoring_needs_every_token_and_first_scoring_only_the_first():
    # Three prompts with answers of 2, 1 and 3 tokens.
    answers = np.array([5, 6, 7, 8, 9, 10])
    prompt_of = np.array([0, 0, 1, 2, 2, 2])
    full = Predictions(answers.copy(), np.zeros(6, dtype=np.float32))
    af1 = Predictions(np.array([5, 0, 7, 8, 9, 0]), np.zeros(6, dtype=np.float32))
    row = score(full, af1, answers, prompt_of)
    assert (row["n_prompts"], row["n_full_correct"], row["n_af1_correct_of_full"]) == (3, 3, 1)
    assert row["faithfulness"] == pytest.approx(1 / 3) and row["af1_accuracy"] == 1 / 3
    first = np.array([0, 2, 3])  # the rows of step 0
    row = score(Predictions(full.pred_ids[first], full.answer_logits[first]),
                Predictions(af1.pred_ids[first], af1.answer_logits[first]), answers[first])
    assert row["faithfulness"] == 1.0  # every first token is right


def test_executors_feed_the_data_sets_input_ids(model, base, digit_tok):
    for ds in (base, expand_answer_prefixes(base, digit_tok)):
        expected = ds["input_ids"]
        for name, executor in executors(model, ds["prompt"], ds["answer_token_id"]).items():
            seen = {}
            if name == "fast":
                for batch in executor.batches:
                    for j, i in enumerate(batch.indices.tolist()):
                        seen[i] = batch.input_ids[j][batch.real[j]].tolist()
            else:
                for indices, enc in executor.batches:
                    for j, i in enumerate(indices):
                        seen[i] = enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist()
            assert [seen[i] for i in range(len(ds))] == expected, name


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, digit_tok):
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), digit_tok)


@pytest.mark.parametrize("answer", ["first", "full"])
def test_run_scores_multi_token_answers_and_saves_what_recomputes_them(tiny_dir, tmp_path,
                                                                        capsys, answer):
    out = tmp_path / answer
    code = run.main(["--model", tiny_dir, "--l-wait", "1-2", "--l-transfer", "1",
                     "--operand-range", "3-60", "--n-prompts", "12", "--answer", answer,
                     "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    # Full scoring is a setting of its own (pipeline.results.setting_name).
    name = "A+B-calculate" + ("" if answer == "first" else "@float32-sdpa-local-full")
    entry = manifest["tasks"][name]
    assert entry["answer_scoring"] == answer and entry["answer_tokens"] == "any"
    assert entry["n_prompts"] == 12 and max(map(int, entry["n_answer_tokens"])) > 1
    assert entry["cama_keys"]["n_keys"] > 0 and entry["sink"]["bos_prepended"] is False
    data = load_task(out / entry["data_dir"])
    n_rows = sum(int(k) * v for k, v in entry["n_answer_tokens"].items()) if answer == "full" else 12
    assert len(data) == entry["n_evaluated_rows"] == n_rows
    source = data["source_row"] if answer == "full" else list(range(12))
    answers = np.array(data["answer_token_id"])
    full_ok = [all(data["full_correct"][r] for r in range(n_rows) if source[r] == i)
               for i in range(12)]
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["answer_scoring"] == answer and row["n_prompts"] == 12
        assert row["dataset_fingerprint"] == entry["dataset_fingerprint"]
        af1_ok = [all(row["pred_ids"][r] == answers[r] for r in range(n_rows) if source[r] == i)
                  for i in range(12)]
        assert row["n_full_correct"] == sum(full_ok)
        assert row["n_af1_correct"] == sum(af1_ok)
        assert row["n_af1_correct_of_full"] == sum(f and a for f, a in zip(full_ok, af1_ok))
