"""A replay block by block, so a recomputing stage holds one block's graph at a time.

The stage's forward (no grad) keeps each block's input and the random state it started from;
the delayed backward replays the *last* block, backpropagates through it, and moves to the
block before with the gradient of its input. The stashed minibatch costs its block
boundaries instead of nothing, and the backward's peak is one block's graph instead of the
whole stage's; the compute is the same one extra forward as a whole-stage replay, and the
gradients are bitwise the same (see ``docs/design.md``, "Recompute block by block").
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ddgpipe.core.rng import rng_state, set_rng_state
from ddgpipe.core.values import Blocks, Value, as_args, call_block, map_tensors, tensors

__all__ = ["Boundary", "BlockReplay"]


@dataclass
class Boundary:
    """What one block's replay starts from."""

    inputs: Value | None  # the block's input as the forward computed it (None: the stage's)
    rng_state: dict | None  # the random state before the block (None: the stage draws none)


def _shares_tensors(module: nn.Module) -> bool:
    """Whether two names of ``module`` hold one parameter or buffer (tied weights)."""
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    return len({id(t) for _, t in named}) != len(named)


class BlockReplay:
    """The blocks of a stage's :class:`Blocks`, each with its weights' full names."""

    def __init__(self, blocks: nn.Module, device: torch.device):
        self.device = device
        self.blocks: list[tuple[str, nn.Module, dict[str, str], dict[str, str]]] = []
        for name, block in blocks._modules.items():
            assert block is not None
            params = {local: f"{name}.{local}" for local, _ in block.named_parameters()}
            buffers = {local: f"{name}.{local}" for local, _ in block.named_buffers()}
            self.blocks.append((name, block, params, buffers))

    @staticmethod
    def applies(module: nn.Module) -> bool:
        """A stage of two blocks or more without tied weights (a tie would need both blocks'
        gradients summed in one backward to stay bitwise)."""
        return isinstance(module, Blocks) and len(module) > 1 and not _shares_tensors(module)

    def _run(self, j: int, x: Value, weights: dict[str, Tensor] | None) -> Value:
        name, block, params, buffers = self.blocks[j]
        if weights is None:
            return call_block(block, name, as_args(x))
        local = {k: weights[full] for k, full in (params | buffers).items() if full in weights}
        return functional_call(block, local, as_args(x), strict=False)

    def forward(self, x: Value, weights: dict[str, Tensor] | None, restores_rng: bool
                ) -> tuple[Value, list[Boundary]]:
        """The stage's forward (grad off, ``weights`` or the live ones), with each block's
        starting point kept for the replay."""
        bounds = []
        out = x
        for j in range(len(self.blocks)):
            bounds.append(Boundary(out if j else None,
                                   rng_state([self.device]) if restores_rng else None))
            out = self._run(j, out, weights)
        return out, bounds

    def backward(self, bounds: list[Boundary], inputs: Value, weights: dict[str, Tensor],
                 output_marks: list[bool], grad_output: tuple[Tensor, ...],
                 compute_context: Callable[[], AbstractContextManager]) -> None:
        """Replay and backpropagate block by block, last first: the gradients accumulate into
        ``weights`` (leaves, with the buffers to replay with) and ``inputs``' marked leaves.
        The caller keeps the random state around this call."""
        later: Value | None = None  # the inputs of the block after this one, as leaves
        for j in reversed(range(len(self.blocks))):
            bound = bounds[j]
            if j == 0:
                x = inputs
            else:
                assert bound.inputs is not None, "a boundary is replayed once"
                x = map_tensors(bound.inputs,
                                lambda t: t.detach().requires_grad_(t.is_floating_point()))
            bounds[j] = Boundary(None, None)  # nothing of this block outlives its backward
            if bound.rng_state is not None:
                set_rng_state(bound.rng_state)
            with torch.enable_grad(), compute_context():
                out = self._run(j, x, weights)
            if later is None:
                marked = [t for t, m in zip(tensors(out), output_marks, strict=True) if m]
                pairs = list(zip(marked, grad_output, strict=True))
            else:
                pairs = [(t, leaf.grad) for t, leaf in zip(tensors(out), tensors(later),
                                                           strict=True)
                         if leaf.requires_grad and leaf.grad is not None]
            pairs = [(t, g) for t, g in pairs if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            later = x
