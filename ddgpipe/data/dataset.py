"""What every data set is: normalised inputs and integer labels, split train/test, in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Dataset"]


@dataclass
class Dataset:
    """Normalised inputs and integer labels, split train/test (for text: held out).

    Inputs are float32 images, N x C x H x W, or 1-D signals, N x C x L (``image_size`` is
    None then), or, when ``tokens``, windows of token ids N x T whose labels are the next
    token at each position (``num_classes`` is the vocabulary); ``input_shape`` is one
    sample's shape. ``info`` is what a run records about where the data came from.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int | None  # height = width of an image; None for 1-D signals
    augment: bool = False  # pad-4 random crop + horizontal flip while training (CIFAR)
    tokens: bool = False  # windows of token ids for a language model
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) for images, (C, L) for signals."""
        return tuple(self.train_x.shape[1:])
