"""Before anything is sent to NDIF: preflight checks.

Preflight answers four questions before expensive work, each with one clear message: is there
an API key, does the client's nnsight match the server's, does its transformers build layers
the same way (same major.minor, unless ``--allow-version-drift``), and is the model hosted and
running on NDIF (else: what is, and which hosted model is closest). The decision
(:func:`preflight_decision`) is a pure function of :class:`NdifAnswers`, so it is tested with
canned answers; :func:`fetch_ndif_answers` is the thin part that asks NDIF. A dry run sends
nothing, so without a key or a reachable NDIF its preflight reads "not checked".
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
from dataclasses import dataclass, field
from typing import Sequence

from ...errors import UserError
from .transport import package_version

KEY_URL = "https://login.ndif.us"
STATUS_COMMAND = "python -c 'import nnsight; print(nnsight.status())'"
_DEPLOYED = ("HOT", "WARM")  # NDIF's deployed levels (COLD: downloaded, not loaded)


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
    """

    api_key_present: bool
    client_version: str
    server_env: dict | None
    status: dict | None
    host: str
    error: str | None = None


@dataclass
class PreflightResult:
    """``errors`` stop the run (first one first); ``warnings`` are printed and the run goes on."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    deployment: dict | None = None
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
    return [d for d in (status or {}).get("deployments", {}).values() if d.get("repo_id")]


def running_models(status: dict) -> list[str]:
    """Repo ids NDIF has deployed and running, sorted."""
    return sorted({d["repo_id"] for d in _deployments(status)
                   if d.get("deployment_level") in _DEPLOYED
                   and d.get("application_state") == "RUNNING"})


def _size(name: str) -> str | None:
    sizes = re.findall(r"(\d+(?:\.\d+)?)b(?![a-z])", name.lower())
    return sizes[-1] if sizes else None


def closest_model(repo_id: str, candidates: Sequence[str]) -> str | None:
    """The candidate most like ``repo_id``: similar name, same parameter count (``8B``), same
    organisation; ``None`` when nothing is close. ``meta-llama/Meta-Llama-3-8B`` ->
    ``meta-llama/Llama-3.1-8B`` rather than the 70B or an instruct variant."""
    org, _, name = repo_id.lower().rpartition("/")

    def score(candidate: str) -> float:
        c_org, _, c_name = candidate.lower().rpartition("/")
        ratio = difflib.SequenceMatcher(None, name, c_name).ratio()
        same_size = _size(name) is not None and _size(name) == _size(c_name)
        return ratio + 0.5 * same_size + 0.1 * (org == c_org)

    ranked = sorted(candidates, key=lambda c: (-score(c), c))
    return ranked[0] if ranked and score(ranked[0]) >= 0.6 else None


def preflight_decision(repo_id: str, answers: NdifAnswers, revision: str | None = None,
                       allow_version_drift: bool = False) -> PreflightResult:
    """Decide whether ``repo_id`` can run on NDIF, from data only (no network).

    Checks, in order: API key; NDIF reachable; client nnsight == server nnsight (NDIF requires
    it); the same transformers major.minor on both sides (an error unless
    ``allow_version_drift``; other torch/transformers differences are warnings); the model
    deployed, running and at the requested revision.
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

    if answers.server_env is None:
        result.warnings.append("could not read NDIF's package versions; nnsight versions "
                               "are unchecked")
    else:
        packages = answers.server_env.get("packages", {})
        server = packages.get("nnsight")
        if server is not None and server != answers.client_version:
            result.errors.append(
                f"nnsight {answers.client_version} here but {server} on NDIF, which requires "
                f"them to match: `pip install nnsight=={server}` (this toolkit pins and is "
                f"tested with {answers.client_version})")
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
    matches = [d for d in _deployments(answers.status)
               if d["repo_id"].lower() == repo_id.lower()]
    live = [d for d in matches if d.get("deployment_level") in _DEPLOYED
            and d.get("application_state") == "RUNNING"]
    listing = ", ".join(running) if running else "none"
    if not matches:
        near = closest_model(repo_id, running)
        result.errors.append(
            f"NDIF does not host {repo_id}"
            + (f"; the closest hosted model is {near} (`--model {near}`)" if near else "")
            + f"; running now: {listing} (check with `{STATUS_COMMAND}`)")
    elif not live:
        states = ", ".join(sorted({f"{d.get('deployment_level')}/{d.get('application_state')}"
                                   for d in matches}))
        result.errors.append(f"NDIF hosts {repo_id} but it is not running now ({states}); "
                             f"try again later; running now: {listing}")
    else:
        wanted = revision or "main"
        at_revision = [d for d in live if (d.get("revision") or "main") == wanted]
        if not at_revision:
            served = ", ".join(sorted({d.get("revision") or "main" for d in live}))
            result.errors.append(f"NDIF runs {repo_id} at revision {served}, not {wanted}; "
                                 f"pass --revision {served.split(', ')[0]}")
        else:
            result.deployment = at_revision[0]
    return result


def _major_minor(version: str) -> str:
    """``"5.24.0"`` -> ``"5.24"``."""
    return ".".join(version.split(".")[:2])


def fetch_ndif_answers() -> NdifAnswers:
    """Ask NDIF (``/status`` and ``/env``, through nnsight's helpers) what preflight needs.

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
    return NdifAnswers(True, client, env, status, CONFIG.API.HOST, "; ".join(errors) or None)


def preflight(repo_id: str, revision: str | None = None, answers: NdifAnswers | None = None,
              allow_version_drift: bool = False, dry_run: bool = False) -> PreflightResult:
    """Fetch NDIF's answers (unless given) and raise the first blocking problem as a
    :class:`UserError`; returns the result (its ``warnings`` for the caller to print and its
    ``summary`` for a dry run).

    A dry run sends nothing, so it needs neither a key nor a reachable NDIF: then the result
    is ``not checked`` with the reason, and no error.
    """
    answers = answers or fetch_ndif_answers()
    if dry_run and (not answers.api_key_present or
                    (answers.status is None and answers.server_env is None)):
        reason = "no NDIF API key" if not answers.api_key_present else \
            f"NDIF unreachable at {answers.host}" + (f" ({answers.error})" if answers.error
                                                     else "")
        return PreflightResult(summary=f"not checked: {reason}")
    result = preflight_decision(repo_id, answers, revision, allow_version_drift).check()
    server = (answers.server_env or {}).get("packages", {})
    result.server_transformers = server.get("transformers")
    result.summary = (f"passed (NDIF runs {repo_id}; nnsight {server.get('nnsight', '?')}, "
                      f"transformers {server.get('transformers', '?')} there)")
    return result
