"""Checkpoints that are written atomically and resume a pipeline bitwise.

Why and how: ``docs/design.md``, "Checkpoints".
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ddgpipe.core.rng import rng_state, set_rng_state
from ddgpipe.errors import UsageError
from ddgpipe.methods import Method

__all__ = [
    "Checkpoints",
    "LoopState",
    "atomic_write_bytes",
    "atomic_torch_save",
    "write_rank_file",
    "publish",
    "load_manifest",
    "newest_intact_set",
    "FoundSet",
    "load_rank_file",
    "check_compatible",
    "COMPAT_FIELDS",
]

FORMAT = 4  # 2: each stage's RNG stream; 3: GPU random states, fp16 scales, any executor;
#             4: the process runtime keeps one copy of each stage (stage-k.pt), replicas
READABLE = (3, 4)  # a format-3 set has no stage files and one pipeline: it still resumes
KEEP = 2  # complete sets kept on disk

# Settings a resumed run must share with the checkpoint, or its numbers would change.
COMPAT_FIELDS = (
    "model", "data", "method", "stages", "stash", "batch_size", "seed", "optimizer", "lr",
    "momentum", "nesterov", "weight_decay", "lr_schedule", "milestones", "lr_gamma",
    "warmup_epochs", "warmup_factor", "grad_shrink", "compensation",
    "compensation_options", "precision", "replicas", "compile", "warmup_share", "lr_floor",
    "nadam_horizon", "microbatches", "tokenizer",
)
# what a set written before a setting existed had
DEFAULTS = {"replicas": 1, "microbatches": 1, "compile": False, "warmup_share": 0.0,
            "lr_floor": 0.0, "nadam_horizon": None, "tokenizer": None}


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
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def set_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter-{iteration:06d}"


def write_rank_file(run_dir: Path, iteration: int, rank: int, state: dict) -> dict:
    """Write this process's file of the set for ``iteration``; return its manifest entry."""
    return _write_file(run_dir, iteration, f"rank-{rank}.pt", {"rank": rank, **state})


def write_stage_file(run_dir: Path, iteration: int, stage: int, state: dict) -> dict:
    """Write the one copy of stage ``stage``'s shared state; return its manifest entry."""
    return _write_file(run_dir, iteration, f"stage-{stage}.pt", {"stage": stage, "state": state})


def _write_file(run_dir: Path, iteration: int, name: str, content: dict) -> dict:
    folder = set_dir(run_dir, iteration)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = atomic_torch_save({"format": FORMAT, **content}, folder / name)
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
    sets = sorted((p for p in root.glob("iter-*") if p.is_dir()), key=_set_iteration)
    for old in sets[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_manifest(run_dir: str | Path) -> tuple[dict, Path]:
    """The newest intact set of ``run_dir``: (manifest, folder)."""
    found = newest_intact_set(run_dir)
    return found.manifest, found.folder


@dataclass
class FoundSet:
    """The set a resume uses, and the newer ones passed over as damaged (folder, why)."""

    manifest: dict
    folder: Path
    damaged: list[tuple[Path, str]] = field(default_factory=list)

    def fallback_note(self) -> str | None:
        """One line for stderr when a newer set was damaged; None when the newest is used."""
        if not self.damaged:
            return None
        passed = "; ".join(f"{folder.name} is damaged ({why})" for folder, why in self.damaged)
        return (f"ddgpipe: {passed}; resuming from {self.folder.name} (iteration "
                f"{self.manifest['iteration']}), the newest intact set")


def newest_intact_set(run_dir: str | Path) -> FoundSet:
    """The newest set of ``run_dir`` whose manifest and files are all present and match
    their checksums; every rank reads the same files, so every rank picks the same set. A
    set newer than the published one and without a manifest was being written when the run
    stopped: it is passed over without a word."""
    root = Path(run_dir) / "checkpoints"
    sets = sorted((p for p in root.glob("iter-*") if p.is_dir()), key=_set_iteration,
                  reverse=True) if root.is_dir() else []
    if not sets:
        raise UsageError(f"{run_dir} has no checkpoint (no set in {root}); train with "
                         "--checkpoint-every N to write them")
    published = _published_iteration(root)
    damaged: list[tuple[Path, str]] = []
    for folder in sets:
        unpublished = published is not None and _set_iteration(folder) > published
        if unpublished and not (folder / "manifest.json").exists():
            continue
        manifest, problem = _check_set(folder)
        if manifest is not None:
            return FoundSet(manifest, folder, damaged)
        damaged.append((folder, problem))
    listed = "; ".join(f"{folder.name}: {why}" for folder, why in damaged)
    raise UsageError(f"no checkpoint set in {root} is intact ({listed or 'none is complete'}); "
                     "resume from an intact run directory or start a new run")


def _set_iteration(folder: Path) -> int:
    number = folder.name.removeprefix("iter-")
    return int(number) if number.isdigit() else -1


def _published_iteration(root: Path) -> int | None:
    """The iteration ``latest.json`` points at, or None when it is missing or unreadable."""
    try:
        return int(json.loads((root / "latest.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_set(folder: Path) -> tuple[dict | None, str]:
    """(manifest, "") when every file of the set is intact; (None, what is wrong) else."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        entries = [(e["name"], e["sha256"]) for e in manifest["files"]]
    except OSError:
        return None, "manifest.json is missing or unreadable"
    except (ValueError, KeyError, TypeError):
        return None, "manifest.json is truncated or malformed"
    if manifest.get("format") not in READABLE:
        raise UsageError(f"{folder} has checkpoint format {manifest.get('format')}, this "
                         f"ddgpipe reads formats {', '.join(map(str, READABLE))}")
    for name, digest in entries:
        try:
            data = (folder / name).read_bytes()
        except OSError:
            return None, f"{name} is missing or unreadable"
        if hashlib.sha256(data).hexdigest() != digest:
            return None, f"{name} does not match its manifest"
    return manifest, ""


def load_rank_file(folder: Path, manifest: dict, rank: int) -> dict:
    """This process's file of the set, after checking it against the manifest."""
    return _load_file(folder, manifest, f"rank-{rank}.pt", f"rank {rank}")


def load_stage_file(folder: Path, manifest: dict, stage: int) -> dict:
    """The shared state of stage ``stage`` (written by its replica 0), checked."""
    return _load_file(folder, manifest, f"stage-{stage}.pt", f"stage {stage}")["state"]


def _load_file(folder: Path, manifest: dict, name: str, what: str) -> dict:
    entry = next((e for e in manifest["files"] if e["name"] == name), None)
    if entry is None:
        ranks = sum(e["name"].startswith("rank-") for e in manifest["files"])
        raise UsageError(f"checkpoint {folder} has no file for {what}: it was written by "
                         f"{ranks} processes; resume with as many")
    path = folder / entry["name"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read checkpoint file {path} ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UsageError(f"checkpoint file {path} does not match its manifest (damaged or "
                         "replaced); resume from an intact run directory")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise UsageError(f"cannot load checkpoint file {path} ({type(e).__name__}); it is not "
                         "a ddgpipe checkpoint") from None
    return state


def check_compatible(saved: dict, current: dict, run_dir: str | Path) -> None:
    """Refuse to resume with settings that would change the numbers."""
    def setting(config: dict, k: str):
        return config.get(k, DEFAULTS.get(k))

    diffs = [f"{k}: {setting(saved, k)!r} in the checkpoint, {setting(current, k)!r} now"
             for k in COMPAT_FIELDS if setting(saved, k) != setting(current, k)]
    if diffs:
        raise UsageError(f"cannot resume {run_dir} with different settings ({'; '.join(diffs)}); "
                         "resume with the command that started it, or start a new run")


@dataclass
class LoopState:
    """Where the training loop stands, saved with every checkpoint."""

    iteration: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already done
    seen: int = 0
    train_time: float = 0.0
    epoch_elapsed: float = 0.0
    stats: list = field(default_factory=lambda: [0.0, 0, 0])
    recent: list = field(default_factory=lambda: [0.0, 0, 0])  # since the last evaluation
    metrics_lines: int = 0


class Checkpoints:
    """The checkpoints of one run, as this process sees them.

    Built before the model (``config`` is a ``TrainConfig``): when ``config.resume`` names a
    run, its newest complete set is found and checked against this run's settings, process
    count and, since the cut is part of the state, its cut (``config.placement.split`` is set
    to it).
    Then the loop calls :meth:`restore` once and :meth:`save` at clock boundaries; every rank
    calls both.
    """

    def __init__(self, config, rank: int = 0, world: int = 1):
        self.config = config
        self.rank, self.world = rank, world
        self.reporter = rank == world - 1  # the last rank publishes each set
        self.manifest: dict | None = None
        self.folder: Path | None = None
        if config.resume:
            found = newest_intact_set(config.resume)
            note = found.fallback_note()
            if note and self.reporter:
                print(note, file=sys.stderr, flush=True)
            self.manifest, self.folder = found.manifest, found.folder
            check_compatible(self.manifest["config"], config.to_dict(), config.resume)
            if self.manifest["world"] != world:
                raise UsageError(
                    f"the checkpoint in {config.resume} was written by {self.manifest['world']} "
                    f"processes but this run has {world}; resume with the same launcher and "
                    "process count")
            config.placement = dataclasses.replace(config.placement,
                                                   split=self.manifest["split"])

    @property
    def resuming(self) -> bool:
        return self.manifest is not None

    def restore(self, method: Method, run_dir: Path | None = None) -> LoopState:
        """Load this rank's state into ``method`` and the random generator; return where the
        loop stands (a fresh :class:`LoopState` when not resuming). The reporter's metrics
        file in ``run_dir`` loses the records written after the checkpoint."""
        if self.manifest is None or self.folder is None:
            return LoopState()
        state = load_rank_file(self.folder, self.manifest, self.rank)
        own = state["method"]
        if "stage_index" in own:  # the process runtime: the stage's one copy comes apart
            own["shared"] = load_stage_file(self.folder, self.manifest, own["stage_index"])
        method.load_checkpoint_state(own)
        set_rng_state(state["rng"])
        loop = LoopState(**state["loop"])
        if run_dir is not None:
            truncate_metrics(run_dir / "metrics.jsonl", loop.metrics_lines)
        return loop

    def save(self, method: Method, loop: LoopState) -> None:
        """Write this rank's files of the set for ``loop.iteration``; the reporter publishes
        the set once every rank's files are on disk, and no rank goes on before that."""
        out = Path(self.config.out)
        state = method.checkpoint_state()
        shared = state.pop("shared", None)
        entries = []
        if shared is not None:
            entries.append(write_stage_file(out, loop.iteration, state["stage_index"], shared))
        entries.append(write_rank_file(out, loop.iteration, self.rank, {
            "method": state, "rng": rng_state(), "loop": dataclasses.asdict(loop)}))
        if self.world > 1:
            gathered: list | None = [None] * self.world if self.reporter else None
            dist.gather_object(entries, gathered, dst=self.world - 1)
            entries = [e for part in gathered or [] for e in part]
        if self.reporter:
            publish(out, loop.iteration, entries, {
                "world": self.world, "split": method.split,
                "epoch": loop.epoch, "batch": loop.batch,
                "config": {k: v for k, v in self.config.to_dict().items()
                           if k in COMPAT_FIELDS},
            })
        if self.world > 1:
            dist.barrier()  # nobody runs ahead of a set that is not yet published


def truncate_metrics(path: Path, lines: int) -> None:
    """Drop the records a crashed run wrote after its last checkpoint."""
    if not path.exists():
        return
    kept = path.read_text().splitlines(keepends=True)[:lines]
    atomic_write_bytes(path, "".join(kept).encode())
