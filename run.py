#!/usr/bin/env python
"""AF1 command line: parses flags, hands them to ``interventions.pipeline.jobs.run_job`` (or
``interventions.pipeline.multi.run_models`` for ``--model A,B``), then draws the figures from the
saved results (``figures``). Every flag's default is the field of its name in
``interventions.pipeline.config.JobConfig``.

    python run.py                      # default job on the embedded SmolLM2-135M (offline)
    python run.py --model meta-llama/Meta-Llama-3-8B --device cuda --tasks A+B,A-B
    python run.py --help
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from interventions.mechanisms.adapters import supported_architectures
    from interventions.pipeline.config import (ANSWER_SCORING, EXECUTOR_NAMES, REMOTE_BACKENDS,
                                               SERVER_PATHS, JobConfig)
    from interventions.pipeline.experiments import THRESHOLD_RULES

    d = JobConfig()  # every default
    parser = argparse.ArgumentParser(
        prog="run.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "All-for-One (AF1): measure how faithfully a model does mental math when tokens wait\n"
            "through the first L_wait layers (their residual h_{L_wait} replaced by CAMA means),\n"
            "only the last token reads the others for L_transfer layers (ABP), and the last token\n"
            "computes alone after that. Writes results.jsonl, the data sets, manifest.json and\n"
            "every figure to --out; rerunning the same command resumes where it stopped.\n\n"
            f"experiments (--experiments, comma list or all; default {d.experiments}):\n"
            "  sweep          faithfulness over the L_wait x L_transfer grid, and the AF1 search\n"
            f"                 (frontier per L_transfer, AF1 configuration at --threshold, "
            f"{d.threshold}\n"
            "                 by default: the paper's criterion; --holdout grades it on prompts\n"
            "                 that did not choose it)\n"
            "  necessity      last token barred from non-sink tokens in one window of 1-4 layers\n"
            "  alternatives   CAMA vs zero / position mean / no wait; ABP vs all peek / no sink\n"
            "  styles         the six input styles x {A+B, A-B} at the AF1 configuration\n"
            "  three_operand  AF1 on A+B+C, A+B-C, A-B+C, A-B-C, and a partial-result probe"),
        epilog=(
            "layer values: a number (5), an inclusive range (0-29) or a list (1,2,4); cells with\n"
            "L_wait + L_transfer > L are skipped. Layers are 0-indexed; h_k enters layer k.\n"
            f"architectures: {supported_architectures()}.\n"
            "figures: python -m figures RESULTS_DIR rebuilds them from saved results (the\n"
            "latest run's setting; --setting dtype=float32 picks another).\n"
            "settings: rows of another dtype, attention or backend are kept apart, never reused.\n"
            "examples:\n"
            "  python run.py\n"
            "  python run.py --experiments all\n"
            "  python run.py --l-wait 10-25 --l-transfer 2 --tasks A+B,A-B\n"
            "  python run.py --model ./my-llama-dir --template 'Q: {A} plus {B} is' --out runs/q\n"
            "  python run.py --tasks capitals,ioi --out runs/recall\n"
            "  python run.py --dataset my_task.jsonl --experiments sweep,necessity\n"
            "  python run.py --model meta-llama/Meta-Llama-3-8B --remote\n"
            "  python run.py --model smollm2,./my-llama-dir --out runs/cmp   # and a comparison\n"
            "compare saved runs: python -m figures compare DIR [DIR ...] --out DIR"),
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=d.model,
                       help=f"'{d.model}' (embedded SmolLM2-135M-Instruct, default), a local "
                            "Hugging Face directory, a .gguf file, or a Hub id; several, "
                            "comma-separated: each runs the same job into --out/<model> "
                            "(default runs/<model>), then the comparison goes to --out/compare/")
    model.add_argument("--revision", default=d.revision,
                       help="Hub revision (branch, tag or commit)")
    model.add_argument("--device", default=d.device,
                       help="cpu, cuda, cuda:N, or auto (all GPUs via device_map='auto', else "
                            "CPU; default)")
    model.add_argument("--dtype", default=d.dtype,
                       choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: float32 on CPU, bfloat16 on GPU")
    model.add_argument("--attn", dest="attn_implementation", default=d.attn_implementation,
                       choices=["sdpa", "eager"],
                       help="attention implementation (default sdpa; eager for Gemma-2, which "
                            "has no sdpa)")
    remote = parser.add_argument_group("remote (NDIF)")
    remote.add_argument("--remote", action="store_true", default=d.remote,
                        help="run every experiment on NDIF (needs NDIF_API_KEY; checks the key, "
                             "nnsight version and that the model is hosted before any work)")
    remote.add_argument("--dry-run", action="store_true", default=d.dry_run,
                        help="with --remote: print the requests, configurations and bytes the "
                             "job would send, and send nothing")
    remote.add_argument("--submit", action="store_true", default=d.submit,
                        help="with --remote: submit the sweep/necessity requests and exit; "
                             "rerun without --submit to collect them")
    remote.add_argument("--cells-per-request", type=int, default=d.cells_per_request,
                        help=f"configurations per NDIF request (default {d.cells_per_request})")
    remote.add_argument("--remote-backend", default=d.remote_backend, choices=REMOTE_BACKENDS,
                        help="local: run the remote path here against local weights, "
                             "serialized exactly as for NDIF and executed by NDIF's own server "
                             "code (the offline test)")
    remote.add_argument("--server-path", default=d.server_path, choices=SERVER_PATHS,
                        help="with --remote-backend local: the path NDIF takes with a request; "
                             "sandbox (default: an ordinary API key's, the request's block runs "
                             "in a runner process against a weightless model, every activation "
                             "crossing a socket) or trusted (a key with NDIF's trusted tag: "
                             "in-process, faster)")
    remote.add_argument("--max-request-mb", type=float, default=d.max_request_mb,
                        help="largest request to send, serialized, before compression "
                             f"(default {d.max_request_mb:g}); larger ones are split in halves, "
                             "as are requests NDIF refuses as too large (HTTP 413)")
    remote.add_argument("--remote-timeout", default=d.remote_timeout,
                        help="give up waiting on NDIF after this long in all (e.g. 90m, 24h; "
                             f"default {d.remote_timeout}); rerunning resumes")
    remote.add_argument("--remote-silence", default=d.remote_silence,
                        help="longest wait for any status from NDIF on a request's websocket "
                             f"(default {d.remote_silence}: longer than NDIF's 1 h execution "
                             "time-out); then the job is asked for by HTTP and, unknown there, "
                             "sent again")
    remote.add_argument("--allow-version-drift", action="store_true",
                        default=d.allow_version_drift,
                        help="run even though NDIF's transformers has another major.minor "
                             "than this client's (the self-check on arrival still runs)")
    remote.add_argument("--allow-nnsight-mismatch", action="store_true",
                        default=d.allow_nnsight_mismatch,
                        help="run even though NDIF runs another nnsight than this client "
                             "(NDIF may then refuse or misread requests)")

    data = parser.add_argument_group("tasks")
    data.add_argument("--tasks", default=None,
                      help="comma-separated tasks: the operator forms A+B, A-B, A+B+C, A+B-C, "
                           "A-B+C, A-B-C, and the built-in non-arithmetic families capitals "
                           "(factual recall: 'The capital of {country} is') and ioi (name "
                           "copying: 'When Mary and John went to the store, John gave a book "
                           f"to') (default {','.join(d.tasks)}, or none with --dataset)")
    data.add_argument("--dataset", default=d.dataset, metavar="PATH_OR_HUB_ID",
                      help="your own task: a data set with a prompt and an answer column (a "
                           "save_to_disk directory, a .parquet/.csv/.jsonl file, or a Hub id); "
                           "every experiment but styles/three_operand runs on it. A 'template' "
                           "column groups the CAMA means by template")
    data.add_argument("--prompt-column", default=d.prompt_column,
                      help=f"--dataset's prompt column (default {d.prompt_column})")
    data.add_argument("--answer-column", default=d.answer_column,
                      help="--dataset's answer column: the text that follows the prompt "
                           f"(default {d.answer_column})")
    data.add_argument("--split", default=d.split,
                      help=f"--dataset's split, where it has several (default {d.split})")
    data.add_argument("--style", default=d.style,
                      help="input style: calculate (default), symbolic, words, question, "
                           "instruction, story, code")
    data.add_argument("--template", default=d.template,
                      help="your own prompt with {A}, {B} (and {C}) slots; overrides --style")
    data.add_argument("--n-prompts", type=int, default=d.n_prompts,
                      help=f"sample at most this many prompts per task (default {d.n_prompts}; "
                           "seeded)")
    data.add_argument("--seed", type=int, default=d.seed,
                      help=f"sampling seed (default {d.seed})")
    data.add_argument("--operand-range", default=None, metavar="LO-HI",
                      help="operand range, inclusive (default: by tokenizer, 1-99 when numbers "
                           "are single tokens, else 1-9 with single-digit results). Given on a "
                           "tokenizer that splits numbers into digits, answers of several "
                           "tokens are kept and scored as --answer says")
    data.add_argument("--answer", default=d.answer, choices=ANSWER_SCORING,
                      help="scoring of answers of several tokens: first (default; the first "
                           "answer token at the last prompt position) or full (teacher forcing: "
                           "each answer prefix becomes its own prompt, and a prompt counts only "
                           "when every answer token is right)")

    grid = parser.add_argument_group("experiments and AF1 grid")
    grid.add_argument("--experiments", default=d.experiments,
                      help="sweep, necessity, alternatives, styles, three_operand (comma list) "
                           f"or all (default {d.experiments})")
    grid.add_argument("--threshold", type=float, default=d.threshold,
                      help=f"faithfulness the AF1 search requires (default {d.threshold}: "
                           "the paper's "
                           "criterion, the subgraph keeps at least 85%% of the full model's "
                           "performance); the configuration at 0.9 is reported too where it "
                           "differs")
    grid.add_argument("--threshold-on", default=d.threshold_on, choices=THRESHOLD_RULES,
                      help="what must reach --threshold: the cell's faithfulness (point, "
                           "default) or the lower end of its 95%% Wilson interval (lower: the "
                           "prompts rule out a faithfulness below the threshold)")
    grid.add_argument("--holdout", type=float, default=d.holdout, metavar="FRACTION",
                      help="hold out this share of the prompts the full model gets right "
                           "(e.g. 0.5; drawn with --seed, stratified by template and token "
                           "length): the AF1 configuration is chosen on the others and graded "
                           "on these, so its faithfulness is not the best of many cells on "
                           "its own prompts (default: chosen and graded on the same prompts, "
                           "labelled in-sample)")
    grid.add_argument("--af1-config", default=d.af1_config, metavar="L_WAIT,L_TRANSFER",
                      help="use this AF1 configuration for alternatives/styles/three_operand "
                           "instead of searching the sweep")
    grid.add_argument("--l-wait", default=d.l_wait,
                      help="L_wait values (default: every layer 0..L-1)")
    grid.add_argument("--l-transfer", default=d.l_transfer,
                      help=f"L_transfer values (default {d.l_transfer})")
    grid.add_argument("--cama-table", default=d.cama_table,
                      help="use this CAMA table (.safetensors) instead of the cache; it must "
                           "match the model, data set and dtype")

    run = parser.add_argument_group("run")
    run.add_argument("--out", default=d.out, help="output directory (default runs/<model>)")
    run.add_argument("--batch-size", type=int, default=d.batch_size,
                     help="prompts per forward pass")
    run.add_argument("--executor", default=d.executor, choices=EXECUTOR_NAMES,
                     help="how cells are evaluated locally: fast (default; skips the wait "
                          "layers, runs the last token alone in the compute stage, shares the "
                          "transfer stage across L_transfer) or nnsight (the reference path: "
                          "every layer inside nnsight traces)")
    run.add_argument("--cache-dir", default=d.cache_dir,
                     help="cache for converted models and CAMA tables (default $AF1_CACHE or "
                          "~/.cache/af1)")
    run.add_argument("--no-progress", action="store_true", default=not d.progress,
                     help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from interventions.errors import UserError
    from interventions.mechanisms.plan import PlanError
    from interventions.pipeline.config import config_from_args
    from interventions.pipeline.jobs import run_job
    from interventions.pipeline.multi import run_models

    from figures.compare import compare_runs
    from figures.render import render_run

    try:
        cfg = config_from_args(args, sys.argv if argv is None else ["run.py", *argv])
        if "," in cfg.model:
            return run_models(cfg, cfg.model, render=render_run, compare=compare_runs)
        out = run_job(cfg)
        if cfg.evaluates:
            render_run(out)
    except (UserError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept in results.jsonl (and finished NDIF "
              "requests in remote/ beside it); rerun to resume", file=sys.stderr)
        return 130
    if not cfg.dry_run:
        print(f"[af1] results in {out}/ (results.jsonl, manifest.json, data/, figures/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
