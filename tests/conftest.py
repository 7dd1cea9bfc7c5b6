"""Every test run keeps ddgpipe's per-machine cache (generated data, timed cuts) in a folder
of its own, so tests neither read nor pollute the user's cache."""

import pytest

from ddgpipe.cache import CACHE_ENV


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("ddgpipe-cache")))
    yield
    patch.undo()
