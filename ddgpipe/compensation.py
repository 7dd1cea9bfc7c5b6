"""Staleness compensation: how a stage turns a delayed gradient into an update.

DDG's stage k learns at clock t from the gradient of minibatch t-d_k, computed at the weights
that minibatch's forward used, d_k optimizer steps ago. The asynchronous-pipeline literature
offers remedies for that staleness; each is a small object the :class:`~ddgpipe.stage.Stage`
consults at two points of its clock, and knows nothing of executors or processes:

* at F, :meth:`Compensation.forward_weights` may return the weights the forward should use
  instead of the live ones (weight prediction); the stash then keeps *those* weights, so the
  backward is exact at them;
* at S, :meth:`Compensation.step` applies the gradient the backward left in ``p.grad``
  (plain DDG: ``optimizer.step()``), given the weights that minibatch's forward used.

The identity compensation below is plain DDG. A stage without delay (the last one, or K = 1)
never consults its compensation, so backprop stays backprop bitwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ddgpipe.stage import Stage

__all__ = ["Compensation"]


class Compensation:
    """Plain DDG: forward with the live weights, step with the optimizer as given."""

    name = "none"

    def bind(self, stage: Stage) -> None:
        """Called once when the stage is built: check the optimizer, keep what is needed."""
        self.stage = stage

    def forward_weights(self) -> dict[str, Tensor] | None:
        """The weights the next forward uses, by parameter name; None means the live ones."""
        return None

    def step(self, forward_weights: dict[str, Tensor] | None) -> None:
        """Apply the delayed gradient in ``p.grad`` to the live parameters.

        ``forward_weights`` are the weights the gradient's minibatch ran its forward with (the
        stash's version; None when the stash keeps none, i.e. stash mode ``none``).
        """
        self.stage.optimizer.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
