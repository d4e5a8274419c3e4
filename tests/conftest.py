import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own AF1 cache unless it shares the SmolLM2 conversion."""
    shared = os.environ.get("AF1_TEST_SHARED_CACHE")
    monkeypatch.setenv("AF1_CACHE", shared or str(tmp_path_factory.mktemp("af1cache")))


@pytest.fixture(scope="session")
def digit_tok():
    return tiny.digit_tokenizer()


@pytest.fixture(scope="session")
def number_tok():
    return tiny.number_tokenizer()


def wrap_tiny(arch, tokenizer, attn="eager", seed=0, n_layers=4):
    from interventions.models import wrap_model

    hf = tiny.tiny_hf_model(arch, tokenizer, attn, seed=seed, n_layers=n_layers)
    return wrap_model(hf, tokenizer)
