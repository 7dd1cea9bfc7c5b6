"""The text corpus: present offline, checked by its hash, split the same way every time."""

import pytest
import torch

from ddgpipe.data import load_dataset
from ddgpipe.data.text import BLOCK, CORPORA, corpus_bytes, split_blocks, windows
from ddgpipe.errors import UsageError


def test_the_corpus_is_the_pinned_shakespeare_and_is_cached(tmp_path):
    data = corpus_bytes("shakespeare", folder=tmp_path)
    assert len(data) == CORPORA["shakespeare"]["bytes"]
    assert b"To be, or not to be" in data
    cached = list(tmp_path.glob("shakespeare-*.bin"))
    assert len(cached) == 1 and cached[0].read_bytes() == data
    cached[0].write_bytes(b"damaged")  # a damaged copy is read again from the package
    assert corpus_bytes("shakespeare", folder=tmp_path) == data


def test_windows_are_contiguous_and_their_targets_the_next_tokens():
    tokens = torch.arange(10)
    x, y = windows(tokens, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_the_split_is_deterministic_and_disjoint():
    train, held = split_blocks(5_318_858)
    assert (train, held) == split_blocks(5_318_858)
    assert not set(train) & set(held) and len(train) + len(held) == -(-5_318_858 // BLOCK)
    assert len(held) == 16


def test_shakespeare_as_a_data_set():
    data = load_dataset("shakespeare", context=64)
    assert data.tokens and data.num_classes == 256 and data.input_shape == (64,)
    assert data.train_x.dtype == torch.long and data.test_x.shape == (256, 64)
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])
    assert data.info["sha256"] == CORPORA["shakespeare"]["sha256"]
    assert 4.5 < data.info["unigram_bits_per_byte"] < 5.0
    again = load_dataset("shakespeare", context=64)
    assert torch.equal(data.test_x, again.test_x)  # the same held-out set for every run


def test_a_context_longer_than_a_block_is_refused():
    with pytest.raises(UsageError, match="longer than a held-out block"):
        load_dataset("shakespeare", context=BLOCK + 1)
