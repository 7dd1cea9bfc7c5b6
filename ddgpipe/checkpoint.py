"""Checkpoints that are written atomically and resume a pipeline bitwise.

Layout under ``RUN_DIR/checkpoints/``::

    iter-000120/rank-0.pt ... rank-{K-1}.pt   one file per process (the whole run for the
                                              reference executor: rank-0.pt only)
    iter-000120/manifest.json                 iteration, clock, epoch position, files + sha256
    latest.json                               which set is complete: written last

Every file goes to a temporary name, is fsynced and renamed over its final name, so a crash
leaves either the old or the new file, never half of one. ``latest.json`` is replaced only
after every file of a set and its manifest are on disk, and loading checks each file
against the manifest's digest: a half-written set is never loaded. Files are read with
``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ddgpipe.errors import UsageError

__all__ = [
    "atomic_write_bytes",
    "atomic_torch_save",
    "write_rank_file",
    "publish",
    "load_manifest",
    "load_rank_file",
    "check_compatible",
    "COMPAT_FIELDS",
]

FORMAT = 3  # 2: each stage's RNG stream; 3: GPU random states, fp16 scales, any executor
KEEP = 2  # complete sets kept on disk

# Settings a resumed run must share with the checkpoint, or its numbers would change.
COMPAT_FIELDS = (
    "model", "data", "method", "stages", "stash", "batch_size", "seed", "optimizer", "lr",
    "momentum", "nesterov", "weight_decay", "lr_schedule", "milestones", "lr_gamma",
    "warmup_epochs", "warmup_factor", "epochs", "grad_shrink", "compensation",
    "compensation_options", "precision",
)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: Path) -> str:
    """Save ``obj`` atomically; return the sha256 of the bytes written."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def set_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter-{iteration:06d}"


def write_rank_file(run_dir: Path, iteration: int, rank: int, state: dict) -> dict:
    """Write this process's file of the set for ``iteration``; return its manifest entry."""
    folder = set_dir(run_dir, iteration)
    name = f"rank-{rank}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = atomic_torch_save({"format": FORMAT, "rank": rank, **state}, folder / name)
    except OSError as e:
        raise UsageError(
            f"cannot write checkpoint {folder / name} ({e.strerror}); the previous checkpoint "
            "is intact: free space or fix permissions, then --resume"
        ) from None
    return {"name": name, "sha256": digest}


def publish(run_dir: Path, iteration: int, entries: list[dict], info: dict) -> Path:
    """Write the manifest, then point ``latest.json`` at the set; prune older sets."""
    folder = set_dir(run_dir, iteration)
    manifest = {"format": FORMAT, "iteration": iteration, "files": entries, **info}
    root = folder.parent
    try:
        atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=2).encode())
        atomic_write_bytes(root / "latest.json",
                           json.dumps({"set": folder.name, "iteration": iteration}).encode())
    except OSError as e:
        raise UsageError(
            f"cannot write the checkpoint index in {root} ({e.strerror}); the previous "
            "checkpoint is intact: free space or fix permissions, then --resume"
        ) from None
    sets = sorted(p for p in root.glob("iter-*") if p.is_dir())
    for old in sets[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_manifest(run_dir: str | Path) -> tuple[dict, Path]:
    """The newest complete set of ``run_dir``: (manifest, folder)."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest.json"
    if not latest.exists():
        raise UsageError(f"{run_dir} has no checkpoint ({latest} is missing); train with "
                         "--checkpoint-every N to write them")
    try:
        pointer = json.loads(latest.read_text())
        folder = root / pointer["set"]
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"the checkpoint index in {root} is unreadable ({e}); resume from an "
                         "intact run directory") from None
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{folder} has checkpoint format {manifest.get('format')}, this "
                         f"ddgpipe reads format {FORMAT}")
    return manifest, folder


def load_rank_file(folder: Path, manifest: dict, rank: int) -> dict:
    """This process's file of the set, after checking it against the manifest."""
    entry = next((e for e in manifest["files"] if e["name"] == f"rank-{rank}.pt"), None)
    if entry is None:
        raise UsageError(f"checkpoint {folder} has no file for rank {rank}: it was written by "
                         f"{len(manifest['files'])} processes; resume with as many")
    path = folder / entry["name"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read checkpoint file {path} ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UsageError(f"checkpoint file {path} does not match its manifest (damaged or "
                         "replaced); resume from an intact run directory")
    import io

    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise UsageError(f"cannot load checkpoint file {path} ({type(e).__name__}); it is not "
                         "a ddgpipe checkpoint") from None
    return state


def check_compatible(saved: dict, current: dict, run_dir: str | Path) -> None:
    """Refuse to resume with settings that would change the numbers."""
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
             for k in COMPAT_FIELDS if saved.get(k) != current.get(k)]
    if diffs:
        raise UsageError(f"cannot resume {run_dir} with different settings ({'; '.join(diffs)}); "
                         "resume with the command that started it, or start a new run")
