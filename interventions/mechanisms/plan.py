"""What an AF1 configuration means, layer by layer (pure Python, no torch).

This module is shipped *by value* with remote (NDIF) requests, so it imports nothing and its
classes are written out by hand (no ``dataclass``): nnsight serializes functions by source, and
generated methods have none.

Attention rules. For every layer an intervention touches, the attention of each query is one of
  ``"all"``        every real key up to itself (the model's own causal attention),
  ``"sink_self"``  only the sink (position 0, the first real token) and itself,
  ``"self"``       only itself,
given separately for the last query and for every other query. The AF1 stages are
  wait     layers ``0 .. L_wait-1``          unmodified; ``h_{L_wait}`` is then replaced (CAMA),
  transfer layers ``L_wait .. L_wait+L_transfer-1``  last: ``all``, others: ``sink_self``,
  compute  layers ``L_wait+L_transfer .. L-1``        last and others: ``sink_self``.
"""

ATTENTION_RULES = ("all", "sink_self", "self")
WAIT_ABLATIONS = ("cama", "zero", "position_mean", "none")
TRANSFER_PEEKS = ("last", "all")


class PlanError(ValueError):
    """An AF1 configuration that cannot be applied to a model of a given depth."""


class AF1Plan:
    """An AF1 configuration: ``(L_wait, L_transfer, sink)`` plus the experiment variants.

    Args:
        l_wait: layers during which no token reads other tokens; ``h_{l_wait}`` is replaced.
        l_transfer: layers in which only the last token reads the others (ABP).
        sink: whether queries may attend to the sink (position 0). ``False`` is the "no sink"
            alternative: queries restricted to the sink and themselves see only themselves.
        wait_ablation: what replaces ``h_{l_wait}`` at non-sink positions: ``"cama"`` (the spec),
            ``"zero"``, ``"position_mean"`` (mean over the data set at that position, any token),
            or ``"none"`` (no replacement: the wait stage is not enforced).
        transfer_peek: ``"last"`` (ABP: only the last token reads the others) or ``"all"``
            (every token may read every earlier token during transfer).
    """

    __slots__ = ("l_wait", "l_transfer", "sink", "wait_ablation", "transfer_peek")

    def __init__(self, l_wait, l_transfer, sink=True, wait_ablation="cama", transfer_peek="last"):
        for name, value in (("l_wait", l_wait), ("l_transfer", l_transfer)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanError(f"{name} must be an integer, got {value!r}")
            if value < 0:
                raise PlanError(f"{name} must be >= 0, got {value}")
        if wait_ablation not in WAIT_ABLATIONS:
            raise PlanError(f"wait_ablation must be one of {WAIT_ABLATIONS}, got {wait_ablation!r}")
        if transfer_peek not in TRANSFER_PEEKS:
            raise PlanError(f"transfer_peek must be one of {TRANSFER_PEEKS}, got {transfer_peek!r}")
        object.__setattr__(self, "l_wait", l_wait)
        object.__setattr__(self, "l_transfer", l_transfer)
        object.__setattr__(self, "sink", bool(sink))
        object.__setattr__(self, "wait_ablation", wait_ablation)
        object.__setattr__(self, "transfer_peek", transfer_peek)

    def __setattr__(self, name, value):
        raise AttributeError("AF1Plan is immutable")

    def __reduce__(self):
        # Rebuild through __init__ (validated) rather than setting slots on a bare object.
        return (AF1Plan, self._key())

    def _key(self):
        return (self.l_wait, self.l_transfer, self.sink, self.wait_ablation, self.transfer_peek)

    def __eq__(self, other):
        return isinstance(other, AF1Plan) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        extras = ""
        if not self.sink:
            extras += ", sink=False"
        if self.wait_ablation != "cama":
            extras += f", wait_ablation={self.wait_ablation!r}"
        if self.transfer_peek != "last":
            extras += f", transfer_peek={self.transfer_peek!r}"
        return f"AF1Plan(l_wait={self.l_wait}, l_transfer={self.l_transfer}{extras})"

    def to_dict(self):
        """The plan as JSON-ready fields (results rows and manifests use these names)."""
        return {
            "l_wait": self.l_wait,
            "l_transfer": self.l_transfer,
            "sink": self.sink,
            "wait_ablation": self.wait_ablation,
            "transfer_peek": self.transfer_peek,
        }

    def check(self, n_layers):
        """Raise ``PlanError`` unless the plan fits a model with ``n_layers`` decoder layers."""
        if self.l_wait >= n_layers:
            raise PlanError(f"L_wait = {self.l_wait} leaves no layer of the model's {n_layers} "
                            "to run (L_wait must be < L)")
        if self.l_wait + self.l_transfer > n_layers:
            raise PlanError(
                f"L_wait + L_transfer = {self.l_wait} + {self.l_transfer} = "
                f"{self.l_wait + self.l_transfer} exceeds the model's {n_layers} layers"
            )
        return self

    def stage(self, layer):
        """``"wait"``, ``"transfer"`` or ``"compute"`` for decoder layer ``layer`` (0-indexed)."""
        if layer < self.l_wait:
            return "wait"
        if layer < self.l_wait + self.l_transfer:
            return "transfer"
        return "compute"

    @property
    def replaces_residual(self):
        """Whether ``h_{l_wait}`` is overwritten (never at ``l_wait = 0``: the identity)."""
        return self.l_wait > 0 and self.wait_ablation != "none"

    def attention_rules(self, n_layers):
        """``{layer: (last_query_rule, other_query_rule)}`` for every layer the plan restricts."""
        self.check(n_layers)
        restricted = "sink_self" if self.sink else "self"
        rules = {}
        for layer in range(self.l_wait, n_layers):
            if self.stage(layer) == "transfer":
                rules[layer] = ("all", "all" if self.transfer_peek == "all" else restricted)
            else:
                rules[layer] = (restricted, restricted)
        return rules

    def intervention(self, n_layers):
        """The plan as an :class:`Intervention` on a model with ``n_layers`` layers."""
        return Intervention(
            self.attention_rules(n_layers),
            self.l_wait if self.replaces_residual else None,
            self.wait_ablation if self.replaces_residual else None,
        )


class Intervention:
    """What is changed in one forward pass, layer by layer: the common form of every experiment.

    Args:
        rules: ``{layer: (last_query_rule, other_query_rule)}``; layers not named run unchanged.
        replace_layer: ``k`` whose input residual ``h_k`` is overwritten at every real non-sink
            position, or ``None``.
        replacement: ``"cama"``, ``"position_mean"`` or ``"zero"`` (``None`` iff no replacement).
    """

    __slots__ = ("rules", "replace_layer", "replacement")

    def __init__(self, rules, replace_layer=None, replacement=None):
        for layer, rule in rules.items():
            if len(rule) != 2 or any(r not in ATTENTION_RULES for r in rule):
                raise PlanError(f"layer {layer}: attention rule must be two of {ATTENTION_RULES}, "
                                f"got {rule!r}")
        if (replace_layer is None) != (replacement is None):
            raise PlanError("replace_layer and replacement go together")
        if replacement is not None and replacement not in ("cama", "position_mean", "zero"):
            raise PlanError(f"replacement must be cama, position_mean or zero, got {replacement!r}")
        object.__setattr__(self, "rules", {int(k): tuple(v) for k, v in sorted(rules.items())})
        object.__setattr__(self, "replace_layer", replace_layer)
        object.__setattr__(self, "replacement", replacement)

    def __setattr__(self, name, value):
        raise AttributeError("Intervention is immutable")

    def __reduce__(self):
        return (Intervention, (self.rules, self.replace_layer, self.replacement))

    def __eq__(self, other):
        return (isinstance(other, Intervention) and self.rules == other.rules
                and self.replace_layer == other.replace_layer
                and self.replacement == other.replacement)

    def __hash__(self):
        return hash((tuple(self.rules.items()), self.replace_layer, self.replacement))

    def __repr__(self):
        return (f"Intervention({len(self.rules)} restricted layers, replace_layer="
                f"{self.replace_layer}, replacement={self.replacement!r})")

    @property
    def needs_table(self):
        """Whether a CAMA table layer must be supplied (``cama`` or ``position_mean``)."""
        return self.replacement in ("cama", "position_mean")


def table_layers(interventions):
    """The residual layers whose CAMA (or position-mean) table layer these interventions need."""
    return {i.replace_layer for i in interventions if i.needs_table}


def as_intervention(plan_or_intervention, n_layers):
    """Accept an :class:`AF1Plan` or an :class:`Intervention`; return the latter."""
    if isinstance(plan_or_intervention, Intervention):
        for layer in plan_or_intervention.rules:
            if not 0 <= layer < n_layers:
                raise PlanError(f"layer {layer} outside the model's 0..{n_layers - 1}")
        return plan_or_intervention
    return plan_or_intervention.intervention(n_layers)
