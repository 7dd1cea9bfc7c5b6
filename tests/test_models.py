"""The models match the published CIFAR ResNets and are flat stacks DDG can cut anywhere."""

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
INPUT_CASES = [(name, channels, size) for name in MODEL_NAMES for channels, size in
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
