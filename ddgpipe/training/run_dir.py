"""A run's folder: made writable at the start, the trained model written atomically at the end."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import overload

import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.errors import UsageError
from ddgpipe.methods import Method, PipelineMethod
from ddgpipe.training.checkpoints import atomic_torch_save

__all__ = ["prepare_out_dir", "save_final_model", "gather_to_last"]


@overload
def prepare_out_dir(out: str, keep: bool = False) -> Path: ...
@overload
def prepare_out_dir(out: None, keep: bool = False) -> None: ...
def prepare_out_dir(out: str | None, keep: bool = False) -> Path | None:
    """``out`` made (a writable folder, cleared of an older run's files unless ``keep``)."""
    if out is None:
        return None
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to output directory {path} ({e.strerror}); pass --out a writable path"
        ) from None
    if not keep:  # a new run in an old directory must not inherit its files
        for stale in ("metrics.jsonl", "timeline.jsonl", "model.pt"):
            (path / stale).unlink(missing_ok=True)
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return path


def gather_to_last(obj) -> list:
    """Collect one object from every rank on the last rank (a list there, [] elsewhere)."""
    world = dist.get_world_size()
    out = [None] * world if dist.get_rank() == world - 1 else None
    dist.gather_object(obj, out, dst=world - 1)
    return out or []


def save_final_model(model: nn.Module, method: Method, run_dir: Path | None,
                     world: int) -> None:
    """The trained network as one ``state_dict`` in ``RUN_DIR/model.pt`` (atomic).

    Under the runtime each rank trained only its slice; the slices keep the whole model's
    key names, so the last rank merges them.
    """
    method.sync()
    if world > 1:
        assert isinstance(method, PipelineMethod), "one process per stage runs a pipeline"
        parts = gather_to_last(_on_cpu(method.stages[0].module.state_dict()))
        merged = {k: v for part in parts for k, v in part.items()}
    else:
        merged = _on_cpu(model.state_dict())
    if run_dir is not None:
        atomic_torch_save(merged, run_dir / "model.pt")


def _on_cpu(state: dict) -> dict:
    """A state dict with every tensor on the CPU: ``model.pt`` loads anywhere."""
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()}


