"""The gradients a stage's backwards leave between two of its steps, summed (microbatches).

Under microbatched DDG a stage runs several backwards per optimizer step; each one's gradient
(in ``p.grad``, which the next backward replaces) is added here, and the step applies the sum
divided by how many were summed. With one backward per step the gradient is kept as it is, the
very tensor, so plain DDG's numbers do not change. Why: ``docs/design.md``, "Microbatched DDG".
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["GradientSum"]


class GradientSum:
    """A running sum of a stage's parameter gradients and the number of backwards in it."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | None] = {}
        self.count = 0

    def add(self, params: dict[str, nn.Parameter]) -> None:
        """Add the gradients the backward just left in ``params``' ``.grad``."""
        for name, p in params.items():
            kept = self.sums.get(name)
            if kept is None or p.grad is None:
                self.sums[name] = p.grad if kept is None else kept
            else:
                self.sums[name] = kept + p.grad
        self.count += 1

    def apply(self, params: dict[str, nn.Parameter]) -> None:
        """Put the mean of the summed gradients into ``.grad`` (the step's) and start over."""
        for name, p in params.items():
            total = self.sums.get(name)
            p.grad = total if total is None or self.count == 1 else total / self.count
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict:
        """The sums and their count, for a checkpoint taken between two of a step's clocks."""
        return {"count": self.count, "sums": dict(self.sums)}

    def load_state_dict(self, state: dict, device) -> None:
        self.count = int(state.get("count", 0))
        self.sums = {n: None if g is None else g.to(device)
                     for n, g in state.get("sums", {}).items()}
