"""Fixtures every test file may use. Every test run keeps ddgpipe's per-machine cache
(generated data, timed cuts) in a folder of its own, so tests neither read nor pollute the
user's cache. Shared models, batches and optimizers are plain functions in
``tests/helpers.py`` (worker processes import them); the numpy oracles are in
``tests/oracles.py``."""

import pytest
import torch

from ddgpipe.cache import CACHE_ENV


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("ddgpipe-cache")))
    yield
    patch.undo()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (as each stage of a bitwise comparison has), the
    caller's count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
