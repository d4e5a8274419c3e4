"""AF1 toolkit: CAMA, ABP and the AF1 plan on nnsight models.

Public API (imported lazily, so ``interventions.results`` and friends load without torch)::

    from interventions import load_model, AF1Plan, apply_af1, build_cama_table, CamaTable
"""

import importlib

_EXPORTS = {
    "CamaTable": "cama", "build_cama_table": "cama",
    "UserError": "errors",
    "NnsightExecutor": "evaluate", "Predictions": "evaluate", "score": "evaluate",
    "AF1Model": "models", "load_model": "models", "wrap_model": "models",
    "AF1Plan": "plan", "Intervention": "plan", "PlanError": "plan",
    "CamaLayer": "traced", "ModelSites": "traced", "apply_af1": "traced",
    "apply_intervention": "traced", "apply_rules": "traced",
    "last_token_predictions": "traced",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'interventions' has no attribute {name!r}")
