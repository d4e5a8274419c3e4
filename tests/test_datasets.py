"""Any task as a data set (``--dataset``) and the built-in non-arithmetic families: loading from
every source, the sweep on a data set of two templates against the independent plain-hook
implementation (CAMA means per template, brute force), bad data sets, and the sparse-key
warning."""

import json
import pathlib

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import reference
import run
import tiny
from conftest import wrap_tiny
from interventions.mechanisms.cama import build_cama_table, sparse_keys_warning
from interventions.pipeline.results import read_results
from tasks import (FAMILIES, build_dataset_task, build_family, cama_groups, load_task,
                   read_dataset)
from tasks.families import IOI_NAMES, IOI_TEMPLATES, capitals_table

# Two templates of the same token length (one character per token) that share their first five
# positions: only template groups keep their CAMA means apart. Both start with "P", so the sink
# is one token without a BOS.
TEMPLATES = ("Pick {x} or {y}?", "Pick {x} if {y}.")
LETTERS = "abcde"


def records(with_template=True):
    rows = [{"prompt": t.format(x=x, y=y), "answer": x, "template": t}
            for t in TEMPLATES for x in LETTERS for y in LETTERS if x != y]
    if not with_template:
        for row in rows:
            del row["template"]
    return rows


def write(rows, path: pathlib.Path) -> str:
    """``rows`` in the format ``path``'s suffix names (a directory: save_to_disk)."""
    data = datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        data.to_parquet(str(path))
    elif path.suffix == ".csv":
        data.to_csv(str(path), index=False)
    elif path.suffix == ".jsonl":
        data.to_json(str(path), lines=True)
    else:
        data.save_to_disk(str(path))
    return str(path)


# -- loading ---------------------------------------------------------------------------------------


def test_every_source_gives_the_same_prompts(tmp_path, digit_tok):
    rows = records()
    sources = [write(rows, tmp_path / name) for name in ("saved", "t.parquet", "t.csv",
                                                           "t.jsonl")]
    # A DatasetDict on disk: --split picks one.
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows),
                          "train": datasets.Dataset.from_list(rows[:3])}).save_to_disk(
        str(tmp_path / "dict"))
    # A directory of data files, read by datasets.load_dataset(source, split) like a Hub id.
    (tmp_path / "hub_like").mkdir()
    write(rows, tmp_path / "hub_like" / "test.jsonl")
    builds = [build_dataset_task(digit_tok, s) for s in sources]
    builds.append(build_dataset_task(digit_tok, str(tmp_path / "dict"), split="test"))
    builds.append(build_dataset_task(digit_tok, str(tmp_path / "hub_like"), split="test"))
    assert len(read_dataset(str(tmp_path / "dict"), "train")) == 3
    for source in ("dict", "hub_like"):
        with pytest.raises(ValueError, match="split 'validation'|\"validation\""):
            read_dataset(str(tmp_path / source), "validation")
    want = [r["prompt"] for r in rows]
    for build in builds:
        data = build.dataset
        assert data["prompt"] == want and data["answer"] == [r["answer"] for r in rows]
        assert data["input_ids"] == digit_tok(want)["input_ids"]
        assert data["answer_token_id"] == digit_tok.convert_tokens_to_ids(data["answer"])
        assert build.n_dropped == 0 and not build.bos_prepended
        # Groups number the distinct templates in sorted order.
        assert cama_groups(data).tolist() == [sorted(TEMPLATES).index(r["template"])
                                              for r in rows]


def test_columns_split_and_sampling(tmp_path, digit_tok):
    rows = [{"question": r["prompt"], "reply": r["answer"]} for r in records()]
    path = write(rows, tmp_path / "renamed.jsonl")
    build = build_dataset_task(digit_tok, path, prompt_column="question", answer_column="reply",
                               n_prompts=7, seed=3)
    assert len(build.dataset) == 7 and build.n_sampled_out == len(rows) - 7
    assert set(build.dataset["prompt"]) <= {r["question"] for r in rows}
    assert cama_groups(build.dataset) is None  # no template column: grouped by length only
    assert build.task == "renamed" and build.style == "dataset"


def test_a_varying_first_token_gets_the_bos(tmp_path, digit_tok):
    rows = [{"prompt": f"{x}+{y}=", "answer": str(x + y)} for x in range(1, 5) for y in range(5)]
    build = build_dataset_task(digit_tok, write(rows, tmp_path / "sums.jsonl"))
    assert build.bos_prepended
    assert {ids[0] for ids in build.dataset["input_ids"]} == {digit_tok.bos_token_id}


# -- bad data sets: one error line each, nothing written --------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, digit_tok):
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), digit_tok)


BAD = {
    "missing column": ([{"prompt": "Pa", "reply": "b"}], "has no column 'answer'"),
    "empty": ([], "is empty"),
    "empty file": (None, "is empty"),
    "non-string answers": ([{"prompt": "Pa", "answer": 3}], "answers must be strings"),
    "answer that tokenizes to nothing": ([{"prompt": "Pa", "answer": "b"},
                                          {"prompt": "Pb", "answer": ""}],
                                         "tokenizes to nothing"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_sets_are_one_error_line_and_write_nothing(case, tmp_path, tiny_dir, capsys):
    rows, message = BAD[case]
    if rows is None:
        (path := tmp_path / "bad.csv").write_text("")
    elif rows:
        path = write(rows, tmp_path / "bad.jsonl")
    else:  # its columns and no rows
        (path := tmp_path / "bad.csv").write_text("prompt,answer\n")
    capsys.readouterr()
    out = tmp_path / "out"
    code = run.main(["--model", tiny_dir, "--dataset", str(path), "--l-wait", "1",
                     "--l-transfer", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_an_unreadable_source_is_one_error_line(tmp_path, tiny_dir, capsys):
    for source in (tmp_path / "nothing.txt", tmp_path / "no-such-dir"):
        if source.suffix:
            source.write_text("x")
        code = run.main(["--model", tiny_dir, "--dataset", str(source), "--out",
                         str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "cannot read" in err[0], err
    assert not (tmp_path / "out").exists()


# -- the sweep against the plain-hook implementation ------------------------------------------------


@pytest.mark.parametrize("executor", ["fast", "nnsight"])
def test_sweep_on_a_data_set_of_two_templates_equals_the_hooks(executor, tmp_path, tiny_dir,
                                                               digit_tok):
    """Every cell's predictions equal the hooks', whose CAMA means are brute-force means over
    each template's own prompts; the manifest reports the table's groups and key counts."""
    rows = records()
    out = tmp_path / "out"
    code = run.main(["--model", tiny_dir, "--dataset", write(rows, tmp_path / "two.parquet"),
                     "--l-wait", "1-2", "--l-transfer", "1-2", "--executor", executor,
                     "--out", str(out), "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["tasks"]["two-dataset"]
    assert entry["cama_groups"] == "template" and entry["cama_keys"]["n_groups"] == 2
    # Per template (20 prompts of 12 tokens): 10 keys of the template's own text (20 prompts
    # each) and 10 keys of x and y (5 letters, 4 prompts each).
    assert entry["cama_keys"]["n_keys"] == 40
    assert entry["cama_keys"]["prompts_per_key_min"] == 4
    assert entry["cama_keys"]["prompts_per_key_median"] == 12
    data = load_task(out / entry["data_dir"])
    assert data["prompt"] == [r["prompt"] for r in rows]

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    n_layers = hf.config.num_hidden_layers
    groups = [[i for i, r in enumerate(rows) if r["template"] == t] for t in TEMPLATES]
    means = [reference.brute_force_cama(hf, digit_tok, [rows[i]["prompt"] for i in members])
             for members in groups]
    # The templates' means differ where they share a (position, token, length) key: mixed,
    # they would be one mean.
    shared = set(means[0]) & set(means[1])
    assert any(not np.allclose(means[0][k], means[1][k]) for k in shared if k[2] > 5)
    results = read_results(out / "results.jsonl")
    assert len(results) == 4
    compared = 0
    for row in results:
        for members, table in zip(groups, means):
            enc = digit_tok([rows[i]["prompt"] for i in members], return_tensors="pt",
                            padding=True)
            with torch.no_grad():
                logits = reference.af1_logits_with_hooks(
                    hf, enc, *reference.hook_arguments(n_layers, row["l_wait"],
                                                       row["l_transfer"], {"cama": table}))[:, -1]
            top2 = logits.topk(2, -1).values
            bound = reference.float32_rounding_bound(hf, float(logits.abs().max()), 16)
            decided = (top2[:, 0] - top2[:, 1] > 2 * bound).numpy()
            got = np.array(row["pred_ids"])[members]
            assert np.array_equal(got[decided], logits.argmax(-1).numpy()[decided]), row
            compared += int(decided.sum())
    assert compared >= 0.9 * 4 * len(rows)


# -- the built-in families ------------------------------------------------------------------------


def test_capitals_come_from_the_shipped_table(digit_tok):
    table = capitals_table()
    assert len(table) == 80 and ("France", "Paris") in table
    build = build_family(digit_tok, "capitals")
    assert build.task == "capitals" and build.style == FAMILIES["capitals"]
    assert build.dataset["prompt"][0] == "The capital of France is"
    assert build.dataset["answer"][0] == " Paris"
    assert cama_groups(build.dataset) is None  # one template: grouped by length


def test_ioi_rows_copy_the_name_that_is_not_repeated(digit_tok):
    build = build_family(digit_tok, "ioi", n_prompts=50, seed=1)
    data = build.dataset
    assert build.n_candidates == len(IOI_TEMPLATES) * 16 * 15 * 4 * 4 and len(data) == 50
    for prompt, answer, template in zip(data["prompt"], data["answer"], data["template"]):
        names = [n for n in IOI_NAMES if f" {n} " in f" {prompt} "]
        assert answer.strip() in names and prompt.count(answer.strip()) == 1
        assert template in IOI_TEMPLATES
    assert set(cama_groups(data).tolist()) == {0, 1, 2}


def test_families_run_from_the_command_line(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    code = run.main(["--model", tiny_dir, "--tasks", "capitals,ioi", "--n-prompts", "24",
                     "--l-wait", "2", "--l-transfer", "1", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"]["ioi-names"]["cama_groups"] == "template"
    assert manifest["tasks"]["capitals-recall"]["cama_groups"] == "length"
    assert {(r["task"], r["style"]) for r in read_results(out / "results.jsonl")} == {
        ("capitals", "recall"), ("ioi", "names")}
    assert "CAMA keys" in (out / "figures" / "tables.md").read_text()
    code = run.main(["--model", tiny_dir, "--tasks", "capitals", "--template", "{A}+{B}=",
                     "--out", str(tmp_path / "other")])
    assert code == 2 and "--template applies to the arithmetic tasks" in capsys.readouterr().err


# -- sparse keys ------------------------------------------------------------------------------------


def test_warning_when_most_keys_average_one_prompt(digit_tok):
    model = wrap_tiny("llama", digit_tok, "eager")
    distinct = build_cama_table(model, ["Pab=", "Pcd=", "Pef="], "t", progress=False)
    # Keys: P and = (3 prompts each), six letters (1 each): 6 of 8 average one prompt.
    assert distinct.statistics["keys_of_one_prompt_share"] == 0.75
    assert "75% of the 8 CAMA keys average over a single prompt" in sparse_keys_warning(distinct)
    repeated = build_cama_table(model, ["Pab=", "Pab=", "Pcd=", "Pcd="], "t", progress=False)
    assert repeated.statistics["keys_of_one_prompt_share"] == 0.0
    assert sparse_keys_warning(repeated) is None


# -- template groups on the remote path ---------------------------------------------------------------


def test_remote_path_with_template_groups_equals_the_local_one(digit_tok):
    """The NDIF path (local backend: serialized, and executed by NDIF's own code where it is
    installed) builds the grouped table with the same sums, and evaluates cells with each
    batch's groups to the local executor's predictions."""
    from interventions.executors.reference import NnsightExecutor
    from interventions.executors.remote.client import RemoteClient
    from interventions.executors.remote.executor import RemoteExecutor
    from interventions.executors.remote.transport import LocalTransport
    from interventions.mechanisms.plan import AF1Plan

    model = wrap_tiny("llama", digit_tok, "eager")
    rows = records()
    prompts = [r["prompt"] for r in rows]
    answers = digit_tok.convert_tokens_to_ids([r["answer"] for r in rows])
    groups = [sorted(TEMPLATES).index(r["template"]) for r in rows]
    client = RemoteClient(model, transport=LocalTransport.for_model(model),
                          log=lambda message: None, sleep=lambda seconds: None)
    remote = RemoteExecutor(model, prompts, answers, batch_size=16, cells_per_request=2,
                            client=client, groups=groups)
    local = NnsightExecutor(model, prompts, answers, batch_size=16, groups=groups)
    table = build_cama_table(model, prompts, "t", [1, 2], batch_size=16, progress=False,
                             runner=remote.cama_runner(), groups=groups)
    expected = build_cama_table(model, prompts, "t", [1, 2], batch_size=16, progress=False,
                                groups=groups)
    assert torch.equal(table.keys, expected.keys) and int(table.keys[:, 3].max()) == 1
    enc = model.encode(prompts)
    reference.assert_float32_close(model.hf, table.means, expected.means, enc, "grouped table")
    plans = [AF1Plan(1, 1), AF1Plan(2, 1), AF1Plan(1, 2)]
    got = dict(remote.run_many([(p, p, expected.layer(p.l_wait)) for p in plans]))
    for plan in plans:
        want = local.run(plan, expected.layer(plan.l_wait))
        assert np.array_equal(got[plan].pred_ids, want.pred_ids), plan
        reference.assert_float32_close(model.hf, got[plan].answer_logits, want.answer_logits,
                                       enc, repr(plan))
