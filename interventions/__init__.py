"""AF1 toolkit: CAMA, ABP and the AF1 plan on nnsight models.

Three parts, one sub-package each:

* ``mechanisms``: what is computed: the AF1 plan, the code that runs inside a trace (masks, CAMA
  look-ups), per-architecture adapters, model loading and CAMA tables.
* ``executors``: how cells are evaluated: the nnsight reference path, the fast executor, and the
  remote (NDIF) executor with its transport, ledger, client and request audit.
* ``pipeline``: what a job runs: configuration, experiments, task runs, results, manifests,
  the probe.

``nnsight_internals`` is the one module that touches nnsight's private names.

Public API (imported lazily, so ``interventions.pipeline.results`` and friends load without
torch)::

    from interventions import load_model, AF1Plan, apply_af1, build_cama_table, CamaTable
"""

import importlib

_EXPORTS = {
    "CamaTable": "mechanisms.cama", "build_cama_table": "mechanisms.cama",
    "UserError": "errors",
    "NnsightExecutor": "executors.reference", "FastExecutor": "executors.fast",
    "Predictions": "executors.base", "score": "pipeline.scoring",
    "AF1Model": "mechanisms.models", "load_model": "mechanisms.models",
    "wrap_model": "mechanisms.models",
    "AF1Plan": "mechanisms.plan", "Intervention": "mechanisms.plan",
    "PlanError": "mechanisms.plan",
    "CamaLayer": "mechanisms.traced", "ModelSites": "mechanisms.traced",
    "apply_af1": "mechanisms.traced", "apply_intervention": "mechanisms.traced",
    "apply_rules": "mechanisms.traced", "last_token_predictions": "mechanisms.traced",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'interventions' has no attribute {name!r}")
