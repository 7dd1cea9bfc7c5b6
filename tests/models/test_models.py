"""The models match the published CIFAR ResNets and are flat stacks DDG can cut anywhere."""

import re

import pytest
import torch
from torch import nn

from ddgpipe.errors import UsageError
from ddgpipe.models import MODEL_NAMES, ShortcutA, build_model


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, millions, blocks",
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters.
    [("resnet20", 0.27, 11), ("resnet32", 0.46, 17), ("resnet44", 0.66, 23),
     ("resnet56", 0.85, 29), ("resnet110", 1.7, 56)],
)
def test_resnet_parameter_counts_match_the_paper(name, millions, blocks):
    model = build_model(name)
    assert float(f"{count(model) / 1e6:.2g}") == millions
    assert isinstance(model, nn.Sequential) and len(model) == blocks


def test_option_a_shortcut_has_no_parameters_and_pads_zeros():
    short = ShortcutA(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    y = short(x)
    assert count(short) == 0
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


# resnet110 at 32x32 runs resnet56's code path and would only add seconds
IMAGE_MODELS = [name for name in MODEL_NAMES if not name.startswith(("resnet1d-", "gpt-"))]
INPUT_CASES = [(name, channels, size) for name in IMAGE_MODELS for channels, size in
               [(1, 8), (3, 32)] if not (name == "resnet110" and size == 32)]


@pytest.mark.parametrize("name, channels, size", INPUT_CASES)
def test_models_take_configurable_inputs(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, size, num_classes=7)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_every_block_boundary_is_a_valid_cut():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 8).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    for cut in range(1, len(model)):
        assert torch.equal(model[cut:](model[:cut](x)), expected)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_model("resnet20")
    torch.manual_seed(3)
    b = build_model("resnet20")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'resnet21'; choose one of resnet20"):
        build_model("resnet21")


# ---- ResNets for 1-D signals (mnist1d) ----------------------------------------------------


@pytest.mark.parametrize("depth, blocks, params", [(20, 11, 91162), (56, 29, 287386)])
def test_resnet1d_is_a_flat_stack_of_1d_blocks(depth, blocks, params):
    model = build_model(f"resnet1d-{depth}", num_classes=10, input_shape=(1, 40))
    assert isinstance(model, nn.Sequential) and len(model) == blocks
    assert count(model) == params  # widths 16, 32, 64, as the CIFAR ResNets
    kinds = {type(m) for m in model.modules()}
    assert nn.Conv1d in kinds and nn.BatchNorm1d in kinds
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d}
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)


@pytest.mark.parametrize("channels, length", [(1, 40), (3, 17)])
def test_resnet1d_takes_configurable_signals(channels, length):
    torch.manual_seed(0)
    model = build_model("resnet1d-32", num_classes=7, input_shape=(channels, length))
    assert model(torch.randn(2, channels, length)).shape == (2, 7)


def test_every_resnet1d_block_boundary_is_a_valid_cut():
    torch.manual_seed(0)
    model = build_model("resnet1d-20", input_shape=(1, 40)).eval()
    x = torch.randn(4, 1, 40)
    expected = model(x)
    for cut in range(1, len(model)):
        assert torch.equal(model[cut:](model[:cut](x)), expected)


def test_option_a_shortcut_on_signals_subsamples_and_pads_zeros():
    x = torch.randn(2, 16, 40)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 20)
    assert torch.equal(y[:, 8:24], x[:, :, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet1d-21", "resnet1d-8", "resnet1d", "resnet1d20"])
def test_unknown_resnet1d_depth_names_the_valid_ones(name):
    with pytest.raises(UsageError, match=f"unknown model '{name}': resnet1d-N takes depth N in "
                                         "20, 32, 44, 56, 110"):
        build_model(name, input_shape=(1, 40))


@pytest.mark.parametrize("name, shape, kind", [("resnet20", (1, 40), "2-D network for C x H x W"),
                                               ("resnet1d-20", (1, 8, 8), "1-D network for C x L"),
                                               ("resnet1d-56", (40,), "1-D network for C x L")])
def test_a_model_refuses_inputs_of_the_other_dimensionality(name, shape, kind):
    with pytest.raises(UsageError, match=rf"model {name} cannot take inputs of shape "
                                         rf"{re.escape(str(shape))}: it is a {kind}"):
        build_model(name, input_shape=shape)


def test_the_mlp_takes_any_input_shape():
    assert build_model("mlp", input_shape=(1, 40))[0][1].in_features == 40
    assert build_model("mlp", input_shape=(3, 8, 8))[0][1].in_features == 192
    assert build_model("mlp", 3, 8)[0][1].in_features == 192
