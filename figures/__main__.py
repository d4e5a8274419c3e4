"""``python -m figures RESULTS_DIR [--out DIR]``: rebuild every figure from saved results."""

import argparse
import sys

from .render import render_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m figures",
        description="Rebuild every AF1 figure (PNG, PDF, caption) and tables.md from a results "
                    "directory written by run.py. Loads no model.")
    parser.add_argument("results_dir", help="a directory with results.jsonl and manifest.json")
    parser.add_argument("--out", default=None,
                        help="where to write (default RESULTS_DIR/figures)")
    args = parser.parse_args(argv)
    try:
        written = render_all(args.results_dir, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
