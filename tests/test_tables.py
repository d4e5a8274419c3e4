"""tables.md from a results directory written here by hand (rows in the format of results.jsonl
before intervals and the continuous measures were recorded, and a saved data set): every share
with its Wilson interval and counts, the AF1 search with its interval under both threshold
rules, and the paired tests against independent counts and an enumerated McNemar p-value."""

import json

from figures.render import render_all
from tasks.store import METADATA_FORMAT, make_dataset, task_fingerprint
from test_stats import mcnemar_by_enumeration, wilson_by_formula

N = 30
ANSWERS = [i % 10 for i in range(N)]
FULL_OK = [i < 26 for i in range(N)]  # the full model gets the first 26 prompts right


def saved_dataset():
    """A task data set of N one-token sums with the full model's outcomes, as a run saves it,
    and its fingerprint."""
    columns = {"prompt": [f"Calculate: {i}+0=" for i in range(N)],
               "answer": list(map(str, ANSWERS)), "answer_value": ANSWERS, "answer_token_id": ANSWERS,
               "answer_token_ids": [[a] for a in ANSWERS], "A": list(range(N)), "B": [0] * N,
               "C": [0] * N, "operators": ["+"] * N,
               "expression": [f"{i}+0" for i in range(N)], "task": ["A+B"] * N,
               "style": ["calculate"] * N, "template": ["Calculate: {A}+{B}="] * N,
               "n_tokens": [5] * N, "input_ids": [[1, 2, 3, 4, i] for i in range(N)]}
    data = make_dataset(columns, {"format": METADATA_FORMAT})
    return data.add_column("full_correct", FULL_OK), task_fingerprint(data)


DATA, FINGERPRINT = saved_dataset()


def predictions(right: set[int]) -> list[int]:
    """Predictions right exactly on the prompts in ``right``."""
    return [a if i in right else (a + 1) % 10 for i, a in enumerate(ANSWERS)]


def make_row(experiment: str, right: set[int], **fields) -> dict:
    """A results row (no setting, no intervals: an old file's) with counts computed here."""
    n_full = sum(FULL_OK)
    both = sum(1 for i in right if FULL_OK[i])
    return {"experiment": experiment, "task": "A+B", "style": "calculate",
            "dataset_fingerprint": FINGERPRINT, "sink": True, "wait_ablation": "cama",
            "transfer_peek": "last", "layer": None, "window": None, "variant": None,
            "faithfulness": both / n_full, "full_accuracy": n_full / N,
            "af1_accuracy": len(right) / N, "n_prompts": N, "n_full_correct": n_full,
            "n_af1_correct_of_full": both, "n_af1_correct": len(right),
            "pred_ids": predictions(right), **fields}


def share(right: int, total: int) -> str:
    low, high = wilson_by_formula(right, total)
    return f"{right / total:.3f} [{low:.3f}, {high:.3f}] ({right}/{total})"


def versus(first: set[int], second: set[int]) -> str:
    """Discordant counts among the full model's right prompts, and the McNemar p-value."""
    only_first = sum(1 for i in first - second if FULL_OK[i])
    only_second = sum(1 for i in second - first if FULL_OK[i])
    return (f"{only_first} / {only_second}, "
            f"p={mcnemar_by_enumeration(only_first, only_second):.2g}")


CHOSEN = set(range(24)) | {27}              # (20, 4): 24/26, plus one the full model misses
NEIGHBOURS = {(20, 3): set(range(14)), (19, 4): set(range(2, 26)), (21, 4): set(range(10)),
              (20, 5): set(range(20)) | {26}}
VARIANTS = {"AF1 (CAMA + ABP)": CHOSEN, "wait: zero ablation": {0, 1, 2, 3, 4},
            "transfer: all tokens peek": set(range(1, 26))}


def write_results(directory, threshold_on="point"):
    rows = [make_row("sweep", CHOSEN, l_wait=20, l_transfer=4)]
    rows += [make_row("sweep", right, l_wait=w, l_transfer=t)
             for (w, t), right in NEIGHBOURS.items()]
    rows += [make_row("alternatives", right, l_wait=20, l_transfer=4, variant=variant,
                      sink=None, wait_ablation=None, transfer_peek=None)
             for variant, right in VARIANTS.items()]
    directory.mkdir()
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "manifest.json").write_text(json.dumps({
        "model": {"model_id": "test-model", "n_layers": 30},
        "config": {"threshold": 0.9, "threshold_on": threshold_on}}))
    DATA.save_to_disk(str(directory / "data" / "A+B-calculate"))


def test_tables_show_intervals_counts_and_paired_tests(tmp_path):
    write_results(tmp_path / "run")
    render_all(tmp_path / "run")
    tables = (tmp_path / "run" / "figures" / "tables.md").read_text()
    # The search: (20, 4) is the largest wait at 0.9, shown with its interval.
    assert ("Threshold 0.9 on the point estimate: AF1 configuration L_wait=20, L_transfer=4."
            ) in tables
    assert (f"Faithfulness {share(24, 26)}, in-sample (selected on these prompts") in tables
    # Its neighbours against it on the same prompts (rows without the continuous measures).
    for (w, t), right in NEIGHBOURS.items():
        assert f"| {w} | {t} | {share(len(right & set(range(26))), 26)} | n/a | n/a | " \
               f"{versus(CHOSEN, right)} |" in tables
    assert versus(CHOSEN, NEIGHBOURS[(20, 3)]) == "10 / 0, p=0.002"  # 14/26 next to 24/26
    # Alternatives: shares with intervals, AF1 against the full model, each against AF1.
    for variant, right in VARIANTS.items():
        both = len(right & set(range(26)))
        full_only, af1_only = 26 - both, len(right) - both
        against_af1 = "-" if right is CHOSEN else versus(CHOSEN, right)
        assert (f"| {variant} | {share(26, N)} | {share(len(right), N)} | {share(both, 26)} | "
                f"n/a | n/a | {full_only} / {af1_only}, "
                f"p={mcnemar_by_enumeration(full_only, af1_only):.2g} | {against_af1} |"
                ) in tables


def test_search_on_the_lower_bound_is_stated(tmp_path):
    write_results(tmp_path / "run", threshold_on="lower")
    render_all(tmp_path / "run")
    tables = (tmp_path / "run" / "figures" / "tables.md").read_text()
    # No lower end reaches 0.9 with 26 prompts. The highest, 24/26, is at (20, 4) and (19, 4):
    # the larger wait is reported, flagged.
    assert wilson_by_formula(24, 26)[0] < 0.9
    assert ("Threshold 0.9 on the 95% interval's lower end: AF1 configuration L_wait=20, "
            "L_transfer=4 (threshold not reached: best cell).") in tables
    assert f"Faithfulness {share(24, 26)}, in-sample" in tables
