"""What a job does only on NDIF: the client and the self-check on arrival, the dry-run plan
(what would be sent, sizes included) and ``--submit`` (send and exit; a rerun collects)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..mechanisms.plan import AF1Plan, as_intervention, table_layers
from .experiments import NEEDS_CONFIG, PROBE_TASK, evaluation_plan
from .results import cell_key

if TYPE_CHECKING:
    from .state import Job
    from .taskrun import TaskRun


def start_remote(job: Job, first_run: TaskRun) -> None:
    """Make the job's remote client, then run the self-check on arrival on the first task's
    prompts; its outcome goes to the manifest (``remote.self_check``), and a failure stops the
    job with one line before any cell is sent."""
    from ..executors.remote.client import RemoteClient
    from ..executors.remote.selfcheck import run_self_check
    from .config import parse_duration

    cfg = job.cfg
    checked = job.preflight
    if cfg.remote_backend == "local":
        server_path = cfg.server_path or "sandbox"
    else:
        server_path = checked.server_path if checked is not None else None
    job.client = RemoteClient(job.model, cfg.remote_backend, ledger=job.out / "remote",
                              server_path=server_path, blocking=not cfg.submit,
                              max_request_bytes=max_request_bytes(cfg),
                              overall_timeout_s=parse_duration(cfg.remote_timeout,
                                                               "remote-timeout"),
                              silence_s=parse_duration(cfg.remote_silence, "remote-silence"),
                              on_demand=_on_demand(checked, job.model))
    server = checked.server_transformers if checked is not None else None
    check = run_self_check(job.client, job.model, first_run.dataset["prompt"], server)
    job.client.stats.self_check = check.to_dict()
    job.manifest["remote"] = job.client.stats.to_dict()
    job.save_manifest()
    check.check()


def _on_demand(checked, model):
    """What to say if NDIF will not load a model it has not deployed (its family known from
    the model's config); ``None`` for a deployed model."""
    if checked is None or checked.on_demand is None:
        return None
    return checked.on_demand.of_type(model.identity.architecture)


def max_request_bytes(cfg) -> int:
    """``--max-request-mb`` in bytes (decimal megabytes, as network sizes are given)."""
    return int(cfg.max_request_mb * 1_000_000)


def dry_run(job: Job, main_runs, extra_runs, plans, fixed_config) -> str:
    """The remote requests the job would send, with their sizes and the preflight's outcome;
    writes and sends nothing. The plan (a ``RemotePlan``) is kept as ``job.remote_plan``."""
    from ..executors.remote.dryrun import PlannedTask, measure_remote_job
    from ..mechanisms.cama import cama_cache_path
    from .results import read_results

    done = set()
    if (job.out / "results.jsonl").is_file():
        done = {cell_key(r) for r in read_results(job.out / "results.jsonl")}
    n_layers = job.model.n_layers
    tasks = []
    built: dict[str, set] = {}  # layers each task's table will hold by then
    # Before any search, configuration-dependent cells use --af1-config or the middle of the
    # model (an estimate: the request count does not depend on it).
    config = fixed_config or AF1Plan(n_layers // 2, min(2, n_layers - n_layers // 2))
    for _, run, cells in evaluation_plan(job.experiments, main_runs, extra_runs, plans, n_layers,
                                         lambda run: config):
        todo = [c for c in cells if cell_key({**run.row_base, **c.row_fields()}) not in done]
        if not todo:
            continue
        interventions = [as_intervention(c.intervention, n_layers) for c in todo]
        needed = table_layers(interventions)
        first = run.label not in built
        have = built.setdefault(run.label, set())
        if first and cama_cache_path(job.model, run.fingerprint, job.cache_root).is_file():
            have.update(range(n_layers + 1))
        build = sorted(needed | have) if not needed <= have else []
        have.update(build)
        tasks.append(PlannedTask(run.label, run.prompts, [c.intervention for c in todo],
                                 build, clean=first, answer_ids=run.answers, groups=run.groups))
    plan = measure_remote_job(job.model, tasks, batch_size=job.cfg.batch_size,
                              cells_per_request=job.cfg.cells_per_request,
                              max_request_bytes=max_request_bytes(job.cfg),
                              self_check_prompts=main_runs[0].dataset["prompt"])
    job.remote_plan = plan
    preflight = ("not needed (--remote-backend local: the server is this process)"
                 if job.preflight is None else job.preflight.summary)
    note = "" if fixed_config or not any(
        e in job.experiments for e in NEEDS_CONFIG) else (
        "\nnote: alternatives/styles/three_operand are planned at an assumed AF1 configuration "
        "(the sweep decides the real one; the request count does not depend on it)")
    probe = next((r for r in extra_runs.get("three_operand", []) if r.task == PROBE_TASK), None)
    if probe is not None and not (job.out / "probe.json").is_file():
        pairs = len(set(zip(probe.dataset["A"], probe.dataset["B"])))
        batches = -(-pairs // job.cfg.batch_size)
        note += (f"\nplus the partial-result probe: {3 * batches} small requests (3 reads x "
                 f"{batches} batches of its {pairs} operand pairs)")
    return f"preflight: {preflight}\n{plan}{note}"


def submit(job: Job, main_runs: list[TaskRun], plans: list[AF1Plan]) -> None:
    """Build the CAMA tables (waiting), then submit every sweep/necessity request without
    waiting; the job ids stay in ``<out>/remote``. Rerunning without ``--submit`` collects."""
    jobs = []
    experiments = [e for e in job.experiments if e in ("sweep", "necessity")]
    for _, run, cells in evaluation_plan(experiments, main_runs, {}, plans, job.model.n_layers,
                                         None):
        items = run.items(cells)
        if items:
            jobs += run.executor.submit(items)
    job.client.close()
    job.manifest.update(status="submitted", submitted_jobs=jobs,
                        remote=job.client.stats.to_dict())
    job.save_manifest()
    print(f"[af1] submitted {len(jobs)} requests; rerun the same command without --submit to "
          f"collect them (job ids in {job.out / 'remote'})", flush=True)
