import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One AF1 cache per test session (never the user's ~/.cache/af1). Entries are keyed by
    content, so sharing is safe, and the SmolLM2 conversion (about 20 s) happens once."""
    previous = os.environ.get("AF1_CACHE")
    os.environ["AF1_CACHE"] = str(tmp_path_factory.mktemp("af1cache"))
    yield
    if previous is None:
        os.environ.pop("AF1_CACHE", None)
    else:
        os.environ["AF1_CACHE"] = previous


@pytest.fixture(scope="session")
def digit_tok():
    return tiny.digit_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 4-layer Llama with the digit tokenizer, saved as a local Hugging Face directory."""
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"),
                                tiny.digit_tokenizer())


@pytest.fixture(scope="session")
def number_tok():
    return tiny.number_tokenizer()


def wrap_tiny(arch, tokenizer, attn="eager", seed=0, n_layers=4):
    from interventions.mechanisms.models import wrap_model

    hf = tiny.tiny_hf_model(arch, tokenizer, attn, seed=seed, n_layers=n_layers)
    return wrap_model(hf, tokenizer)


# -- shared by the remote tests (test_remote*.py): a tiny llama, its data set, table and the local
# path's predictions (each module builds its own: tests change the model's state)


@pytest.fixture(scope="module")
def llama(digit_tok):
    return wrap_tiny("llama", digit_tok, "sdpa")


@pytest.fixture(scope="module")
def data(digit_tok):
    from remote_helpers import arithmetic

    return arithmetic(digit_tok)


@pytest.fixture(scope="module")
def llama_table(llama, data):
    from interventions import build_cama_table

    return build_cama_table(llama, data[0], "fp", batch_size=8, progress=False)


@pytest.fixture(scope="module")
def llama_reference(llama, data, llama_table):
    """The local path's predictions for every cell of :func:`remote_helpers.af1_cells` (and
    ``"clean"``)."""
    from interventions import NnsightExecutor
    from remote_helpers import af1_cells

    local = NnsightExecutor(llama, *data, batch_size=8)
    reference = {tag: local.run(plan, cama) for tag, plan, cama in af1_cells(llama_table)}
    reference["clean"] = local.clean()
    return reference
