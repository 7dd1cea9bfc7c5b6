"""A run's folder: claimed at the start (never another run's, unless asked), the trained
model written atomically at the end."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import torch.distributed as dist
from torch import Tensor, nn

from ddgpipe.errors import UsageError
from ddgpipe.methods import Method, PipelineMethod
from ddgpipe.training.checkpoints import atomic_torch_save, atomic_write_bytes
from ddgpipe.training.sinks import CSV_FILES, TENSORBOARD_DIR

__all__ = ["prepare_out_dir", "check_out_dir", "free_out_dir", "default_run_dir",
           "save_final_model", "save_safetensors", "gather_to_last", "RUN_FILES"]

# What a run writes in its folder: all that --overwrite removes (nothing else is touched).
RUN_FILES = ("config.json", "metrics.jsonl", "timeline.jsonl", "model.pt", "model.safetensors",
             "curves.png", "timeline.png", "checkpoints", TENSORBOARD_DIR, *CSV_FILES)


def check_out_dir(out: str | Path, *, resuming: bool = False, overwrite: bool = False,
                  resumable: bool = True) -> None:
    """Refuse an existing, non-empty ``out`` unless the run continues there (``resuming``)
    or replaces it (``overwrite``): a new run never deletes another's work silently."""
    if resuming and overwrite:
        raise UsageError("--overwrite replaces a run and --resume continues one; pass one of "
                         "them")
    path = Path(out)
    if resuming or overwrite or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    fixes = f"continue it with --resume {path}, " if resumable and "checkpoints" in entries \
        else ""
    raise UsageError(f"{path} is not empty ({shown}); {fixes}pick another --out, or pass "
                     "--overwrite to replace what this command writes there")


def free_out_dir(base: str | Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : the first that is missing or empty."""
    base = Path(base)
    candidate, n = base, 1
    while candidate.is_dir() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def default_run_dir(model: str, method: str, stages: int, seed: int,
                    root: str | Path = "runs") -> Path:
    """The folder of a run given no ``--out``: named by model, method, K and seed, made
    unique by a numbered suffix, so two runs never share it."""
    return free_out_dir(Path(root) / f"{model}-{method}-k{stages}-s{seed}")


@overload
def prepare_out_dir(out: str | Path, keep: bool = False, overwrite: bool = False,
                    owned: Sequence[str] = RUN_FILES, resumable: bool = True) -> Path: ...
@overload
def prepare_out_dir(out: None, keep: bool = False, overwrite: bool = False,
                    owned: Sequence[str] = RUN_FILES, resumable: bool = True) -> None: ...
def prepare_out_dir(out: str | Path | None, keep: bool = False, overwrite: bool = False,
                    owned: Sequence[str] = RUN_FILES, resumable: bool = True) -> Path | None:
    """``out`` made a writable folder for this run: kept as it is when the run continues
    there (``keep``), cleared of the ``owned`` files with ``overwrite``, refused when it
    holds anything else (:func:`check_out_dir`)."""
    if out is None:
        return None
    path = Path(out)
    check_out_dir(path, resuming=keep, overwrite=overwrite, resumable=resumable)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to output directory {path} ({e.strerror}); pass --out a writable path"
        ) from None
    if overwrite:  # only what this command writes: a user's own files stay
        for name in owned:
            if (path / name).is_dir():
                shutil.rmtree(path / name, ignore_errors=True)
            else:
                (path / name).unlink(missing_ok=True)
    return path


def gather_to_last(obj) -> list:
    """Collect one object from every rank on the last rank (a list there, [] elsewhere)."""
    world = dist.get_world_size()
    out = [None] * world if dist.get_rank() == world - 1 else None
    dist.gather_object(obj, out, dst=world - 1)
    return out or []


def save_final_model(model: nn.Module, method: Method, run_dir: Path | None,
                     world: int) -> None:
    """The trained network as one ``state_dict`` in ``RUN_DIR/model.pt`` and
    ``RUN_DIR/model.safetensors`` (both atomic).

    Under the runtime each rank trained only its stage; each sends its tensors under the
    names ``model`` gives them (a traced model's blocks name them otherwise), and the last
    rank merges them.
    """
    method.sync()
    if world > 1:
        assert isinstance(method, PipelineMethod), "one process per stage runs a pipeline"
        parts = gather_to_last(_on_cpu(_named_by(model, method.stages[0].module)))
        merged = {k: v for part in parts for k, v in part.items()}
        merged = {k: merged[k] for k in model.state_dict() if k in merged}  # the model's order
    else:
        merged = _on_cpu(model.state_dict())
    if run_dir is not None:
        atomic_torch_save(merged, run_dir / "model.pt")
        save_safetensors(merged, run_dir / "model.safetensors")


def save_safetensors(state: dict, path: Path) -> None:
    """``state``'s tensors as safetensors (atomic), loadable with ``load_file`` and
    ``load_state_dict``. A tensor sharing storage with an earlier one (a tied embedding) is
    written as its own copy: safetensors refuses shared storage, and every key must load."""
    from safetensors.torch import save

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            continue
        key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        tensors[name] = value.detach().clone() if key in seen else value.detach().contiguous()
        seen.add(key)
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _named_by(model: nn.Module, held: nn.Module) -> dict:
    """The entries of ``model``'s state dict whose tensors ``held`` (one stage) holds, under
    every name ``model`` gives them: a Sequential's slice keeps the model's names, a traced
    block does not."""
    mine = {id(t) for t in [*held.parameters(), *held.buffers()]}
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if id(t) in mine}


def _on_cpu(state: dict) -> dict:
    """A state dict with every tensor on the CPU: ``model.pt`` loads anywhere."""
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()}


