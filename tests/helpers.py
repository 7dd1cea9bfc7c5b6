"""What many test files build: small seeded models, seeded batches, optimizer and scheduler
factories, and a trained pipeline's losses and state. Plain functions, not fixtures, so worker
processes import them too; every builder seeds itself, so its numbers depend only on its
arguments."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddgpipe.models import build_model

#: Batch sizes that vary from clock to clock: shapes must travel with the activations.
RAGGED = (8, 8, 7, 8, 5, 8, 8)


# --- optimizers and schedules ------------------------------------------------------------------

def sgd(lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4):
    """An optimizer factory: torch's SGD with these settings (picklable)."""
    return partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay)


def step_lr(step_size: int = 3, gamma: float = 0.5):
    """A scheduler factory: StepLR with these settings (picklable)."""
    return partial(torch.optim.lr_scheduler.StepLR, step_size=step_size, gamma=gamma)


# --- data --------------------------------------------------------------------------------------

def batches(n: int, shape: tuple[int, ...] = (1, 8, 8), *, sizes: int | tuple[int, ...] = 8,
            classes: int = 10, seed: int = 1, dtype: torch.dtype | None = None
            ) -> list[tuple[Tensor, Tensor]]:
    """``n`` (x, label) minibatches drawn from one generator: x normal of ``shape`` per sample,
    labels below ``classes``; ``sizes`` a batch size or a cycle of them."""
    g = torch.Generator().manual_seed(seed)
    cycle = (sizes,) if isinstance(sizes, int) else sizes
    out = []
    for i in range(n):
        size = cycle[i % len(cycle)]
        out.append((torch.randn(size, *shape, generator=g, dtype=dtype),
                    torch.randint(0, classes, (size,), generator=g)))
    return out


def ragged_batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """1 x 8 x 8 images, 10 classes, in the batch sizes of ``RAGGED``."""
    return batches(n, sizes=RAGGED, seed=seed)


# --- models ------------------------------------------------------------------------------------

def conv_block(c_in: int, c_out: int, *, stride: int = 1, batchnorm: bool = False,
               dropout: float = 0.0) -> nn.Sequential:
    """3x3 convolution, [BatchNorm], ReLU, [Dropout]: one block of the small test CNNs."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def pool_head(c_in: int, classes: int = 10, *, dropout: float = 0.0) -> nn.Sequential:
    """Global average pool, flatten, [Dropout], linear: the small test CNNs' last block."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c_in, classes))
    return nn.Sequential(*layers)


def dropout_convnet() -> nn.Sequential:
    """Dropout in every block, so every stage draws random numbers whatever the cut; BatchNorm
    in two. For 1 x 8 x 8 inputs, 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        conv_block(1, 8, batchnorm=True, dropout=0.2),
        conv_block(8, 8, stride=2, batchnorm=True, dropout=0.2),
        conv_block(8, 16, dropout=0.2),
        pool_head(16, dropout=0.2),
    )


def dropout_mlp() -> nn.Sequential:
    """Three Linear-ReLU-Dropout blocks and a linear head, 6 features to 3 classes: every stage
    of a 3-stage cut draws random numbers."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.3)) for _ in range(3)]
    return nn.Sequential(*blocks, nn.Linear(6, 3))


def resnet(seed: int = 0) -> nn.Sequential:
    """ResNet-20 for 1 x 8 x 8 inputs (the digits' shape), 10 classes."""
    torch.manual_seed(seed)
    return build_model("resnet20", in_channels=1, image_size=8, num_classes=10)


# --- training and comparing --------------------------------------------------------------------

def train(pipe, data, seed: int, use_run: bool = False):
    """Seed the caller's RNG (the stages' streams start from it), step through ``data``
    (or ``run`` it), drain; the losses and a copy of the model's state on the CPU."""
    torch.manual_seed(seed)
    if use_run:
        losses = [loss.item() for loss in pipe.run(data, F.cross_entropy)]
    else:
        losses = [pipe.step(x, y, F.cross_entropy).item() for x, y in data]
    pipe.drain()
    return losses, {k: v.detach().cpu().clone() for k, v in pipe.model.state_dict().items()}


def assert_same(a, b) -> None:
    """Two :func:`train` results agree bitwise: losses, weights and buffers."""
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs"
