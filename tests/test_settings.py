"""A result's setting (dtype, attention, backend, answer scoring) is part of its identity: a rerun
in the same setting skips finished cells, a run in another setting evaluates them and keeps its
rows apart, and the search, figures and tables use one setting's rows. Old results files (no
setting recorded) read as float32/sdpa/local/first. Tables show intervals computed here."""

import json

import pytest

from figures.__main__ import main as figures_main
from interventions.pipeline.experiments import af1_search
from interventions.pipeline.results import SETTING_DEFAULTS, read_results, setting_of
from test_cli import run_cli
from test_stats import wilson_by_formula

GRID = ("--l-wait", "1-2", "--l-transfer", "1")
BF16 = {**SETTING_DEFAULTS, "dtype": "bfloat16"}


def sweep_rows(rows, **setting):
    return [r for r in rows if r["experiment"] == "sweep" and setting_of(r) == setting]


def test_same_setting_skips_other_setting_is_evaluated_and_kept_apart(tiny_dir, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    args = ("--model", tiny_dir, *GRID, "--out", out, "--cache-dir", tmp_path / "cache")
    assert run_cli(capsys, *args)[0] == 0
    first = read_results(out / "results.jsonl")
    assert len(first) == 2 and all(setting_of(r) == SETTING_DEFAULTS for r in first)
    # A float32 cell that only this setting has, more faithful than any: a search that mixed
    # settings would choose it.
    n = first[-1]["n_prompts"]
    planted = {k: v for k, v in first[-1].items() if not k.endswith("_ci")}
    planted.update(l_wait=3, faithfulness=1.0, full_accuracy=1.0, af1_accuracy=1.0,
                   n_full_correct=n, n_af1_correct_of_full=n, n_af1_correct=n)
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(planted) + "\n")

    # Same setting: nothing is evaluated.
    assert run_cli(capsys, *args)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["n_rows_new"] == 0

    # Another dtype: every cell is evaluated again and stored beside the float32 rows.
    code, stdout, err = run_cli(capsys, *args, "--dtype", "bfloat16")
    assert code == 0, err
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 3 + 2
    bf16 = sweep_rows(rows, **BF16)
    assert sorted((r["l_wait"], r["l_transfer"]) for r in bf16) == [(1, 1), (2, 1)]
    assert all(r["dtype"] == "bfloat16" and r["backend"] == "local"
               and r["attn_implementation"] == "sdpa" for r in bf16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_rows_new"] == 2 and manifest["setting"] == BF16
    assert [h["setting"]["dtype"] for h in manifest["history"]] == [
        "float32", "float32", "bfloat16"]
    assert manifest["settings_on_record"] == {"float32/sdpa/local/first": 3,
                                              "bfloat16/sdpa/local/first": 2}

    # The search used the bfloat16 rows only, and says which setting it belongs to.
    name = "A+B-calculate@bfloat16-sdpa-local-first"
    searches = json.loads((out / "af1_search.json").read_text())
    assert searches[name]["setting"] == BF16 and searches["A+B-calculate"]["l_wait"] == 3
    expected = af1_search(bf16, 0.9)
    assert (searches[name]["l_wait"], searches[name]["l_transfer"]) == (
        expected["l_wait"], expected["l_transfer"])
    assert searches[name]["l_wait"] in (1, 2)
    # Its data set holds the full model's predictions in bfloat16.
    assert (out / "data" / name / "dataset_info.json").exists()
    assert manifest["tasks"][name]["setting"] == BF16

    # Figures and tables: the latest run's setting by default, another on request.
    tables = (out / "figures" / "tables.md").read_text()
    assert "Setting bfloat16/sdpa/local/first" in tables
    assert "other settings in this directory: float32/sdpa/local/first" in tables
    assert f"L_wait={searches[name]['l_wait']}, L_transfer=1" in tables
    assert figures_main([str(out), "--out", str(tmp_path / "f32"), "--setting",
                         "dtype=float32"]) == 0
    assert "AF1 configuration L_wait=3, L_transfer=1" in (tmp_path / "f32" / "tables.md"
                                                          ).read_text()


def test_figures_refuse_a_setting_without_rows(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "--model", tiny_dir, *GRID, "--out", out)[0] == 0
    code = figures_main([str(out), "--out", str(tmp_path / "f"), "--setting", "backend=ndif"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no results in setting "
                                                             "float32/sdpa/ndif/first")
    assert "float32/sdpa/local/first" in err[0] and not (tmp_path / "f").exists()
    assert figures_main([str(out), "--setting", "precision=8"]) == 2
    assert "unknown setting field precision" in capsys.readouterr().err


def test_results_without_a_setting_read_as_the_old_defaults(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--model", tiny_dir, *GRID, "--out", out)
    assert run_cli(capsys, *args)[0] == 0
    new_fields = ("dtype", "attn_implementation", "backend", "answer_scoring", "faithfulness_ci",
                  "full_accuracy_ci", "af1_accuracy_ci", "ci_method", "af1_vs_full")
    lines = (out / "results.jsonl").read_text().splitlines()
    old = [{k: v for k, v in json.loads(line).items() if k not in new_fields} for line in lines]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))

    rows = read_results(out / "results.jsonl")
    for row in rows:
        assert setting_of(row) == SETTING_DEFAULTS
        right, total = row["n_af1_correct_of_full"], row["n_full_correct"]
        if total:
            assert row["faithfulness_ci"] == pytest.approx(wilson_by_formula(right, total))
    # A float32 rerun finds them; a bfloat16 run does not.
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and "2 rows in" in stdout and "record no setting" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_rows_new"] == 0 and manifest["rows_without_setting"] == 2
    assert run_cli(capsys, *args, "--dtype", "bfloat16")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["n_rows_new"] == 2


def test_rows_and_tables_carry_intervals_and_paired_tests(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "--model", tiny_dir, "--experiments", "sweep,alternatives",
                   "--l-wait", "1-2", "--l-transfer", "1-2", "--af1-config", "1,2",
                   "--out", out)[0] == 0
    rows = read_results(out / "results.jsonl")
    tables = (out / "figures" / "tables.md").read_text()
    for row in rows:
        n, full, both, af1 = (row["n_prompts"], row["n_full_correct"],
                              row["n_af1_correct_of_full"], row["n_af1_correct"])
        assert row["full_accuracy_ci"] == pytest.approx(wilson_by_formula(full, n))
        assert row["af1_accuracy_ci"] == pytest.approx(wilson_by_formula(af1, n))
        assert (row["faithfulness_ci"] == pytest.approx(wilson_by_formula(both, full))
                if full else row["faithfulness_ci"] is None)
        assert row["ci_method"] == "wilson 95%"
        assert (row["af1_vs_full"]["n_full_only"], row["af1_vs_full"]["n_af1_only"]) == (
            full - both, af1 - both)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["intervals"] == {"method": "wilson", "level": 0.95,
                                     "paired_test": "mcnemar-exact"}
    alternatives = [r for r in rows if r["experiment"] == "alternatives"]
    assert len(alternatives) == 6
    for row in alternatives:  # (the tiny random model's faithfulness: tests/test_tables.py)
        low, high = wilson_by_formula(row["n_af1_correct"], row["n_prompts"])
        assert (f"{row['af1_accuracy']:.3f} [{low:.3f}, {high:.3f}] "
                f"({row['n_af1_correct']}/{row['n_prompts']})") in tables
    assert "AF1-only / this-only, p" in tables and "AF1 vs full: full-only / AF1-only" in tables


def test_threshold_rule_is_recorded(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "--model", tiny_dir, *GRID, "--threshold-on", "lower",
                              "--out", out)
    assert code == 0 and "on its 95% lower bound" in stdout
    search = json.loads((out / "af1_search.json").read_text())["A+B-calculate"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert search["threshold_on"] == "lower" and manifest["config"]["threshold_on"] == "lower"
    assert manifest["af1_search"]["A+B-calculate"]["threshold_on"] == "lower"
    rows = sweep_rows(read_results(out / "results.jsonl"), **SETTING_DEFAULTS)
    assert search == {**search, **{k: v for k, v in af1_search(rows, 0.9, "lower").items()
                                   if k in ("l_wait", "l_transfer", "met_threshold")}}
