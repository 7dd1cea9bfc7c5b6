"""Which tensors several blocks hold: a tied embedding, used by the first block and the
output projection of the last, is one ``nn.Parameter`` in both."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["SharedTensor", "shared_tensors"]


@dataclass(frozen=True)
class SharedTensor:
    """One tensor held by two or more blocks: ``uses`` lists ``(block index, name within
    that block)`` in block order, a block once per name it holds the tensor under."""

    kind: str  # "parameter" or "buffer"
    uses: tuple[tuple[int, str], ...]

    @property
    def blocks(self) -> tuple[int, ...]:
        """The distinct blocks holding the tensor, in order."""
        return tuple(sorted({index for index, _ in self.uses}))

    def __str__(self) -> str:
        return f"{self.kind} " + " = ".join(f"block {i} {name!r}" for i, name in self.uses)


def shared_tensors(blocks: nn.Sequential) -> list[SharedTensor]:
    """The parameters and buffers that more than one block of ``blocks`` holds, in the order
    their first use appears."""
    uses: dict[int, list[tuple[int, str]]] = {}
    kinds: dict[int, str] = {}
    for index, block in enumerate(blocks):
        named = [*block.named_parameters(remove_duplicate=False),
                 *block.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            uses.setdefault(id(tensor), []).append((index, name))
            kinds.setdefault(id(tensor),
                             "parameter" if isinstance(tensor, nn.Parameter) else "buffer")
    return [SharedTensor(kinds[key], tuple(found)) for key, found in uses.items()
            if len({index for index, _ in found}) > 1]
