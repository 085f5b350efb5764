from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lda import LDAModelPair, Side  # noqa: E402
from tests.tiny import save, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def after_model(tokenizer):
    return tiny_llama(tokenizer, seed=1)


@pytest.fixture(scope="session")
def before_model(tokenizer):
    return tiny_llama(tokenizer, seed=2)


@pytest.fixture(scope="session")
def pair(after_model, before_model, tokenizer):
    return LDAModelPair(
        Side("tiny/after", after_model, tokenizer), Side("tiny/before", before_model, tokenizer)
    )


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, after_model, before_model, tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    return save(after_model, tokenizer, root / "after"), save(before_model, tokenizer, root / "before")


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """A DATA_DIR holding the embedded demo pair, built once per test session."""
    from app.demo import ensure_demo_pair

    data_dir = tmp_path_factory.mktemp("demo-data")
    ensure_demo_pair(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def one_thread():
    """On 2 shared cores, a second intra-op thread makes tiny training steps 10-50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
