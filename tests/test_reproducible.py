"""Results a researcher can rerun, compare and publish:

* a second data set in the same --out (another --seed and --n-prompts) is kept apart: its own
  name, saved data set, search entry, figures and tables, whose paired counts are its own;
* pairing never truncates: rows of another data set or length raise;
* --answer full pairs prompts, not rows (a two-token answer);
* the CAMA cache is keyed by the attention implementation (and groups): an eager run after an
  sdpa run builds its own table;
* --holdout chooses the AF1 configuration on one part of the prompts and grades it on the other:
  changing the held-out prompts' predictions does not move the choice;
* a prompt longer than the model's context is one error line;
* the paper's threshold 0.85 is the default, the configuration at 0.9 is reported too;
* the heatmap shows faithfulness, the answer probability ratio or the KL (--metric).
"""

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import run
from figures.__main__ import main as figures_main
from figures.render import render_all
from interventions.mechanisms.cama import CamaMismatch, CamaTable, groups_digest
from interventions.pipeline.experiments import holdout_split, search_task
from interventions.pipeline.results import read_results
from interventions.pipeline.scoring import DataOutcomes, PairingError
from interventions.pipeline.stats import mcnemar, paired
from tasks import load_task, task_fingerprint
from tasks.store import METADATA_FORMAT, make_dataset
from test_cli import run_cli
from test_stats import mcnemar_by_enumeration, wilson_by_formula

SMALL_GRID = ("--l-wait", "1-3", "--l-transfer", "1")


def versus_counts(first: dict, second: dict, answers, full_ok, prompt_of=None):
    """Discordant prompts (first right only, second right only) among the prompts the full
    model gets right, counted prompt by prompt with plain loops."""
    n_prompts = len(full_ok)
    rows_of = [[r for r in range(len(answers)) if (prompt_of[r] if prompt_of is not None
                                                     else r) == i] for i in range(n_prompts)]
    only_first = only_second = 0
    for i in range(n_prompts):
        if not full_ok[i]:
            continue
        a = all(first["pred_ids"][r] == answers[r] for r in rows_of[i])
        b = all(second["pred_ids"][r] == answers[r] for r in rows_of[i])
        only_first += a and not b
        only_second += b and not a
    return only_first, only_second


# -- one data set per name ------------------------------------------------------------------


def test_second_data_set_is_kept_apart(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--model", tiny_dir, *SMALL_GRID, "--experiments", "sweep,alternatives",
              "--out", out, "--cache-dir", tmp_path / "cache")
    code, _, err = run_cli(capsys, *common)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *common, "--seed", "7", "--n-prompts", "20")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    searches = json.loads((out / "af1_search.json").read_text())
    names = sorted(n for n in manifest["tasks"] if n.startswith("A+B-calculate"))
    fingerprints = [manifest["tasks"][n]["dataset_fingerprint"] for n in names]
    assert len(set(fingerprints)) == 2
    first, second = ("A+B-calculate", f"A+B-calculate~{fingerprints[1][:8]}")
    assert names == [first, second] and f"[af1] {second}: AF1 configuration" in stdout
    rows = read_results(out / "results.jsonl")
    tables = (out / "figures" / "tables.md").read_text()
    for name, fingerprint in zip(names, fingerprints):
        data = load_task(out / "data" / name)
        assert task_fingerprint(data) == fingerprint
        assert len(data) == (20 if name == second else manifest["tasks"][first]["n_prompts"])
        assert searches[name]["dataset_fingerprint"] == fingerprint
        for kind in ("heatmap", "faithfulness_vs_lwait", "alternatives"):
            assert (out / "figures" / f"{kind}_{name}.png").stat().st_size > 1000
        assert f"## AF1 search, {name}\n\nData set {fingerprint}, {len(data)} prompts" in tables
        # Each alternatives table pairs its rows with its own data set's prompts.
        own = [r for r in rows if r["experiment"] == "alternatives"
               and r["dataset_fingerprint"] == fingerprint]
        assert len(own) == 6 and all(len(r["pred_ids"]) == len(data) for r in own)
        base = next(r for r in own if r["variant"] == "AF1 (CAMA + ABP)")
        section = tables.split(f"## Alternatives, {name} (")[1].split("\n## ")[0]
        for row in own:
            if row is base:
                continue
            a, b = versus_counts(base, row, data["answer_token_id"], data["full_correct"])
            assert a + b <= sum(data["full_correct"])
            assert (f"| {row['variant']} |" in section and
                    f"| {a} / {b}, p={mcnemar_by_enumeration(a, b):.2g} |" in section)
    assert tables.count("## AF1 search, A+B-calculate") == 2


def saved_dataset(n_prompts: int, answer_tokens: int = 1, full_ok=None):
    """A saved task data set as a run writes it (``answer_tokens`` per answer; with more than
    one, teacher-forced: one row per answer token, ``source_row`` naming its prompt) and its
    fingerprint. ``full_ok``: per evaluated row, whether the full model is right."""
    rows = [(i, step) for i in range(n_prompts) for step in range(answer_tokens)]
    answers = [3 + step for _, step in rows]
    columns = {"prompt": [f"Calculate: {i}+{step}=" for i, step in rows],
               "answer": ["x"] * len(rows), "answer_value": answers,
               "answer_token_id": answers, "answer_token_ids": [[a] for a in answers],
               "A": [i for i, _ in rows], "B": [s for _, s in rows], "C": [0] * len(rows),
               "operators": ["+"] * len(rows), "expression": ["e"] * len(rows),
               "task": ["A+B"] * len(rows), "style": ["calculate"] * len(rows),
               "template": ["t"] * len(rows), "n_tokens": [5] * len(rows),
               "input_ids": [[1, 2, i, step] for i, step in rows]}
    data = make_dataset(columns, {"format": METADATA_FORMAT})
    fingerprint = task_fingerprint(data)
    full_ok = [True] * len(rows) if full_ok is None else full_ok
    data = data.add_column("full_pred_id", [a if ok else 0 for a, ok in zip(answers, full_ok)])
    data = data.add_column("full_correct", list(full_ok))
    if answer_tokens > 1:
        data = data.add_column("source_row", [i for i, _ in rows])
    return data, fingerprint


def test_a_truncating_pairing_is_impossible(tmp_path):
    data, fingerprint = saved_dataset(10)
    outcomes = DataOutcomes.from_dataset(data)
    assert outcomes.fingerprint == fingerprint
    row = {"task": "A+B", "dataset_fingerprint": fingerprint, "pred_ids": [3] * 10}
    other = {**row, "pred_ids": [3] * 5 + [0] * 5}
    assert outcomes.pair(row, other) == {"n_only_first": 5, "n_only_second": 0,
                                         "p_value": mcnemar(5, 0)}
    # A shortened data set is another data set: its rows are not paired with these.
    shortened = DataOutcomes.from_dataset(data.select(range(9)))
    assert shortened.fingerprint != fingerprint
    with pytest.raises(PairingError, match="not on this one"):
        shortened.pair(row, other)
    # A row of the data set's fingerprint with fewer predictions than its rows raises too.
    with pytest.raises(PairingError, match="nothing is truncated"):
        outcomes.pair(row, {**other, "pred_ids": other["pred_ids"][:9]})
    with pytest.raises(ValueError):
        paired([True] * 9, [True] * 10)
    # The tables of a directory whose saved data set was shortened show no paired test.
    directory = tmp_path / "run"
    (directory / "data").mkdir(parents=True)
    data.select(range(9)).save_to_disk(str(directory / "data" / "A+B-calculate"))
    base = {"experiment": "alternatives", "style": "calculate", "l_wait": 1, "l_transfer": 1,
            "sink": None, "wait_ablation": None, "transfer_peek": None, "layer": None,
            "window": None, "faithfulness": 1.0, "full_accuracy": 1.0, "af1_accuracy": 1.0,
            "n_prompts": 10, "n_full_correct": 10, "n_af1_correct_of_full": 10,
            "n_af1_correct": 10}
    lines = [{**base, **row, "variant": "AF1 (CAMA + ABP)"},
             {**base, **other, "variant": "wait: zero ablation", "faithfulness": 0.5,
              "af1_accuracy": 0.5, "n_af1_correct_of_full": 5, "n_af1_correct": 5}]
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    render_all(directory)
    tables = (directory / "figures" / "tables.md").read_text()
    assert f"data/A+B-calculate holds data set {shortened.fingerprint}, not {fingerprint}" \
        in tables
    assert re.search(r"\| wait: zero ablation \|.*\| - \|\n", tables)


def test_answer_full_pairs_prompts_not_rows(tmp_path):
    # Three prompts with two-token answers, the full model right on all six rows. AF1 gets
    # every row right; the variant misses both tokens of prompt 0 and the second of prompt 1:
    # 3 rows, but 2 prompts.
    data, fingerprint = saved_dataset(3, answer_tokens=2)
    answers = data["answer_token_id"]
    af1 = {"task": "A+B", "dataset_fingerprint": fingerprint, "pred_ids": list(answers)}
    variant = {**af1, "pred_ids": [0, 0, answers[2], 0, answers[4], answers[5]]}
    outcomes = DataOutcomes.from_dataset(data)
    assert outcomes.n_rows == 6 and outcomes.n_prompts == 3
    assert versus_counts(af1, variant, answers, [True] * 3, data["source_row"]) == (2, 0)
    assert outcomes.pair(af1, variant)["n_only_first"] == 2
    # Through the tables, from files.
    directory = tmp_path / "run"
    data.save_to_disk(str(directory / "data" / "A+B-calculate@float32-sdpa-local-full"))
    base = {"experiment": "alternatives", "style": "calculate", "answer_scoring": "full",
            "l_wait": 1, "l_transfer": 1, "sink": None, "wait_ablation": None,
            "transfer_peek": None, "layer": None, "window": None, "full_accuracy": 1.0,
            "n_prompts": 3, "n_full_correct": 3}
    lines = [{**base, **af1, "variant": "AF1 (CAMA + ABP)", "faithfulness": 1.0,
              "af1_accuracy": 1.0, "n_af1_correct_of_full": 3, "n_af1_correct": 3},
             {**base, **variant, "variant": "wait: zero ablation", "faithfulness": 1 / 3,
              "af1_accuracy": 1 / 3, "n_af1_correct_of_full": 1, "n_af1_correct": 1}]
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (directory / "manifest.json").write_text(json.dumps({"setting": {"answer_scoring": "full"}}))
    render_all(directory)
    tables = (directory / "figures" / "tables.md").read_text()
    assert f"| 2 / 0, p={mcnemar_by_enumeration(2, 0):.2g} |" in tables


# -- the CAMA cache -------------------------------------------------------------------------


def test_eager_after_sdpa_builds_its_own_table(tiny_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ("--model", tiny_dir, "--l-wait", "1-2", "--l-transfer", "1", "--cache-dir", cache)
    assert run_cli(capsys, *common, "--out", tmp_path / "sdpa")[0] == 0
    code, _, err = run_cli(capsys, *common, "--attn", "eager", "--out", tmp_path / "eager")
    assert code == 0, err
    tables = sorted((cache / "cama").glob("*.safetensors"))
    assert len(tables) == 2
    by_attn = {CamaTable.load(p).metadata["attn_implementation"]: p for p in tables}
    assert set(by_attn) == {"sdpa", "eager"}
    eager = json.loads((tmp_path / "eager" / "manifest.json").read_text())
    entry = eager["tasks"]["A+B-calculate@float32-eager-local-first"]
    assert entry["cama_table_was_cached"] is False and entry["cama_table"] == str(by_attn["eager"])
    # A third run in eager finds the eager table.
    assert run_cli(capsys, *common, "--attn", "eager", "--out", tmp_path / "again")[0] == 0
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["tasks"]["A+B-calculate@float32-eager-local-first"]["cama_table_was_cached"]
    # check() compares what the cache keys: the attention implementation and the groups.
    table = CamaTable.load(by_attn["sdpa"])
    assert table.metadata["groups"] == groups_digest(None) == table.groups
    with pytest.raises(CamaMismatch, match="attention implementation 'sdpa', not 'eager'"):
        table.check(attn_implementation="eager")
    with pytest.raises(CamaMismatch, match="prompt groups"):
        table.check(groups=groups_digest([0, 1, 0]))
    code, _, err = run_cli(capsys, "--model", tiny_dir, "--l-wait", "1", "--l-transfer", "1",
                           "--attn", "eager", "--cama-table", by_attn["sdpa"],
                           "--out", tmp_path / "refused")
    assert code == 2 and "attention implementation 'sdpa', not 'eager'" in err
    assert not (tmp_path / "refused").exists()


# -- a search that does not grade itself ------------------------------------------------------

TEMPLATES = ("Calculate: {a}+{b}=", "Add {a} and {b}: ")


@pytest.fixture(scope="module")
def own_task(tiny_dir, tmp_path_factory):
    """A data set of two templates whose answers are the tiny model's own greedy next tokens
    (a random model gets given answers right too rarely to split them), as a .jsonl file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    rows = []
    for template in TEMPLATES:
        for a in range(1, 8):
            for b in range(1, 6):
                prompt = template.format(a=a, b=b)
                with torch.no_grad():
                    logits = hf(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
                ids = logits.argsort(descending=True).tolist()
                token = next(t for t in ids if t >= 3 and tokenizer.decode([t]).strip())
                rows.append({"prompt": prompt, "answer": tokenizer.decode([token]),
                             "template": template})
    path = tmp_path_factory.mktemp("own") / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_holdout_grades_on_prompts_that_did_not_choose(tiny_dir, own_task, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--model", tiny_dir, "--dataset", own_task, "--l-wait", "0-3", "--l-transfer",
            "1-2", "--holdout", "0.5", "--seed", "3", "--out", out)
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    entry = json.loads((out / "af1_search.json").read_text())["own-dataset"]
    held = entry["holdout"]
    data = load_task(out / "data" / "own-dataset")
    n = len(data)
    answers = np.array(data["answer_token_id"])
    right = np.flatnonzero(data["full_correct"])
    n_held = int(np.floor(len(right) / 2 + 0.5))
    assert n == 70 and len(right) >= 40  # most answers are the full model's own prediction
    select, held_out = held["select_prompts"], held["eval_prompts"]
    assert not set(select) & set(held_out) and sorted(select + held_out) == right.tolist()
    assert (held["fraction"], held["seed"], held["n_eval_prompts"]) == (0.5, 3, n_held)
    assert held["n_select_prompts"] == len(right) - n_held
    assert held["select_rows"] == select and held["eval_rows"] == held_out
    for template in TEMPLATES:  # stratified: about half of each template's right prompts
        members = {i for i in right if data["template"][i] == template}
        assert len(members & set(held_out)) in (len(members) // 2, (len(members) + 1) // 2)
    assert entry["in_sample"] is False
    # The held-out grade, counted here.
    rows = read_results(out / "results.jsonl")
    chosen = next(r for r in rows if (r["l_wait"], r["l_transfer"]) ==
                  (entry["l_wait"], entry["l_transfer"]))
    ok = np.array(chosen["pred_ids"]) == answers
    both = int(ok[held_out].sum())
    assert (held["n_full_correct"], held["n_af1_correct_of_full"]) == (n_held, both)
    assert held["faithfulness"] == pytest.approx(both / n_held)
    assert held["faithfulness_ci"] == pytest.approx(wilson_by_formula(both, n_held),
                                                    abs=1e-12)
    assert held["af1_vs_full"] == {"n_full_only": n_held - both, "n_af1_only": 0,
                                   "p_value": pytest.approx(mcnemar_by_enumeration(
                                       n_held - both, 0))}
    assert held["selection"]["n_full_correct"] == len(select)
    p_af1 = np.exp(np.array(chosen["answer_logprobs"])[held_out]).mean()
    p_full = np.exp(np.array(data["full_answer_logprob"])[held_out]).mean()
    assert held["answer_prob_ratio"] == pytest.approx(p_af1 / p_full, rel=1e-9)
    assert held["kl_full_to_af1"] == pytest.approx(
        np.array(chosen["kl_rows"])[held_out].mean(), rel=1e-9)
    # Every row carries the continuous measures with their intervals and method.
    for row in rows:
        for field in ("answer_prob_full", "answer_prob_af1", "answer_prob_ratio",
                      "kl_full_to_af1"):
            assert row[field] is not None and len(row[f"{field}_ci"]) == 2
        assert row["measure_method"] == "bootstrap 95%, 1000 resamples over prompts, seed 3"
    tables = (out / "figures" / "tables.md").read_text()
    assert f"Chosen on {len(select)} prompts" in tables and "held-out faithfulness" in tables
    caption = (out / "figures" / "heatmap_own-dataset.caption.txt").read_text()
    assert (f"chosen on {len(select)} of the prompts the full model gets right, graded on the "
            f"other {n_held}") in caption

    # Changing what every cell predicts on the held-out prompts does not move the choice: the
    # chosen cell now misses all of them, every other cell gets all of them right.
    def search(edited):
        outcomes = DataOutcomes.from_dataset(data)
        split = {k: held[k] for k in ("fraction", "seed", "select_prompts", "eval_prompts")}
        sweep = [r for r in edited if r["experiment"] == "sweep"]
        return search_task(sweep, entry["threshold"], "point", outcomes, split, 3)

    def edit(prompts, chosen_right):
        edited = []
        for r in rows:
            pred = list(r["pred_ids"])
            for i in prompts:
                right_here = (r is chosen) == chosen_right
                pred[i] = int(answers[i]) if right_here else int(answers[i]) + 1
            edited.append({**r, "pred_ids": pred})
        return edited

    moved_eval = search(edit(held_out, chosen_right=False))
    assert (moved_eval["l_wait"], moved_eval["l_transfer"], moved_eval["frontier"]) == (
        entry["l_wait"], entry["l_transfer"], entry["frontier"])
    assert moved_eval["holdout"]["n_af1_correct_of_full"] == 0
    assert moved_eval["holdout"]["selection"] == held["selection"]
    # The same edit on the prompts that chose does move it (the test can fail).
    moved_select = search(edit(select, chosen_right=False))
    assert (moved_select["l_wait"], moved_select["l_transfer"]) != (entry["l_wait"],
                                                                    entry["l_transfer"])
    # The run itself: the same command on the edited results file chooses the same cell.
    (out / "results.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in edit(held_out, chosen_right=False)))
    assert run_cli(capsys, *args)[0] == 0
    rerun = json.loads((out / "af1_search.json").read_text())["own-dataset"]
    assert (rerun["l_wait"], rerun["l_transfer"]) == (entry["l_wait"], entry["l_transfer"])
    assert rerun["holdout"]["n_af1_correct_of_full"] == 0


def test_holdout_with_too_few_right_prompts_is_in_sample_and_says_so(tiny_dir, own_task,
                                                                      tmp_path, capsys):
    rows = [json.loads(line) for line in own_task.read_text().splitlines()[:4]]
    for row in rows[1:]:  # another answer than the full model's top choice: at most 1 right
        row["answer"] = "#" if row["answer"] != "#" else "%"
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "--model", tiny_dir, "--dataset", path, *SMALL_GRID,
                                "--holdout", "0.5", "--out", out)
    assert code == 0, err
    entry = json.loads((out / "af1_search.json").read_text())["few-dataset"]
    assert entry["in_sample"] is True and entry["holdout"] is None
    assert "--holdout needs at least 2 prompts" in entry["holdout_skipped"]
    assert "[af1] warning: few-dataset: --holdout needs at least 2 prompts" in stdout


def test_holdout_split_is_seeded_and_stratified():
    strata = np.array([0] * 10 + [1] * 7 + [2] * 1 + [3] * 2)
    full_ok = np.ones(20, bool)
    full_ok[[0, 11]] = False
    split = holdout_split(full_ok, strata, 0.5, seed=4)
    assert split == holdout_split(full_ok, strata, 0.5, seed=4)
    assert split != holdout_split(full_ok, strata, 0.5, seed=5)
    held = np.array(split["eval_prompts"])
    assert len(held) == 9 and not set(held) & {0, 11}
    per_stratum = np.bincount(strata[held], minlength=4)
    assert per_stratum[0] in (4, 5) and per_stratum[1] == 3 and per_stratum[3] == 1
    with pytest.raises(Exception, match="at least 2 prompts"):
        holdout_split(np.eye(1, 5, dtype=bool)[0], np.zeros(5, int), 0.5, 0)


def test_holdout_refuses_a_bad_fraction(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tiny_dir, "--holdout", "1.5",
                           "--out", tmp_path / "o")
    assert code == 2 and err.startswith("error: --holdout") and not (tmp_path / "o").exists()


# -- the context, the threshold, the heatmap's measure --------------------------------------


def test_prompt_longer_than_the_context_is_refused(tiny_dir, tmp_path, capsys):
    long = "Q" + "1" * 2100 + "="  # the digit tokenizer: one token per character
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "2"}) + "\n"
                            for p in ("Q1+1=", long, "Q3+4=")))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--model", tiny_dir, "--dataset", path, "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out.exists()
    assert re.match(r"error: long-dataset: data-set row 1 has 2102 tokens, more than the "
                    r"model's context of 2048 positions \(max_position_embeddings\)", lines[0])


def sweep_row(w, t, right, n=20):
    return {"l_wait": w, "l_transfer": t, "faithfulness": right / n,
            "faithfulness_ci": list(wilson_by_formula(right, n)), "n_full_correct": n,
            "n_af1_correct_of_full": right}


def test_threshold_is_the_papers_and_0_9_is_reported_too(capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default 0.85: the paper's criterion" in help_text
    from interventions.pipeline.config import JobConfig

    assert JobConfig().threshold == 0.85
    rows = [sweep_row(5, 1, 17), sweep_row(4, 1, 19), sweep_row(3, 2, 20)]  # 0.85, 0.95, 1.0
    result = search_task(rows, 0.85)
    assert (result["l_wait"], result["l_transfer"], result["in_sample"]) == (5, 1, True)
    also = result["threshold_0.9"]
    assert also["differs"] and (also["l_wait"], also["l_transfer"]) == (4, 1)
    assert also["faithfulness"] == 0.95 and also["threshold"] == 0.9
    assert search_task(rows, 0.9)["threshold_0.9"] is None


def test_heatmap_shows_the_measure_asked_for(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "--model", tiny_dir, *SMALL_GRID, "--out", out)[0] == 0
    for metric in ("prob_ratio", "kl"):
        assert figures_main([str(out), "--out", str(tmp_path / metric), "--metric",
                             metric]) == 0
        assert (tmp_path / metric / f"heatmap_{metric}_A+B-calculate.png").stat().st_size > 1000
        caption = (tmp_path / metric / f"heatmap_{metric}_A+B-calculate.caption.txt"
                   ).read_text()
        assert ("answer over the full model's" if metric == "prob_ratio" else "in nats") \
            in caption
    with pytest.raises(SystemExit):
        figures_main([str(out), "--metric", "accuracy"])
