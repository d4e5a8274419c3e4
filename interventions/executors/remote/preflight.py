"""Before anything is sent to NDIF: preflight checks.

Preflight answers four questions before expensive work, each with one clear message: is there
an API key, does the client's nnsight match the server's (else the exact ``pip install``, or
``--allow-nnsight-mismatch``), does its transformers build layers the same way (same
major.minor, unless ``--allow-version-drift``), and can NDIF run the model:

* deployed and running: go;
* listed but not deployed (COLD, deploying, or listed for on-demand loading): go, with one note
  that the first request may wait while NDIF loads it and that keys without on-demand access
  are refused (the client then turns that refusal into one line naming the hosted models of
  the same family, :class:`OnDemand`);
* unknown to NDIF: one ``error:`` line with the closest hosted model and the exact command.

Models are matched as NDIF keys them: the Hub's canonical repo id (the user may type another
spelling), the revision and the task. The key's tags (``/whoami``) tell which path NDIF takes
with its requests: ``trusted`` in-process, any other key in the sandbox. The decision
(:func:`preflight_decision`) is a pure function of :class:`NdifAnswers`, so it is tested with
canned answers; :func:`fetch_ndif_answers` is the thin part that asks NDIF. A dry run sends
nothing, so without a key or a reachable NDIF its preflight reads "not checked", and a version
mismatch is reported in its plan rather than stopping it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from ...errors import UserError
from .transport import package_version

KEY_URL = "https://login.ndif.us"
STATUS_COMMAND = "python -c 'import nnsight; print(nnsight.status())'"
_DEPLOYED = ("HOT", "WARM")  # NDIF's deployed levels (COLD: downloaded, not loaded)
TASK = "text-generation"  # the task in every model key this toolkit sends
TRUSTED_TAG = "trusted"  # a key's tag that runs its requests in-process (ndif/services/api/auth.py)


# -- preflight ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NdifAnswers:
    """What preflight decides on, as data.

    Attributes:
        api_key_present: ``NDIF_API_KEY`` or nnsight's config holds a key.
        client_version: this process's nnsight version.
        server_env: NDIF's ``/env`` answer (``{"python_version", "packages": {name: version}}``),
            or ``None`` when it could not be fetched.
        status: NDIF's raw ``/status`` answer (``{"deployments": {name: {"repo_id",
            "revision", "deployment_level", "application_state", ...}}}``), or ``None``.
        host: the NDIF URL asked.
        error: why ``status``/``server_env`` are missing, if they are.
        key_tags: the key's tags from ``/whoami`` (``None``: not asked, or no answer).
    """

    api_key_present: bool
    client_version: str
    server_env: dict | None
    status: dict | None
    host: str
    error: str | None = None
    key_tags: list | None = None


@dataclass(frozen=True)
class OnDemand:
    """A model NDIF lists but has not deployed: what the client says if NDIF refuses to load
    it (:meth:`refusal`).

    Attributes:
        repo_id: the model; running: ``(repo id, model type or None)`` of each model NDIF runs;
        model_type: the model's architecture (its config's, once loaded: see
        :meth:`of_type`).
    """

    repo_id: str
    running: tuple[tuple[str, str | None], ...]
    model_type: str | None = None

    def of_type(self, model_type: str) -> "OnDemand":
        return dataclasses.replace(self, model_type=model_type)

    @property
    def family(self) -> tuple[str, ...]:
        """Running models of the same family, closest first: the same architecture where
        NDIF's status names it, else the same organisation."""
        org = self.repo_id.lower().rpartition("/")[0]
        members = {repo for repo, kind in self.running
                   if (self.model_type is not None and kind == self.model_type)
                   or repo.lower().rpartition("/")[0] == org}
        return tuple(ranked_by_closeness(self.repo_id, members))

    def refusal(self, cause: str) -> str:
        """The one ``error:`` line for NDIF refusing to load the model (``cause``: its words)."""
        hosted = (f"; hosted models of the same family: {', '.join(self.family)} (e.g. "
                  f"`--model {self.family[0]}`)" if self.family else
                  f"; no model of its family is running now (check with `{STATUS_COMMAND}`)")
        return (f"NDIF did not load {self.repo_id} on demand ({cause}): it has not deployed "
                "this model, and keys without on-demand access are refused" + hosted)


@dataclass
class PreflightResult:
    """``errors`` stop the run (first one first); ``warnings`` are printed and the run goes on."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed, e.g. a model loaded on demand
    deployment: dict | None = None
    on_demand: OnDemand | None = None  # a model NDIF lists but has not deployed
    server_path: str | None = None  # "trusted" or "sandbox", from the key's tags
    summary: str | None = None  # one line for the dry run
    server_transformers: str | None = None  # for the self-check's message

    @property
    def ok(self) -> bool:
        return not self.errors

    def check(self) -> "PreflightResult":
        """Raise the first error as a :class:`UserError` (one line for ``run.py``)."""
        if self.errors:
            raise UserError(self.errors[0])
        return self


def _deployments(status: dict) -> list[dict]:
    """NDIF's deployments of text-generation models (``/status`` lists one per replica; COLD
    entries, downloaded only, name no task)."""
    return [d for d in (status or {}).get("deployments", {}).values()
            if d.get("repo_id") and d.get("task") in (None, TASK)]


def _running(deployment: dict) -> bool:
    return (deployment.get("deployment_level") in _DEPLOYED
            and deployment.get("application_state") == "RUNNING")


def running_models(status: dict) -> list[str]:
    """Repo ids NDIF has deployed and running, sorted."""
    return sorted({d["repo_id"] for d in _deployments(status) if _running(d)})


def _model_type(deployment: dict) -> str | None:
    try:
        return json.loads(deployment.get("config") or "{}").get("model_type")
    except ValueError:
        return None


def running_with_types(status: dict) -> tuple[tuple[str, str | None], ...]:
    """``(repo id, config.model_type or None)`` of each model NDIF runs."""
    return tuple(sorted({(d["repo_id"], _model_type(d)) for d in _deployments(status)
                         if _running(d)}, key=lambda item: (item[0], str(item[1]))))


def _size(name: str) -> str | None:
    sizes = re.findall(r"(\d+(?:\.\d+)?)b(?![a-z])", name.lower())
    return sizes[-1] if sizes else None


def _closeness(repo_id: str, candidate: str) -> float:
    org, _, name = repo_id.lower().rpartition("/")
    c_org, _, c_name = candidate.lower().rpartition("/")
    ratio = difflib.SequenceMatcher(None, name, c_name).ratio()
    same_size = _size(name) is not None and _size(name) == _size(c_name)
    return ratio + 0.5 * same_size + 0.1 * (org == c_org)


def ranked_by_closeness(repo_id: str, candidates) -> list[str]:
    """``candidates`` most like ``repo_id`` first (see :func:`closest_model`)."""
    return sorted(candidates, key=lambda c: (-_closeness(repo_id, c), c))


def closest_model(repo_id: str, candidates: Sequence[str]) -> str | None:
    """The candidate most like ``repo_id``: similar name, same parameter count (``8B``), same
    organisation; ``None`` when nothing is close. ``meta-llama/Meta-Llama-3-8B`` ->
    ``meta-llama/Llama-3.1-8B`` rather than the 70B or an instruct variant."""
    ranked = ranked_by_closeness(repo_id, candidates)
    return ranked[0] if ranked and _closeness(repo_id, ranked[0]) >= 0.6 else None


def preflight_decision(repo_id: str, answers: NdifAnswers, revision: str | None = None,
                       allow_version_drift: bool = False, allow_nnsight_mismatch: bool = False,
                       model_type: str | None = None) -> PreflightResult:
    """Decide whether ``repo_id`` can run on NDIF, from data only (no network).

    Checks, in order: API key; NDIF reachable; client nnsight == server nnsight (NDIF requires
    it; a warning with ``allow_nnsight_mismatch``); the same transformers major.minor on both
    sides (an error unless ``allow_version_drift``; other torch/transformers differences are
    warnings); the model: running at the requested revision (go), listed but not deployed (go,
    with a note and :attr:`PreflightResult.on_demand`), unknown (an error). ``repo_id`` is the
    Hub's canonical spelling where it could be asked (NDIF's keys use it); ``model_type`` (the
    config's) finds the family's hosted models.
    """
    result = PreflightResult()
    if not answers.api_key_present:
        result.errors.append(
            f"no NDIF API key: get one at {KEY_URL}, then `export NDIF_API_KEY=<key>` or store "
            "it once with `python -c 'import nnsight; nnsight.login()'`")
        return result
    if answers.status is None and answers.server_env is None:
        result.errors.append(f"cannot reach NDIF at {answers.host}"
                             + (f" ({answers.error})" if answers.error else "")
                             + "; check the network (and NDIF_HOST) or https://discuss.ndif.us")
        return result
    if answers.key_tags is not None:
        result.server_path = "trusted" if TRUSTED_TAG in answers.key_tags else "sandbox"

    if answers.server_env is None:
        result.warnings.append("could not read NDIF's package versions; nnsight versions "
                               "are unchecked")
    else:
        packages = answers.server_env.get("packages", {})
        mismatch = nnsight_mismatch(answers)
        if mismatch is not None:
            if allow_nnsight_mismatch:
                result.warnings.append(mismatch + " (--allow-nnsight-mismatch: trying anyway; "
                                                  "NDIF may refuse or misread requests)")
            else:
                result.errors.append(mismatch + ", or pass --allow-nnsight-mismatch to try "
                                                "anyway")
        for name in ("torch", "transformers"):
            local = package_version(name)
            remote = packages.get(name)
            if remote is None or local is None or remote == local:
                continue
            if name == "transformers" and _major_minor(local) != _major_minor(remote):
                drift = (f"transformers {local} here but {remote} on NDIF: another major.minor "
                         "can build the model's layers differently (module tree, mask "
                         "argument), so interventions resolved here may not do what they should")
                if allow_version_drift:
                    result.warnings.append(drift + " (--allow-version-drift: the self-check on "
                                                   "arrival still guards them)")
                else:
                    result.errors.append(drift + f"; `pip install 'transformers=="
                                                 f"{_major_minor(remote)}.*'`, or pass "
                                                 "--allow-version-drift to run anyway")
            else:
                result.warnings.append(f"{name} {local} here, {remote} on NDIF (traces run with "
                                       "NDIF's)")

    if answers.status is None:
        result.errors.append(f"cannot read NDIF's model list ({answers.error or 'no answer'}); "
                             f"check with `{STATUS_COMMAND}`")
        return result
    running = running_models(answers.status)
    listing = ", ".join(running) if running else "none"
    wanted = revision or "main"
    # NDIF's keys hold the canonical repo id; a spelling the Hub could not be asked about is
    # matched without regard to case.
    matches = [d for d in _deployments(answers.status) if d["repo_id"] == repo_id] or \
        [d for d in _deployments(answers.status) if d["repo_id"].lower() == repo_id.lower()]
    live = [d for d in matches if _running(d)]
    if not matches:
        near = closest_model(repo_id, running)
        result.errors.append(
            f"NDIF does not host {repo_id}"
            + (f"; the closest hosted model is {near} (`--model {near}`)" if near else "")
            + f"; running now: {listing} (check with `{STATUS_COMMAND}`)")
    elif live:
        at_revision = [d for d in live if (d.get("revision") or "main") == wanted]
        if at_revision:
            result.deployment = at_revision[0]
            return result
        served = ", ".join(sorted({d.get("revision") or "main" for d in live}))
        result.errors.append(f"NDIF runs {repo_id} at revision {served}, not {wanted}; "
                             f"pass --revision {served.split(', ')[0]}")
    else:
        states = ", ".join(sorted({"/".join(filter(None, (d.get("deployment_level"),
                                                          d.get("application_state"))))
                                   for d in matches}))
        result.on_demand = OnDemand(matches[0]["repo_id"], running_with_types(answers.status),
                                    model_type)
        result.deployment = matches[0]
        result.notes.append(
            f"NDIF lists {repo_id} but has not deployed it ({states}); the run goes on and "
            "NDIF loads it on demand, so the first request (the self-check) may wait while it "
            "loads; keys without on-demand access are refused by NDIF, and then this run stops "
            "with one line naming the hosted models of its family")
    return result


def nnsight_mismatch(answers: NdifAnswers) -> str | None:
    """The line saying client and NDIF nnsight differ, with the exact install; ``None`` when
    they agree (or NDIF's is unknown)."""
    server = ((answers.server_env or {}).get("packages") or {}).get("nnsight")
    if server is None or server == answers.client_version:
        return None
    return (f"nnsight {answers.client_version} here but {server} on NDIF, which requires them "
            f"to match: `pip install nnsight=={server}`")


def _major_minor(version: str) -> str:
    """``"5.24.0"`` -> ``"5.24"``."""
    return ".".join(version.split(".")[:2])


def fetch_ndif_answers() -> NdifAnswers:
    """Ask NDIF (``/status``, ``/env`` and ``/whoami``, through nnsight's helpers) what
    preflight needs.

    Asks nothing when there is no API key: that is the first thing to fix.
    """
    from nnsight import ndif
    from nnsight.schema.config import CONFIG

    present = bool(CONFIG.API.APIKEY)
    client = package_version("nnsight") or "unknown"
    if not present:
        return NdifAnswers(False, client, None, None, CONFIG.API.HOST)
    errors = []
    # nnsight answers {} when NDIF is unreachable, and prints a banner; the error says it once.
    with contextlib.redirect_stderr(io.StringIO()):
        status = ndif.status(raw=True) or None
    if status is None:
        errors.append("no answer to /status")
    try:
        env = ndif.get_remote_env()
    except Exception as err:  # noqa: BLE001 - any failure means "could not fetch"
        env = None
        errors.append(f"/env: {err}")
    tags = None
    if status is not None:
        try:
            tags = list(ndif.whoami().get("tags") or [])
        except Exception:  # noqa: BLE001 - an older NDIF without /whoami: path unknown
            tags = None
    return NdifAnswers(True, client, env, status, CONFIG.API.HOST, "; ".join(errors) or None,
                       tags)


def canonical_repo_id(repo_id: str) -> str:
    """The Hub's spelling of ``repo_id`` (NDIF's keys use it, as nnsight forms them); as typed
    where the Hub cannot be asked (a local directory, no network)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id).id
    except Exception:  # noqa: BLE001 - offline, gated or unknown: matched as typed
        return repo_id


def preflight(repo_id: str, revision: str | None = None, answers: NdifAnswers | None = None,
              allow_version_drift: bool = False, allow_nnsight_mismatch: bool = False,
              dry_run: bool = False, model_type: str | None = None) -> PreflightResult:
    """Fetch NDIF's answers (unless given) and raise the first blocking problem as a
    :class:`UserError`; returns the result (its ``warnings`` and ``notes`` for the caller to
    print and its ``summary`` for a dry run).

    A dry run sends nothing, so it needs neither a key nor a reachable NDIF (then the result
    is ``not checked`` with the reason, and no error), nor the same nnsight as NDIF (its
    summary then gives the ``pip install`` a real run needs).
    """
    if answers is None:  # asking NDIF itself: its keys spell the repo id as the Hub does
        repo_id = canonical_repo_id(repo_id)
        answers = fetch_ndif_answers()
    if dry_run and (not answers.api_key_present or
                    (answers.status is None and answers.server_env is None)):
        reason = "no NDIF API key" if not answers.api_key_present else \
            f"NDIF unreachable at {answers.host}" + (f" ({answers.error})" if answers.error
                                                     else "")
        return PreflightResult(summary=f"not checked: {reason}")
    result = preflight_decision(repo_id, answers, revision, allow_version_drift,
                                allow_nnsight_mismatch or dry_run, model_type).check()
    server = (answers.server_env or {}).get("packages", {})
    result.server_transformers = server.get("transformers")
    mismatch = nnsight_mismatch(answers)
    if dry_run and mismatch and not allow_nnsight_mismatch:  # said in the plan instead
        result.warnings = [w for w in result.warnings if not w.startswith(mismatch)]
    result.summary = (f"passed (NDIF {'runs' if result.on_demand is None else 'lists'} "
                      f"{repo_id}; nnsight {server.get('nnsight', '?')}, transformers "
                      f"{server.get('transformers', '?')} there"
                      + (f"; the run needs {mismatch.split(': ', 1)[1]}"
                         if dry_run and mismatch and not allow_nnsight_mismatch else "")
                      + ("; loaded on demand" if result.on_demand is not None else "") + ")")
    return result
