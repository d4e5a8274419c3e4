"""The self-check on arrival: before a long remote job, one small request checks on the server
that the interventions do what they are meant to.

The server runs the model with its own transformers, so the mask slot resolved here from the
layers' signature and the layer list this client built need not match what its layers do. One
request of four traces on two prompts of the job's data set (padded by one token, so the model
passes an explicit mask of its own and the masked and unmasked paths run the same attention
kernel) compares, on the server:

* an all-allowed explicit mask at every layer: the last position's logits equal the clean ones;
* a sink-and-self mask at every layer: they change;
* a CAMA write at ``h_w`` (``w = L // 2``, with distinct rows): ``h_0 .. h_w`` before it equal the
  clean ones, and layer ``w`` then receives the table row of each non-sink token's CAMA key and
  the clean state at the sink, so ``h_w`` changes.

"Equal" is within a bound that follows from the model's dtype, not exact: on a GPU two forward
passes of the same input need not agree to the last bit (kernels may reduce in another order).
Each difference is relative to the largest clean value of its row (a prompt's logits, a token's
state). Kernels accumulate in float32 and round each layer's output once to the model's
dtype, so a different reduction order moves each layer's output by at most one unit in the last
place of that magnitude; over ``n`` layers and the embedding such roundings, of independent
signs, grow as ``sqrt(n + 1)`` (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019, with
``lam = 3``): the bound is ``lam * sqrt(n + 1) * eps(dtype)`` (:func:`rounding_bound`; ``n = L``
for the logits, ``w`` for ``h_0 .. h_w``), the model of the project's own float32 tolerances
(tests/reference.py). A change must exceed the same bound. On the CPU every equal comparison
is exactly 0.

:func:`run_self_check` returns a :class:`SelfCheck` (``to_dict()`` is ``remote.self_check`` in
the manifest); :meth:`SelfCheck.check` stops a failed one with one line naming the comparison,
its value, the bound, the dtype and the likely cause.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ...errors import UserError
from ...mechanisms.cama import table_keys
from ...mechanisms.plan import Intervention
from ...mechanisms.traced import CamaLayer, prompt_layout
from .executor import request_result, run_traces
from .faults import OnDemandRefused, RemoteRunError, deterministic_failure
from .received import received_tensor
from .steps import batch_traces, self_check_finish, self_check_step
from .transport import package_version

SELF_CHECK_PROMPTS = 2
# The probabilistic rounding bound's confidence factor (module docstring).
ROUNDING_LAMBDA = 3.0
# What is compared, as (name, what it shows, must be equal (else: must change), through the
# logits (else: through h_0..h_w)) in the order the result reports them.
CHECKS = (
    ("all_allowed", "an explicit all-allowed mask at every layer reproduces the clean logits",
     True, True),
    ("sink_self", "a sink-and-self mask at every layer changes the logits", False, True),
    ("before_write", "h_0..h_w before the CAMA write equal the clean ones", True, False),
    ("write_error", "layer w receives the CAMA row of every non-sink token and the clean "
                    "state elsewhere", True, False),
    ("write_change", "the CAMA write changes h_w", False, False),
)


def rounding_bound(dtype: str, n_layers: int) -> float:
    """How far, relative to the magnitude compared, two forward passes of the same input
    through ``n_layers`` layers in ``dtype`` may differ: one unit in the last place per layer,
    embedding included, of independent signs: ``lam * sqrt(n_layers + 1) * eps``."""
    return ROUNDING_LAMBDA * math.sqrt(n_layers + 1) * torch.finfo(getattr(torch, dtype)).eps


def judge(values: dict, dtype: str, n_layers: int, write_layer: int) -> list[dict]:
    """Each comparison of :data:`CHECKS` against its bound: ``{"check", "what", "value",
    "bound", "expected", "passed"}``, ``value`` as :func:`~.steps.relative_difference` gives."""
    compared = []
    for name, what, equal, logits in CHECKS:
        value = float(values[name])
        bound = rounding_bound(dtype, n_layers if logits else write_layer)
        passed = value <= bound if equal else value > bound
        compared.append({"check": name, "what": what, "value": value, "bound": bound,
                         "expected": f"<= {bound:.3g}" if equal else f"> {bound:.3g}",
                         "passed": passed})
    return compared


@dataclass
class SelfCheck:
    """The outcome of the self-check.

    Attributes:
        passed: every comparison held.
        compared: per comparison ``{"check", "what", "value", "bound", "expected", "passed"}``
            (:func:`judge`).
        write_layer / n_prompts: ``w`` and the prompts used.
        dtype: the model's dtype on the server, which sets the bounds.
        mask_slot: the layers' mask argument as resolved on the client (index, keyword).
        transformers: versions ``{"client", "server"}`` (``server`` ``None`` when unknown).
        error: why the request itself failed on the server, if it did (nothing compared).
    """

    passed: bool
    compared: list[dict]
    write_layer: int
    n_prompts: int
    mask_slot: dict
    dtype: str = "float32"
    transformers: dict = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "SelfCheck":
        """Raise the first failed comparison as one ``error:`` line with its likely cause."""
        if self.passed:
            return self
        failed = next((c for c in self.compared if not c["passed"]), None)
        slot = (f"argument {self.mask_slot['index']} or keyword "
                f"{self.mask_slot['name']!r}")
        layers = "the server's transformers builds the decoder layers differently"
        if failed is None:
            what = f"its request could not run ({self.error})"
            cause = f"{layers} (other modules, or other layer arguments)"
        else:
            what = (f"{failed['what']} does not hold ({failed['check']} = {failed['value']:.3g}, "
                    f"relative to the clean magnitude; bound {failed['bound']:.3g} for "
                    f"{self.dtype}, expected {failed['expected']})")
            cause = (f"the attention-mask slot resolved on the client ({slot}) is wrong for the "
                     f"server's layers, or {layers}"
                     if failed["check"] in ("all_allowed", "sink_self") else
                     f"{layers} (the residual is not their first argument, or they run in "
                     "another order)")
        versions = ", ".join(f"{v} {k}" for k, v in (
            ("here", self.transformers.get("client")),
            ("on the server", self.transformers.get("server"))) if v)
        raise UserError(f"the remote self-check failed: {what}; likely cause: {cause}"
                        + (f" (transformers {versions})" if versions else "")
                        + "; no cell was evaluated")


def self_check_state(model, prompts) -> dict:
    """The self-check's ``state`` for :func:`~.trace_site.run_traces` (its traces listed in
    ``state["batches"]``), on the first :data:`SELF_CHECK_PROMPTS` of ``prompts``."""
    encoding = _padded(model.encode(list(prompts)[:SELF_CHECK_PROMPTS]), model.tokenizer)
    n_layers = model.n_layers
    if n_layers < 2:
        raise UserError("the remote self-check needs a model of at least 2 layers")
    write_layer = n_layers // 2
    keys, _ = table_keys([encoding])
    dtype = getattr(torch, model.identity.dtype)
    rows = torch.arange(1, len(keys) + 1, dtype=torch.float32)  # distinct, exact in bf16
    means = rows[:, None].expand(len(keys), model.hf.config.get_text_config().hidden_size).to(dtype).contiguous()
    table = CamaLayer(write_layer, keys, means, "cama")
    traces = [(encoding, ("clean", None, None)),
              (encoding, ("all_allowed", Intervention({k: ("all", "all")
                                                       for k in range(n_layers)}), None)),
              (encoding, ("sink_self", Intervention({k: ("sink_self", "sink_self")
                                                     for k in range(n_layers)}), None)),
              (encoding, ("write", Intervention({}, write_layer, "cama"), table))]
    return {"batches": traces, "write_layer": write_layer,
            "expected_rows": _expected_rows(encoding, keys), "logits": {}}


def send_self_check(model, prompts, backend) -> dict | None:
    """Send the self-check through ``backend``; its result (``None`` for a dry run)."""
    return request_result(run_traces(model.lm, model.sites, backend, batch_traces,
                                     self_check_step, self_check_finish,
                                     self_check_state(model, prompts)))


def run_self_check(client, model, prompts, server_transformers: str | None = None) -> SelfCheck:
    """Run the self-check through ``client`` (one request) and judge its result. A request
    the server could not run (the shipped code raised there, or its model has other modules)
    is a failed self-check too: its ``error`` says why."""
    sites = model.sites
    outcome = SelfCheck(False, [], model.n_layers // 2, min(SELF_CHECK_PROMPTS, len(prompts)),
                        {"index": sites.mask_index, "name": sites.mask_name},
                        model.identity.dtype, {"client": package_version("transformers"),
                                               "server": server_transformers})
    try:
        saves = {name: ((), torch.float32) for name, *_ in CHECKS}
        values = send_self_check(model, prompts, client.backend("selfcheck", "self-check",
                                                                 traces=4, saves=saves))
    except OnDemandRefused:
        raise  # not about the interventions: the model was never loaded
    except RemoteRunError as error:
        failure = deterministic_failure(error.__cause__)
        if failure is None or failure[0] == "deploy":
            raise  # not about the interventions: the network, a time-out, the model, ...
        outcome.error = str(error)
        return outcome
    values = {name: received_tensor(values[name], f"the self-check's {name}", (), "float")
              for name, *_ in CHECKS}
    outcome.compared = judge(values, model.identity.dtype, model.n_layers, outcome.write_layer)
    outcome.passed = all(c["passed"] for c in outcome.compared)
    return outcome


def _padded(encoding: dict, tokenizer) -> dict:
    """``encoding`` with one more padding token on the left of every row: the model then passes
    its own explicit mask (no padding would give sdpa none, and an explicit all-allowed mask a
    different kernel, which need not agree to the last bit on a GPU)."""
    pad = torch.full((len(encoding["input_ids"]), 1), tokenizer.pad_token_id,
                     dtype=encoding["input_ids"].dtype)
    input_ids = torch.cat([pad, encoding["input_ids"]], 1)
    attention_mask = torch.cat([torch.zeros_like(pad), encoding["attention_mask"]], 1)
    _, positions = prompt_layout(input_ids, attention_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions}


def _expected_rows(encoding: dict, keys: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` table row each token's ``h_w`` should get: the row of its key ``(position,
    token, prompt length, group 0)`` for real non-sink tokens, ``-1`` elsewhere. Found with a
    dictionary, independently of the traced look-up it checks."""
    row_of = {tuple(key): i for i, key in enumerate(keys.tolist())}
    real, positions = prompt_layout(encoding["input_ids"], encoding["attention_mask"])
    lengths = real.sum(-1)
    rows = torch.full(encoding["input_ids"].shape, -1, dtype=torch.long)
    for b, t in zip(*torch.nonzero(real & (positions > 0), as_tuple=True)):
        key = (int(positions[b, t]), int(encoding["input_ids"][b, t]), int(lengths[b]), 0)
        rows[b, t] = row_of[key]
    return rows
