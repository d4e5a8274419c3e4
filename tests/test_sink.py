"""The sink is one token in every prompt: what depends on where the prompt's text starts still
finds its tokens when a BOS was put first."""

import numpy as np

import tiny
from conftest import wrap_tiny
from interventions.pipeline.probe import partial_result_probe, site_offsets
from tasks import build_task


def test_probe_finds_its_sites_after_a_prepended_bos(digit_tok):
    build = build_task(digit_tok, "A+B-C", style="symbolic")  # "<s>3+4-5=": BOS put first
    assert build.bos_prepended
    model = wrap_tiny("llama", tiny.digit_tokenizer(), "eager")
    result = partial_result_probe(model, build.dataset)
    assert result["n_pairs"] == 81  # every operand pair located (none would be without the BOS)
    # The site is the second operator: 3 tokens before the end in "<s>A+B-C=".
    offsets = site_offsets(digit_tok, ["<s>3+4-5="], ["<s>3+4-"])
    assert np.array_equal(offsets, [-3])
