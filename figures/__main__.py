"""``python -m figures RESULTS_DIR [--out DIR] [--setting FIELD=VALUE,...] [--metric M]``:
rebuild every figure from saved results. ``python -m figures compare DIR [DIR ...] --out DIR``:
compare runs (:mod:`figures.compare`)."""

import argparse
import sys

from interventions.pipeline.scoring import PairingError

from .render import METRICS, SettingNotFound, render_all


def parse_setting(spec: str | None) -> dict:
    """``"dtype=bfloat16,backend=ndif"`` -> ``{"dtype": "bfloat16", "backend": "ndif"}``."""
    if not spec:
        return {}
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SettingNotFound(f"--setting takes FIELD=VALUE pairs separated by commas, got "
                                  f"{spec!r}")
        fields[key.strip()] = value.strip()
    return fields


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m figures",
        description="Rebuild every AF1 figure (PNG, PDF, caption) and tables.md from a results "
                    "directory written by run.py. Loads no model. 'python -m figures compare "
                    "DIR [DIR ...] --out DIR' compares runs.")
    parser.add_argument("results_dir", help="a directory with results.jsonl and manifest.json")
    parser.add_argument("--out", default=None,
                        help="where to write (default RESULTS_DIR/figures)")
    parser.add_argument("--setting", default=None, metavar="FIELD=VALUE,...",
                        help="draw the rows of this setting (fields: dtype, attn_implementation, "
                             "backend, answer_scoring; e.g. dtype=bfloat16); fields not given "
                             "are the latest run's (manifest.json), and by default the whole "
                             "setting is")
    parser.add_argument("--metric", default="faithfulness", choices=METRICS,
                        help="what the heatmap shows: faithfulness (default; heatmap_<task>), "
                             "prob_ratio (AF1's mean answer probability over the full "
                             "model's) or kl (mean KL(full || AF1) in nats), both on the "
                             "prompts the full model gets right (heatmap_<metric>_<task>)")
    args = parser.parse_args(argv)
    try:
        written = render_all(args.results_dir, args.out, setting=parse_setting(args.setting),
                             metric=args.metric)
    except (FileNotFoundError, SettingNotFound, PairingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
