"""The nnsight AF1 path against independent computations on tiny random models (every
architecture of ``tiny.ARCHITECTURES``, eager and sdpa where the family has it, batched with left
padding and one prompt at a time)."""

import numpy as np
import pytest
import torch

import reference
from conftest import wrap_tiny
from interventions.mechanisms.cama import build_cama_table
from interventions.mechanisms.plan import AF1Plan
from interventions.mechanisms.plan import Intervention
from interventions.mechanisms.traced import apply_af1, apply_intervention, apply_rules, read_prompt
import tiny
from tiny import ARCHITECTURES

# Mixed lengths so a batch is left padded; digits are separate tokens.
PROMPTS = ["Calculate: 3+4=", "3+5=", "What is 2+2? ", "Calculate: 1+7=", "7+1=",
           "What is 6+1? "]
IMPLS = ("eager", "sdpa")
PLANS = [(0, 1), (1, 2), (2, 1), (3, 1), (0, 4), (2, 2)]


def nnsight_logits(model, prompts, plan=None, table=None, rules=None):
    enc = model.encode(prompts)
    with torch.no_grad(), model.lm.trace(enc):
        if plan is not None:
            apply_af1(model.sites, plan, table.layer(plan.l_wait) if plan.replaces_residual
                      else None)
        if rules is not None:
            _, real, _ = read_prompt(model.sites)
            apply_rules(model.sites, rules, real=real)
        logits = model.lm.output.logits.save()
    return enc, logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", IMPLS)
def test_explicit_full_causal_mask_reproduces_clean_logits(arch, attn, digit_tok):
    model = wrap_tiny(arch, digit_tok, attn)
    enc, clean = nnsight_logits(model, PROMPTS)
    everywhere = {k: ("all", "all") for k in range(model.n_layers)}
    _, masked = nnsight_logits(model, PROMPTS, rules=everywhere)
    real = enc["attention_mask"].bool()
    assert torch.equal(clean[real], masked[real])


@pytest.mark.precision
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", IMPLS)
def test_af1_trace_equals_independent_hook_implementation(arch, attn, digit_tok):
    model = wrap_tiny(arch, digit_tok, attn)
    table = build_cama_table(model, PROMPTS, "test", progress=False, batch_size=4)
    cama = reference.brute_force_cama(model.hf, digit_tok, PROMPTS)
    for l_wait, l_transfer in PLANS:
        plan = AF1Plan(l_wait, l_transfer)
        rules = reference.af1_rules(model.n_layers, l_wait, l_transfer)
        replace = l_wait if l_wait > 0 else None
        # Batched with left padding.
        enc, ours = nnsight_logits(model, PROMPTS, plan, table)
        theirs = reference.af1_logits_with_hooks(model.hf, enc, rules, replace, cama)
        real = enc["attention_mask"].bool()
        what = f"{plan} on {arch}-{attn}"
        reference.assert_float32_close(model.hf, ours[real], theirs[real], enc, what)
        bound = reference.float32_rounding_bound(model.hf, reference.clean_magnitude(
            model.hf, enc), enc["input_ids"].shape[1])
        reference.assert_logits_close(ours[:, -1], theirs[:, -1], bound, what)
        # One prompt at a time: the same last-token logits as in the padded batch.
        for i, prompt in enumerate(PROMPTS):
            enc1, one = nnsight_logits(model, [prompt], plan, table)
            ref1 = reference.af1_logits_with_hooks(model.hf, enc1, rules, replace, cama)
            reference.assert_float32_close(model.hf, one[0, -1], ref1[0, -1], enc1,
                                           f"{what}, {prompt!r} alone")
            reference.assert_float32_close(model.hf, one[0, -1], ours[i, -1], enc,
                                           f"{what}, {prompt!r} alone and batched")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_is_zero_exactly_where_forbidden(arch, digit_tok):
    model = wrap_tiny(arch, digit_tok, "eager")
    plan = AF1Plan(1, 2)
    rules = reference.af1_rules(model.n_layers, 1, 2)
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    captured = {}
    handles = []
    for k, layer in enumerate(model.adapter.layer_modules(model.hf)):
        attention = model.adapter.attention_module(layer)
        handles.append(attention.register_forward_hook(
            lambda module, args, out, k=k: captured.__setitem__(k, out[1].detach())))
    try:
        enc, _ = nnsight_logits(model, PROMPTS, plan, table)
    finally:
        for handle in handles:
            handle.remove()
    mask2d = enc["attention_mask"]
    windows = reference.model_windows(model.hf)
    for k, rule in rules.items():
        probs = captured[k]  # (B, H, T, T)
        for b in range(len(PROMPTS)):
            allow = torch.from_numpy(reference.allowed_matrix(mask2d[b].tolist(), *rule,
                                                              windows[k]))
            real = mask2d[b].bool()
            rows = probs[b][:, real][:, :, real]  # real queries x real keys, every head
            allowed = allow[real][:, real].expand_as(rows)
            assert torch.all(rows[~allowed] == 0), f"layer {k}: forbidden key got attention"
            assert torch.all(rows[allowed] > 0), f"layer {k}: allowed key got no attention"
    # Layers before L_wait are untouched: ordinary causal attention (within a window).
    real = mask2d[0].bool()
    probs = captured[0][0][:, real][:, :, real]
    causal = torch.ones(probs.shape[-2:], dtype=torch.bool).tril()
    if windows[0] is not None:
        causal = causal.triu(-(windows[0] - 1))
    assert torch.all(probs[:, causal] > 0) and torch.all(probs[:, ~causal] == 0)


# Lengths 5, 5, 6, 6, 4 and 7 (digit tokenizer): "12+3=" and "12+30=" share (position, token)
# pairs at positions 0-3 but differ in length, so a table that mixed lengths would differ.
GROUPED_PROMPTS = ["12+3=", "45+6=", "12+30=", "12+30=", "9+9=", "Q 12+3="]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapter_windows_are_the_models_own(arch, digit_tok):
    """Which layers slide, and how far, as the adapter says and as the model's own masks do
    (the tiny models' windows are shorter than the test prompts)."""
    model = wrap_tiny(arch, digit_tok, "eager")
    windows = model.adapter.layer_windows(model.hf.config, model.n_layers)
    assert windows == reference.model_windows(model.hf) == model.sites.windows


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cama_table_equals_brute_force_group_mean(arch, digit_tok):
    model = wrap_tiny(arch, digit_tok, tiny.supported_attention(arch))
    lengths = {len(digit_tok(p)["input_ids"]) for p in GROUPED_PROMPTS}
    assert lengths == {4, 5, 6, 7}
    table = build_cama_table(model, GROUPED_PROMPTS, "test", batch_size=2, progress=False)
    expected = reference.brute_force_cama(model.hf, digit_tok, GROUPED_PROMPTS)
    positions = reference.brute_force_position_mean(model.hf, digit_tok, GROUPED_PROMPTS)
    # Brute force keys (layer, length, position, token); table keys (position, token, length, 0).
    assert {tuple(k) for k in table.keys.tolist()} == {
        (p, t, n, 0) for (layer, n, p, t) in expected if layer == 0}
    assert {tuple(k) for k in table.position_keys.tolist()} == {
        (p, -1, n, 0) for (layer, n, p, _) in positions if layer == 0}
    enc = model.encode(GROUPED_PROMPTS)
    for (layer, n, p, t), mean in expected.items():
        got = table.lookup(layer, torch.tensor([p, t, n, 0]))
        reference.assert_float32_close(model.hf, got, mean, enc, f"CAMA h_{layer} {p, t, n}")
        row = table.position_keys.tolist().index([p, -1, n, 0])
        reference.assert_float32_close(
            model.hf, table.position_means[table.layers.index(layer), row],
            positions[(layer, n, p, t)], enc, f"position mean h_{layer} {p, n}")
    # '+' at position 2 follows "12" and "45" in the 5-token prompts, "12" twice in the 6-token
    # ones: the two lengths get different means (mixed, they would share one).
    plus = digit_tok.convert_tokens_to_ids("+")
    five, six = (table.lookup(3, torch.tensor([2, plus, n, 0])) for n in (5, 6))
    assert not torch.allclose(five, six)
    stats = table.statistics
    assert stats["n_keys"] == len(table.keys) == int(table.metadata["n_keys"])
    assert stats["prompts_per_length"] == {"4": 1, "5": 2, "6": 2, "7": 1}
    assert stats["prompts_per_key_min"] == 1
    assert stats["prompts_per_key_median"] == float(np.median(table.counts.numpy()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grouped_table_keeps_templates_apart(arch, digit_tok):
    """Two templates of equal length: with groups the table holds each template's own means
    (the brute force over that template's prompts alone), and AF1 reads them only when the
    trace passes each prompt's group."""
    first, second = ["1+2=", "3+4=", "1+5="], ["1-2=", "3-4=", "1-5="]
    prompts, groups = first + second, [0, 0, 0, 1, 1, 1]
    model = wrap_tiny(arch, digit_tok, "eager")
    table = build_cama_table(model, prompts, "test", progress=False, groups=groups)
    for group, members in enumerate((first, second)):
        for (layer, n, p, t), mean in reference.brute_force_cama(model.hf, digit_tok,
                                                                 members).items():
            got = table.lookup(layer, torch.tensor([p, t, n, group]))
            reference.assert_float32_close(model.hf, got, mean, model.encode(prompts),
                                           f"group {group} h_{layer} {p, t, n}")
    plan = AF1Plan(2, 1)
    cama = table.layer(2)
    enc = model.encode(prompts)
    with torch.no_grad(), model.lm.trace(enc):
        apply_af1(model.sites, plan, cama, groups=torch.tensor(groups))
        ours = model.lm.output.logits[:, -1].save()
    rules = reference.af1_rules(model.n_layers, 2, 1)
    for group, members in enumerate((first, second)):
        rows = [i for i, g in enumerate(groups) if g == group]
        theirs = reference.af1_logits_with_hooks(
            model.hf, model.encode(members), rules, 2,
            reference.brute_force_cama(model.hf, digit_tok, members))[:, -1]
        reference.assert_float32_close(model.hf, ours[rows], theirs, enc, f"group {group}")
    with pytest.raises(ValueError, match="groups="):
        with torch.no_grad(), model.lm.trace(enc):
            apply_af1(model.sites, plan, cama)



@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_l_wait_zero_is_identity_and_cama_of_h0_is_the_embedding(arch, digit_tok):
    model = wrap_tiny(arch, digit_tok, tiny.supported_attention(arch))
    assert not AF1Plan(0, 3).replaces_residual
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    enc, clean = nnsight_logits(model, PROMPTS)
    # h_0 depends only on (position, token): replacing it by its CAMA mean changes nothing.
    with torch.no_grad(), model.lm.trace(enc):
        apply_intervention(model.sites, Intervention({}, 0, "cama"), table.layer(0))
        logits = model.lm.output.logits.save()
    mask = enc["attention_mask"].bool()
    reference.assert_float32_close(model.hf, logits[mask], clean[mask], enc,
                                   f"CAMA of h_0 on {arch}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cama_of_identical_prompts_changes_nothing_at_any_layer(arch, number_tok):
    model = wrap_tiny(arch, number_tok, "eager")
    prompts = ["What is 12+30? "] * 5
    table = build_cama_table(model, prompts, "test", batch_size=5, progress=False)
    enc, clean = nnsight_logits(model, prompts)
    for k in range(1, model.n_layers + 1):
        if k == model.n_layers:
            continue  # h_L feeds no layer
        with torch.no_grad(), model.lm.trace(enc):
            apply_intervention(model.sites, Intervention({}, k, "cama"), table.layer(k))
            logits = model.lm.output.logits.save()
        assert torch.equal(logits, clean), f"CAMA at h_{k} changed identical prompts"


def test_cama_layer_mismatch_and_missing_key_are_clear_errors(digit_tok):
    model = wrap_tiny("llama", digit_tok, "sdpa")
    table = build_cama_table(model, ["3+4="], "test", progress=False)
    enc = model.encode(["3+5="])
    with pytest.raises(KeyError, match=r"no entry for \(position, token, length, group\) \(2, "):
        with torch.no_grad(), model.lm.trace(enc):
            apply_af1(model.sites, AF1Plan(2, 1), table.layer(2))
    with pytest.raises(ValueError, match="replaces h_2 but the CAMA layer given is h_1"):
        with torch.no_grad(), model.lm.trace(model.encode(["3+4="])):
            apply_af1(model.sites, AF1Plan(2, 1), table.layer(1))


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("pair", [("4+4=", "3+5="), ("Calculate: 3+4=", "3+5=")],
                         ids=["same-length", "padded"])
def test_af1_in_one_of_several_invokes_leaves_the_others_clean(attn, pair, digit_tok):
    """A notebook trace with several invokes: AF1 in the first must not leak into the second
    (with sdpa and no padding the model passes no mask at all, the hard case)."""
    model = wrap_tiny("gpt2", digit_tok, attn)
    table = build_cama_table(model, list(pair), "test", progress=False)
    plan = AF1Plan(2, 1)
    with torch.no_grad(), model.lm.trace() as tracer:
        with tracer.invoke([pair[0]]):
            apply_af1(model.sites, plan, table.layer(2))
            af1_in_batch = model.lm.output.logits[:, -1].save()
        with tracer.invoke([pair[1]]):
            clean_in_batch = model.lm.output.logits[:, -1].save()
    _, af1_alone = nnsight_logits(model, [pair[0]], plan, table)
    _, clean_alone = nnsight_logits(model, [pair[1]])
    both = model.encode(list(pair))
    reference.assert_float32_close(model.hf, af1_in_batch, af1_alone[:, -1], both, "AF1 invoke")
    reference.assert_float32_close(model.hf, clean_in_batch, clean_alone[:, -1], both,
                                   "clean invoke")


def test_tables_of_the_old_key_layout_are_refused_and_never_found(tmp_path, digit_tok):
    from safetensors.torch import save_file

    from interventions.mechanisms.cama import (FORMAT, CamaMismatch, CamaTable,
                                               cached_cama_table, cama_cache_path)

    model = wrap_tiny("llama", digit_tok, "eager")
    table = build_cama_table(model, GROUPED_PROMPTS, "fp", progress=False)
    # What the previous version wrote: (position, token) keys, format af1-cama-v1, a cache name
    # without the format, and the same model, data set and dtype.
    old_keys = table.keys[:, :2].unique(dim=0)
    old = {"keys": old_keys, "counts": torch.ones(len(old_keys), dtype=torch.long),
           "means": torch.zeros(len(table.layers), len(old_keys), table.means.shape[-1]),
           "layers": torch.tensor(table.layers), "position_keys": old_keys[:, 0].unique(),
           "position_means": torch.zeros(len(table.layers), 1, table.means.shape[-1])}
    metadata = {k: v for k, v in table.metadata.items() if isinstance(v, str)}
    path = cama_cache_path(model, "fp", tmp_path)
    assert path.name.endswith(f"-{FORMAT}.safetensors")
    old_path = path.with_name(path.name.replace(f"-{FORMAT}", ""))
    old_path.parent.mkdir(parents=True)
    save_file(old, str(old_path), metadata={**metadata, "format": "af1-cama-v1"})
    with pytest.raises(CamaMismatch, match="older format 'af1-cama-v1'.*mix prompts of "
                                           "different token lengths; rebuild it"):
        CamaTable.load(old_path)
    rebuilt, where, was_cached = cached_cama_table(model, GROUPED_PROMPTS, "fp", tmp_path)
    assert not was_cached and where == path
    assert torch.equal(rebuilt.keys, table.keys)
