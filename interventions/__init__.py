"""AF1 toolkit: CAMA, ABP and the AF1 plan on nnsight models.

Public API::

    from interventions import load_model, AF1Plan, apply_af1, build_cama_table, CamaTable
"""

import nnsight as _nnsight

from . import plan as _plan
from . import traced as _traced

# Code that runs inside traces is shipped by value with remote requests (NDIF does not have this
# package installed), so it must be registered before any request is serialized.
_nnsight.register(_plan)
_nnsight.register(_traced)

from .cama import CamaTable, build_cama_table  # noqa: E402
from .errors import UserError  # noqa: E402
from .evaluate import NnsightExecutor, Predictions, score  # noqa: E402
from .models import AF1Model, load_model, wrap_model  # noqa: E402
from .plan import AF1Plan, PlanError  # noqa: E402
from .traced import CamaLayer, ModelSites, apply_af1, apply_rules, last_token_predictions  # noqa: E402

__all__ = [
    "AF1Model", "AF1Plan", "CamaLayer", "CamaTable", "ModelSites", "NnsightExecutor", "PlanError",
    "Predictions", "UserError", "apply_af1", "apply_rules", "build_cama_table",
    "last_token_predictions", "load_model", "score", "wrap_model",
]
