"""The GPT: a flat stack DDG can cut between any blocks, its parameters counted in closed form,
causal, and its bad inputs refused by name."""

import pytest
import torch
from torch import nn

from ddgpipe.errors import UsageError
from ddgpipe.models import GPTConfig, build_model, gpt, parameter_count


@pytest.mark.parametrize("config", [
    GPTConfig(layers=8), GPTConfig(layers=2, width=64, heads=2, context=32, vocab=100),
    GPTConfig(layers=3, width=48, heads=3, tie_embeddings=True),
])
def test_parameter_count_is_the_closed_form(config):
    model = gpt(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    assert isinstance(model, nn.Sequential) and len(model) == config.layers + 2


def test_gpt8_as_the_cli_builds_it():
    torch.manual_seed(0)
    model = build_model("gpt-8", num_classes=256, input_shape=(128,))
    assert len(model) == 10
    # 256 x 256 + 128 x 256 + 8 (12 x 256^2 + 13 x 256) + 2 x 256 + 256 x 256
    assert sum(p.numel() for p in model.parameters()) == 6_482_432


def test_attention_is_causal():
    """The logits at position t depend on tokens 0..t only."""
    torch.manual_seed(0)
    model = gpt(GPTConfig(layers=2, width=32, heads=4, context=16, dropout=0.0)).eval()
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 256
    a, b = model(ids), model(changed)
    assert torch.equal(a[0, :10], b[0, :10]) and not torch.equal(a[0, 10:], b[0, 10:])


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = gpt(GPTConfig(layers=4, width=128))
    assert model[1].attn.qkv.bias.abs().sum() == 0 and torch.all(model[1].ln1.weight == 1)
    assert abs(model[1].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert abs(model[1].mlp.proj.weight.std().item() - 0.02 / 8**0.5) < 0.001  # 1/sqrt(2L)


@pytest.mark.parametrize("ids,message", [
    (torch.zeros(2, 40, dtype=torch.long), r"a sequence of 40 tokens is longer than the "
                                           r"model's 32 positions"),
    (torch.full((2, 8), 300), r"token ids 300..300 fall outside the model's vocabulary of 256"),
])
def test_bad_token_inputs_are_refused(ids, message):
    model = gpt(GPTConfig(layers=1, width=16, heads=2, context=32))
    with pytest.raises(UsageError, match=message):
        model(ids)


@pytest.mark.parametrize("name,kwargs,message", [
    ("gpt-x", {}, "gpt-L takes the number of blocks L"),
    ("gpt-2", {"width": 30, "heads": 4}, "does not split into 4 heads"),
])
def test_bad_shapes_are_refused(name, kwargs, message):
    with pytest.raises(UsageError, match=message):
        build_model(name, num_classes=256, **kwargs)
