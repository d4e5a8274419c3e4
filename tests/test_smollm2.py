"""The embedded SmolLM2-135M-Instruct (real weights, offline): what it is, AF1 on it against the
independent plain-hook implementation (tests/reference.py on ``model.hf``), and a real run.

For a handful of cells (AF1 configurations, one alternative, one necessity window) the hooks,
the fast executor and the nnsight path agree prompt by prompt, on the default task's prompts
(7 tokens) and 'words' prompts (10 tokens) in one left-padded batch. The hooks take brute-force
CAMA means keyed by (position, token); every non-sink (position, token) occurs at one token
length, so these equal the table's means, keyed by (position, token, length, group) as the spec
requires (see test_independent.py).

Tolerance. From layer 2 on, SmolLM2's residual stream reaches 2.5e4 at the sink (about 2e-3
between two float32 neighbours), and the last token reads the sink in every layer. Each cell's
bound is ``reference.residual_rounding_bound`` at the largest |h| the hooks reach over the
layers the cell runs (derived in tests/reference.py; 0.071 at (0, 1), where the fast path
differs by 2.1e-3 to 2.5e-3 on the kernels tried, and 0.02 to 0.05 elsewhere, where it differs
by 2e-5 to 7e-5). Its one assumption, that the layers carry a rounding of the residual stream
to the logits without amplifying it, is checked here in float64.
"""

import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

import reference
import run
from interventions import NnsightExecutor, load_model
from interventions.executors.fast import FastExecutor
from interventions.mechanisms.cama import build_cama_table
from interventions.mechanisms.plan import AF1Plan
from interventions.pipeline.experiments import necessity_cells
from interventions.pipeline.results import read_results
from tasks import build_task

pytestmark = pytest.mark.slow

N_DEFAULT, N_WORDS = 16, 8  # the run below uses the same 16 default-task prompts
AF1_CELLS = [AF1Plan(0, 1), AF1Plan(14, 2), AF1Plan(20, 3), AF1Plan(20, 4), AF1Plan(25, 4),
             AF1Plan(20, 4, transfer_peek="all")]
NECESSITY = (14, 2)  # the last token reads only the sink and itself in layers 14 and 15
RUN_CELLS = [(20, 3), (20, 4)]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", device="cpu")


def test_smollm2_loads_as_a_30_layer_llama_with_digit_tokens(smollm2):
    assert smollm2.n_layers == 30
    assert smollm2.identity.architecture == "llama"
    assert smollm2.identity.weights_sha256.startswith("224d0cd3")
    assert smollm2.tokenizer.tokenize("123") == ["1", "2", "3"]
    build = build_task(smollm2.tokenizer, task="A+B", style="calculate")
    assert len(build.dataset) == 36 and build.n_dropped == 45


class Comparison:
    """Every cell through the hooks, the fast executor and the nnsight executor, on the same
    prompts, with each cell's rounding bound at the magnitudes the hooks reach."""

    def __init__(self, model):
        tokenizer = model.tokenizer
        default = build_task(tokenizer, "A+B", style="calculate", n_prompts=N_DEFAULT).dataset
        words = build_task(tokenizer, "A+B", style="words", n_prompts=N_WORDS).dataset
        self.prompts = list(default["prompt"]) + list(words["prompt"])
        self.answers = list(default["answer_token_id"]) + list(words["answer_token_id"])
        assert {len(tokenizer(p)["input_ids"]) for p in self.prompts} == {7, 10}
        assert reference.keys_at_several_lengths(tokenizer, self.prompts) == []

        n = model.n_layers
        table = build_cama_table(model, self.prompts, "test", progress=False)
        tables = {"cama": reference.brute_force_cama(model.hf, tokenizer, self.prompts)}
        cells = [(repr(p), p, table.for_intervention(p.intervention(n)),
                  reference.hook_arguments(n, p.l_wait, p.l_transfer, tables,
                                           transfer_peek=p.transfer_peek)) for p in AF1_CELLS]
        (necessity,) = [c for c in necessity_cells(n, windows=(NECESSITY[1],))
                        if c.fields["layer"] == NECESSITY[0]]
        cells.append((f"necessity {NECESSITY}", necessity.intervention, None,
                      (reference.necessity_rules(*NECESSITY),)))
        self.cells = cells

        self.hf = model.hf
        self.batch = batch = model.encode(self.prompts)  # one left-padded batch
        with reference.ResidualMagnitude(self.hf) as seen:
            self.clean = reference.af1_logits_with_hooks(self.hf, batch, {})[:, -1]
        self.clean_bound = reference.residual_rounding_bound(reference.FLOAT32_EPS, seen.value, n)
        self.hooks, self.bounds, self.hook_arguments = {}, {}, {}
        self.decided = self.compared = 0
        for tag, _, _, hooks in cells:
            self.hook_arguments[tag] = hooks
            replace_layer = hooks[1] if len(hooks) > 1 else None
            with reference.ResidualMagnitude(self.hf, first_layer=replace_layer or 0) as seen:
                self.hooks[tag] = reference.af1_logits_with_hooks(self.hf, batch, *hooks)[:, -1]
            self.bounds[tag] = reference.residual_rounding_bound(
                reference.FLOAT32_EPS, seen.value, reference.layers_run(n, replace_layer))

        self.fast = FastExecutor(model, self.prompts, self.answers)
        self.fast_predictions = dict(self.fast.run_many([cell[:3] for cell in cells]))
        nnsight = NnsightExecutor(model, self.prompts, self.answers)
        self.nnsight_predictions = dict(nnsight.run_many([cell[:3] for cell in cells]))

    def bound(self, tag):
        """The float32 rounding bound of ``tag``'s last-position logits (module docstring)."""
        return self.bounds[tag]

    def check(self, tag, got, what):
        """``got`` (last-position logits ``(N, V)``, or Predictions) equals the hooks: logits
        within the bound, and the same predictions where the bound decides them (a cell
        under heavy ablation may leave most of its prompts within the bound of a tie; over
        all cells most must be decided, counted in ``decided`` of ``compared``)."""
        answers = None if isinstance(got, torch.Tensor) else self.answers
        diff, decided = reference.assert_logits_close(got, self.hooks[tag], self.bound(tag),
                                                      f"{tag} ({what})", answers,
                                                      each_decided=False)
        self.decided += decided
        self.compared += len(self.prompts)
        return diff

    @staticmethod
    def top_gap(logits):
        """``(N,)`` numpy: the distance between each prompt's two largest logits."""
        top2 = logits.topk(2, -1).values
        return (top2[:, 0] - top2[:, 1]).numpy()


@pytest.fixture(scope="module")
def comparison(smollm2):
    return Comparison(smollm2)


@pytest.mark.precision
def test_af1_cells_equal_the_hook_implementation_prompt_by_prompt(comparison):
    c = comparison
    for tag, plan, cama, _ in c.cells:
        c.check(tag, c.fast.last_logits(plan, cama), "fast, every logit")
        c.check(tag, c.fast_predictions[tag], "fast")
        c.check(tag, c.nnsight_predictions[tag], "nnsight")
        effect = float((c.hooks[tag] - c.clean).abs().max())
        assert effect > 10 * c.bound(tag), f"{tag}: no effect to check"
    assert 2 * c.decided >= c.compared, f"{c.decided} of {c.compared} predictions decided"


@pytest.mark.parametrize("cell", [(0, 1), (20, 4)])
def test_residual_rounding_reaches_the_logits_unamplified(comparison, cell):
    """The one assumption of reference.residual_rounding_bound, checked in float64 (no float32
    kernel involved): a rounding of every residual state, of every position, entering every
    layer the cell runs (each entry moved by a random fraction of ``u * |h|``, u = 2^-24)
    moves the last-position logits by no more than the bound for one evaluation. (0, 1) is the
    cell most sensitive to the sink's state (measured 8e-4 against a bound of 0.035)."""
    import copy

    c = comparison
    hf64 = copy.deepcopy(c.hf).double()
    tag = repr(AF1Plan(*cell))
    hooks = c.hook_arguments[tag]
    first = hooks[1] or 0
    exact = reference.af1_logits_with_hooks(hf64, c.batch, *hooks)[:, -1]
    generator = torch.Generator().manual_seed(0)

    def round_residual(module, args, kwargs):
        hidden = args[0]
        if hidden.shape[:2] != c.batch["input_ids"].shape:  # the window probe's own pass
            return None
        noise = torch.rand(hidden.shape, generator=generator, dtype=hidden.dtype) * 2 - 1
        return (hidden + noise * reference.FLOAT32_EPS / 2 * hidden.abs(), *args[1:]), kwargs

    layers = reference.decoder_layers(hf64)
    handles = [layers[k].register_forward_pre_hook(round_residual, with_kwargs=True)
               for k in range(first, len(layers))]
    try:
        rounded = reference.af1_logits_with_hooks(hf64, c.batch, *hooks)[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    moved = float((rounded - exact).abs().max())
    bound = c.bound(tag) / 2  # one evaluation
    assert 0 < moved <= bound, f"{cell}: rounding moved the logits by {moved:.2e} > {bound:.2e}"


def test_run_on_a_small_grid_writes_everything_and_scores_as_the_hooks_do(comparison, tmp_path,
                                                                         capsys):
    out = tmp_path / "smol"
    code = run.main(["--l-wait", "20", "--l-transfer", "3-4", "--n-prompts", str(N_DEFAULT),
                     "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    rows = {(r["l_wait"], r["l_transfer"]): r for r in read_results(out / "results.jsonl")}
    assert set(rows) == set(RUN_CELLS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == "embedded" and manifest["status"] == "complete"
    assert (out / "figures" / "heatmap_A+B-calculate.png").exists()
    dataset = load_from_disk(str(out / "data" / "A+B-calculate"))

    # The run's prompts are the comparison's default-task prompts, and its CAMA table (built
    # on them alone) has the same means: no key of theirs occurs in the 'words' prompts.
    c = comparison
    rows_of = [c.prompts.index(p) for p in dataset["prompt"]]
    assert sorted(rows_of) == list(range(N_DEFAULT))
    answers = np.array(dataset["answer_token_id"])
    full_ok = c.clean[rows_of].argmax(-1).numpy() == answers
    for w, t in RUN_CELLS:
        tag = repr(AF1Plan(w, t))
        af1 = c.hooks[tag][rows_of]
        af1_ok = af1.argmax(-1).numpy() == answers
        # A prompt whose top two logits tie within the bound may count either way.
        ties = int(((c.top_gap(af1) <= 2 * c.bound(tag))
                    | (c.top_gap(c.clean[rows_of]) <= 2 * c.clean_bound)).sum())
        row = rows[(w, t)]
        assert abs(row["n_full_correct"] - int(full_ok.sum())) <= ties, (w, t)
        assert abs(row["n_af1_correct_of_full"] - int((full_ok & af1_ok).sum())) <= ties, (w, t)
        assert row["n_prompts"] == N_DEFAULT
