"""Runs side by side (``python -m figures compare``) and several models in one command
(``run.py --model A,B``).

The comparison is checked against the runs' own rows: the committed gallery run (SmolLM2,
figures/smollm2, searched with --holdout 0.5) and a second run written here by hand (an 8-layer model, counts chosen here,
rows without intervals so that the Wilson intervals come from the counts). Expected numbers are
computed here: the chosen cell by the search rule written out (on the gallery's choosing
prompts, from its predictions and its saved data set's answers), intervals by the Wilson
formula of test_stats.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

import run
import tiny
from figures.__main__ import main as figures_main
from figures.compare import compare_runs
from test_stats import wilson_by_formula

GALLERY = Path(__file__).resolve().parents[1] / "figures" / "smollm2"
SWEEP = {"experiment": "sweep", "sink": True, "wait_ablation": "cama", "transfer_peek": "last"}


def share(right: int, total: int) -> str:
    low, high = wilson_by_formula(right, total)
    return f"{right / total:.3f} [{low:.3f}, {high:.3f}] ({right}/{total})"


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("results.jsonl", "manifest.json", "af1_search.json"):
        shutil.copy(source / name, target / name)
    return target


# The hand-made run: 8 layers, 20 prompts, 16 right in full; faithfulness counts per cell.
OTHER_COUNTS = {("A+B", 2, 1): 9, ("A+B", 4, 1): 15, ("A+B", 4, 2): 16, ("A+B", 6, 1): 14,
                ("A+B", 6, 2): 15, ("A-B", 3, 1): 10, ("A-B", 5, 2): 12}


def other_run(directory: Path) -> Path:
    """A run of an 8-layer model: sweeps of A+B (also in the gallery) and A-B (only here), and
    necessity rows of A+B."""
    directory.mkdir(parents=True)
    rows = []
    for (task, l_wait, l_transfer), right in OTHER_COUNTS.items():
        rows.append(row(task, right, l_wait=l_wait, l_transfer=l_transfer, **SWEEP))
    for layer in range(8):
        rows.append(row("A+B", 16 - layer, experiment="necessity", layer=layer, window=1,
                        l_wait=None, l_transfer=None))
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {"model": {"model_id": "org/Other-8L", "revision": "v1", "n_layers": 8},
                "config": {"threshold": 0.9, "threshold_on": "point"},
                "setting": {"dtype": "float32", "attn_implementation": "sdpa",
                            "backend": "local", "answer_scoring": "first"}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def row(task: str, right_of_full: int, **fields) -> dict:
    return {"task": task, "style": "calculate", "dataset_fingerprint": f"fp-{task}",
            "sink": None, "wait_ablation": None, "transfer_peek": None, "variant": None,
            "layer": None, "window": None, "n_prompts": 20, "n_full_correct": 16,
            "n_af1_correct_of_full": right_of_full, "n_af1_correct": right_of_full,
            "faithfulness": right_of_full / 16, "full_accuracy": 16 / 20,
            "af1_accuracy": right_of_full / 20, **{"experiment": "sweep", **fields}}


def chosen_by_rule(cells: dict, threshold: float) -> tuple:
    """The search rule written out: the largest L_wait at or above the threshold, then the
    smallest L_transfer."""
    passing = [key for key, faith in cells.items() if faith >= threshold]
    return max(passing, key=lambda key: (key[0], -key[1]))


def table_rows(path: Path) -> dict[tuple[str, str], list[str]]:
    """compare.md's main table: (model, task) -> cells."""
    found = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 14 and cells[0] not in ("model", "---"):
            found[(cells[0], cells[4])] = cells
    return found


@pytest.fixture
def runs(tmp_path):
    return copy_run(GALLERY, tmp_path / "smollm2"), other_run(tmp_path / "other")


def test_the_table_holds_each_runs_own_counts_and_intervals(runs, tmp_path):
    gallery, other = runs
    out = tmp_path / "cmp"
    written = compare_runs([gallery, other], out)
    table = table_rows(out / "compare.md")
    assert len(table) == 3 + 2  # the gallery's three swept tasks, the other run's two

    gallery_rows = [json.loads(line) for line in (GALLERY / "results.jsonl").open()]
    searches = json.loads((GALLERY / "af1_search.json").read_text())
    for name, search in searches.items():
        # Recomputed here from the rows' predictions and the saved data set's answers: each
        # cell's right prompts among those that chose (the search rule written out) and among
        # the held-out ones (the grade).
        answers = np.array(datasets.load_from_disk(str(GALLERY / "data" / name))
                           ["answer_token_id"])
        held = search["holdout"]
        select, graded = np.array(held["select_rows"]), np.array(held["eval_rows"])
        sweep = {(r["l_wait"], r["l_transfer"]): r for r in gallery_rows
                 if r["dataset_fingerprint"] == search["dataset_fingerprint"]
                 and all(r[k] == v for k, v in SWEEP.items())}
        right = {key: np.array(r["pred_ids"]) == answers for key, r in sweep.items()}
        key = chosen_by_rule({k: ok[select].mean() for k, ok in right.items()},
                             search["threshold"])
        cell = sweep[key]
        n_held, kept = len(graded), int(right[key][graded].sum())
        line = table[("SmolLM2-135M-Instruct", name)]
        assert line[1] == "sha256 224d0cd3feb3" and line[2] == "30"
        assert line[3] == "float32/sdpa/local/first"
        assert line[5] == share(cell["n_full_correct"], cell["n_prompts"])
        assert line[6] == f"L_wait={key[0]}, L_transfer={key[1]}"
        assert (line[7], line[8]) == (f"{key[0] / 30:.2f}", f"{(key[0] + key[1]) / 30:.2f}")
        assert line[9] == (f"{share(kept, n_held)}, held out; in-sample "
                           f"{share(cell['n_af1_correct_of_full'], cell['n_full_correct'])}")
        assert line[10] == ("yes" if kept / n_held >= 0.85 else "no")
        # The continuous measures are the held-out grade's, as the run wrote them.
        ratio, ratio_ci = held["answer_prob_ratio"], held["answer_prob_ratio_ci"]
        assert line[11].endswith(f"ratio {ratio:.3f} [{ratio_ci[0]:.3f}, {ratio_ci[1]:.3f}] "
                                 "(held out)")
        kl, kl_ci = held["kl_full_to_af1"], held["kl_full_to_af1_ci"]
        assert line[12] == f"{kl:.3f} [{kl_ci[0]:.3f}, {kl_ci[1]:.3f}] (held out)"
        assert line[13] == (f"chosen on {len(select)} prompts, graded on {n_held} others "
                            f"(fraction {held['fraction']:g}, seed {held['seed']})")

    for task in ("A+B", "A-B"):
        cells = {(w, t): right / 16 for (name, w, t), right in OTHER_COUNTS.items()
                 if name == task}
        passing = [k for k, f in cells.items() if f >= 0.9]
        key = chosen_by_rule(cells, 0.9) if passing else max(
            cells, key=lambda k: (cells[k], k[0], -k[1]))
        line = table[("Other-8L", f"{task}-calculate")]
        assert line[1] == "v1" and line[2] == "8"
        assert line[5] == share(16, 20)
        assert line[6] == f"L_wait={key[0]}, L_transfer={key[1]}"
        assert (line[7], line[8]) == (f"{key[0] / 8:.2f}", f"{(key[0] + key[1]) / 8:.2f}")
        right = OTHER_COUNTS[(task, *key)]
        assert line[9] == share(right, 16) + ", in-sample"
        assert line[10] == ("yes" if right / 16 >= 0.85 else "no")
    # A+B: (6, 2) reaches 0.9 (15/16), (6, 1) does not (14/16); A-B reaches it nowhere: the
    # best cell is reported.
    assert table[("Other-8L", "A+B-calculate")][6] == "L_wait=6, L_transfer=2"
    assert table[("Other-8L", "A-B-calculate")][6] == "L_wait=5, L_transfer=2"

    text = (out / "compare.md").read_text()
    assert ("- A-B-calculate: in Other-8L; not in SmolLM2-135M-Instruct" in text)
    assert "- capitals-recall: in SmolLM2-135M-Instruct; not in Other-8L" in text
    saved = json.loads((out / "compare.json").read_text())
    assert [(r["model"], r["label"]) for r in saved["rows"]] == list(table)
    for kind in ("faithfulness_vs_depth_A+B-calculate", "af1_windows",
                 "necessity_vs_depth_A+B-calculate"):
        assert (out / f"{kind}.png").stat().st_size > 1000 and out / f"{kind}.png" in written
        assert (out / f"{kind}.caption.txt").read_text().strip()
        assert f"]({kind}.png)" in text
    # Rebuilt from the command line, the table is the same.
    assert figures_main(["compare", str(gallery), str(other), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "compare.md").read_text() == text


def test_held_out_numbers_and_continuous_measures_are_shown_where_the_run_has_them(
        runs, tmp_path):
    """Issue 17's fields, written by hand into a copy of the gallery run: the held-out
    faithfulness replaces the in-sample one (labelled), the measures fill their columns."""
    gallery, other = runs
    searches = json.loads((gallery / "af1_search.json").read_text())
    search = searches["A+B-calculate"]
    measures = {"answer_prob_full": 0.412, "answer_prob_full_ci": [0.35, 0.47],
                "answer_prob_af1": 0.301, "answer_prob_af1_ci": [0.25, 0.36],
                "answer_prob_ratio": 0.731, "answer_prob_ratio_ci": [0.66, 0.8],
                "kl_full_to_af1": 0.218, "kl_full_to_af1_ci": [0.17, 0.27]}
    low, high = wilson_by_formula(11, 13)
    search.update(in_sample=False, holdout={
        "fraction": 0.5, "seed": 0, "n_select_prompts": 13, "n_eval_prompts": 13,
        "select_rows": list(range(13)), "eval_rows": list(range(13, 26)),
        "n_full_correct": 13, "n_af1_correct_of_full": 11, "faithfulness": 11 / 13,
        "faithfulness_ci": [low, high],
        "af1_vs_full": {"n_full_only": 2, "n_af1_only": 0, "p_value": 0.5}, **measures})
    (gallery / "af1_search.json").write_text(json.dumps(searches))
    # The ioi task searched in-sample: its chosen row carries the measures itself.
    ioi = searches["ioi-names"]
    ioi.update(in_sample=True, holdout=None)
    lines = []
    for line in (gallery / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if (r["dataset_fingerprint"] == ioi["dataset_fingerprint"] and r["experiment"] == "sweep"
                and (r["l_wait"], r["l_transfer"]) == (ioi["l_wait"], ioi["l_transfer"])):
            r.update(measures)
        lines.append(json.dumps(r))
    (gallery / "results.jsonl").write_text("\n".join(lines) + "\n")
    (gallery / "af1_search.json").write_text(json.dumps(searches))

    compare_runs([gallery, other], tmp_path / "cmp")
    table = table_rows(tmp_path / "cmp" / "compare.md")
    held = table[("SmolLM2-135M-Instruct", "A+B-calculate")]
    assert held[9] == (f"{share(11, 13)}, held out; in-sample {share(24, 26)}")
    assert held[10] == "no"  # 11/13 = 0.846 < 0.85
    assert held[11] == ("0.412 [0.350, 0.470] → 0.301 [0.250, 0.360], ratio 0.731 "
                        "[0.660, 0.800] (held out)")
    assert held[12] == "0.218 [0.170, 0.270] (held out)"
    assert held[13] == "chosen on 13 prompts, graded on 13 others (fraction 0.5, seed 0)"
    ioi_line = table[("SmolLM2-135M-Instruct", "ioi-names")]
    assert ioi_line[9] == share(174, 179) + ", in-sample"
    assert ioi_line[11] == ("0.412 [0.350, 0.470] → 0.301 [0.250, 0.360], ratio 0.731 "
                            "[0.660, 0.800] (in-sample)")
    assert ioi_line[12] == "0.218 [0.170, 0.270] (in-sample)"
    assert table[("Other-8L", "A+B-calculate")][11] == "—"  # rows without measures
    assert table[("Other-8L", "A+B-calculate")][12] == "—"


def test_a_directory_that_is_not_a_run_is_refused_in_one_line(runs, tmp_path, capsys):
    gallery, _ = runs
    (tmp_path / "empty").mkdir()
    out = tmp_path / "cmp"
    assert figures_main(["compare", str(gallery), str(tmp_path / "empty"), "--out",
                         str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "is not a run directory (no results.jsonl or " \
                                          "manifest.json)" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [tiny.save_tiny_model(arch, root / f"tiny-{arch}", tiny.digit_tokenizer())
            for arch in ("llama", "gpt2")]


def test_a_failing_model_does_not_stop_the_others(tiny_dirs, tmp_path, capsys):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    out = tmp_path / "runs"
    code = run.main(["--model", f"{broken},{tiny_dirs[0]}", "--l-wait", "0-2",
                     "--l-transfer", "1", "--out", str(out), "--no-progress",
                     "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {broken}: model directory {str(broken)!r} has no config.json"]
    assert "1 of 2 models failed: " + str(broken) in captured.err
    assert not (out / "not-a-model").exists()
    assert (out / "tiny-llama" / "results.jsonl").is_file()
    table = table_rows(out / "compare" / "compare.md")
    assert list(table) == [("tiny-llama", "A+B-calculate")]
    # Every model failing is status 2.
    (tmp_path / "also-not").mkdir()
    assert run.main(["--model", f"{broken},{tmp_path / 'also-not'}", "--out",
                     str(tmp_path / "r2"), "--no-progress"]) == 2
    assert not (tmp_path / "r2" / "compare").exists()


def test_two_models_sharing_a_folder_are_refused(tiny_dirs, tmp_path, capsys):
    code = run.main(["--model", f"{tiny_dirs[0]},{tiny_dirs[0]}", "--out", str(tmp_path / "o"),
                     "--no-progress"])
    assert code == 2
    assert "would write to the same folder 'tiny-llama'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_remote_dry_run_prints_each_plan_and_their_total(tiny_dirs, tmp_path, capsys):
    code = run.main(["--model", ",".join(tiny_dirs), "--l-wait", "0-3", "--l-transfer", "1-2",
                     "--remote", "--remote-backend", "local", "--dry-run", "--out",
                     str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache"),
                     "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    head, _, tail = text.partition("NDIF dry run, all models:")
    plans = [line for line in head.splitlines() if line.startswith("total: ")]
    assert len(plans) == 2 and head.count("nothing was sent") == 2

    def numbers(line):
        found = re.match(r"total: (\d+) requests, (\d+) configurations, (\d+) forward passes",
                         line)
        return [int(n) for n in found.groups()]

    (total,) = [line for line in tail.splitlines() if line.startswith("total: ")]
    assert numbers(total) == [sum(n) for n in zip(*map(numbers, plans))]
    assert numbers(total)[1] == 2 * 7  # 7 cells of the grid per model
    assert not (tmp_path / "o").exists()


def test_the_comparison_needs_neither_torch_nor_transformers_nor_nnsight(runs, tmp_path):
    gallery, other = runs
    code = ("import sys\n"
            "ABSENT = ('torch', 'transformers', 'nnsight')\n"
            "class Absent:  # the first finder: an import of these fails as if not installed\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ABSENT:\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "from figures.__main__ import main\n"
            f"code = main(['compare', {str(gallery)!r}, {str(other)!r}, '--out', "
            f"{str(tmp_path / 'c')!r}])\n"
            "assert not set(ABSENT) & set(sys.modules), 'imported'\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c" / "compare.md").is_file()
