"""Where a traced model may be cut: around its repeated blocks, or where the user says."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ddgpipe.errors import UsageError

__all__ = ["repeated_blocks", "check_split_points"]


def repeated_blocks(model: nn.Module) -> list[str]:
    """The names of the entries of the model's largest ``nn.ModuleList`` (``model.layers.0``,
    ``transformer.h.0`` ...): a block begins at each, and one more after the last, so the
    balance modes choose among their boundaries. Without a list of two or more, the children
    holding parameters."""
    lists = [(len(m), -i, name) for i, (name, m) in enumerate(model.named_modules())
             if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if lists:
        entries, _, name = max(lists)
        return [f"{name}.{i}" for i in range(entries)]
    return [name for name, child in model.named_children()
            if any(True for _ in child.parameters())]


def check_split_points(model: nn.Module, split_points: Sequence[str]) -> list[str]:
    """``split_points`` as a list, each naming a submodule of ``model`` (not the model)."""
    if isinstance(split_points, str):
        raise UsageError(f"split_points must be a list of submodule names, got the string "
                         f"{split_points!r}; write split_points=[{split_points!r}]")
    points = list(split_points)
    names = {name for name, _ in model.named_modules() if name}
    for point in points:
        if point not in names:
            close = sorted(n for n in names if n.rsplit(".", 1)[-1] == point.rsplit(".", 1)[-1])
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise UsageError(f"split point {point!r} is not a submodule of "
                             f"{type(model).__name__}{hint}; name the submodule at which a new "
                             "block begins, as model.named_modules() spells it")
    if len(set(points)) != len(points):
        raise UsageError(f"split_points {points} names a submodule twice; name each once")
    return points
