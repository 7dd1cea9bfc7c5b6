"""Where each process sits in a run of K stages x R replicas: its stage, replica, peers, groups.

Why and how: ``docs/design.md``, "K stages x R replicas: the layout".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddgpipe.core.values import Value, shard_value, tensors
from ddgpipe.errors import UsageError

__all__ = ["Layout", "process_layout", "check_world"]


@dataclass(frozen=True)
class Layout:
    """This rank's place in a K x R mesh of ranks.

    ``mesh`` is the ``DeviceMesh`` (None without processes, and for R = 1, which needs no
    data group);
    ``ranks[r][k]`` is the global rank of stage k of replica r.
    """

    stages: int
    replicas: int
    rank: int
    ranks: tuple[tuple[int, ...], ...]
    mesh: object | None = None

    def __post_init__(self) -> None:
        if len(self.ranks) != self.replicas or any(len(row) != self.stages for row in self.ranks):
            raise ValueError(f"a {self.replicas} x {self.stages} layout needs that many ranks")

    @classmethod
    def grid(cls, stages: int, replicas: int, rank: int) -> Layout:
        """The layout as rank ``rank`` sees it, without process groups (pure)."""
        grid = torch.arange(stages * replicas).reshape(replicas, stages)
        return cls(stages, replicas, rank, tuple(tuple(row) for row in grid.tolist()))

    @property
    def _where(self) -> tuple[int, int]:
        for r, row in enumerate(self.ranks):
            if self.rank in row:
                return r, row.index(self.rank)
        raise ValueError(f"rank {self.rank} is not in the mesh {self.ranks}")

    @property
    def replica(self) -> int:
        """Which copy of the pipeline this rank belongs to (0 .. R-1)."""
        return self._where[0]

    @property
    def stage(self) -> int:
        """Which stage of its pipeline this rank runs (0 .. K-1)."""
        return self._where[1]

    @property
    def world(self) -> int:
        return self.stages * self.replicas

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        """The rank of ``stage`` in ``replica`` (default: this rank's replica)."""
        return self.ranks[self.replica if replica is None else replica][stage]

    @property
    def prev_rank(self) -> int | None:
        """The rank of the previous stage of this replica (None for the first stage)."""
        return self.rank_of(self.stage - 1) if self.stage > 0 else None

    @property
    def next_rank(self) -> int | None:
        """The rank of the next stage of this replica (None for the last stage)."""
        return self.rank_of(self.stage + 1) if self.stage < self.stages - 1 else None

    @property
    def data_ranks(self) -> list[int]:
        """The ranks holding this rank's stage, one per replica."""
        return [row[self.stage] for row in self.ranks]

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        """The process group of this stage's replicas (None when R = 1 or without processes)."""
        if self.mesh is None or self.replicas == 1:
            return None
        return self.mesh.get_group("data")  # type: ignore[attr-defined]  # a DeviceMesh

    @property
    def last_rank(self) -> int:
        """The rank that reports: the last stage of the last replica."""
        return self.ranks[-1][-1]

    @property
    def writes_stage_state(self) -> bool:
        """Whether this rank writes its stage's shared state into a checkpoint (replica 0)."""
        return self.replica == 0

    def shard(self, batch: Value) -> Value:
        """This replica's share of a global minibatch: rows ``[r n/R, (r+1) n/R)``.

        The loader's order depends on (seed, epoch) only, so the shard of replica r depends on
        (seed, epoch, r) only; with mean losses the average of the shards' gradients is the
        whole minibatch's gradient.
        """
        if self.replicas == 1:
            return batch
        n = tensors(batch)[0].shape[0]
        if n % self.replicas:
            raise UsageError(
                f"a minibatch of {n} samples cannot be split into {self.replicas} equal shards "
                f"(one per replica); pass a batch size that is a multiple of {self.replicas}"
            )
        return shard_value(batch, self.replica, self.replicas)

    def describe(self) -> str:
        return f"rank {self.rank} (stage {self.stage} of replica {self.replica})"


def check_world(world: int, stages: int, replicas: int) -> None:
    """Refuse a process count that is not K x R, naming both numbers and the fix."""
    if replicas < 1:
        raise UsageError(f"replicas must be >= 1 (got {replicas})")
    if world == stages * replicas:
        return
    if replicas == 1:
        raise UsageError(
            f"{world} processes but {stages} stages: the runtime runs one stage per process; "
            f"launch {stages} processes (torchrun --nproc-per-node {stages}) or pass "
            f"--stages {world}"
        )
    fixes = [f"launch {stages * replicas} processes (torchrun: nnodes x nproc-per-node = "
             f"{stages * replicas})"]
    if world % replicas == 0:
        fixes.append(f"pass --stages {world // replicas}")
    if world % stages == 0:
        fixes.append(f"pass --replicas {world // stages}")
    raise UsageError(
        f"{world} processes but {stages} stages x {replicas} replicas = {stages * replicas}: "
        f"the runtime runs one process per stage and replica; {', or '.join(fixes)}"
    )


_MESHES: dict[tuple, tuple[object, Layout]] = {}


def process_layout(stages: int, replicas: int, device_type: str = "cpu",
                   comm: str = "auto") -> Layout:
    """This rank's layout in the default process group, its mesh built once per process
    (R = 1 needs no mesh: one pipeline, rank k is stage k).

    Creating the mesh is a collective call: every rank builds the same one. With ``comm``
    ``host`` the data groups use gloo, as the point-to-point messages do.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    check_world(world, stages, replicas)
    if replicas == 1:  # one pipeline: no data group to create, rank k is stage k
        return Layout.grid(stages, 1, dist.get_rank())
    default = dist.group.WORLD
    key = (id(default), stages, replicas, device_type, comm)
    cached = _MESHES.get(key)
    if cached is not None and cached[0] is default:
        return cached[1]
    override: dict = {"data": "gloo", "pipe": "gloo"} if comm == "host" else {}
    mesh = init_device_mesh(device_type, (replicas, stages), mesh_dim_names=("data", "pipe"),
                            backend_override=override or None)
    ranks = tuple(tuple(int(r) for r in row) for row in mesh.mesh.tolist())
    layout = Layout(stages, replicas, dist.get_rank(), ranks, mesh)
    _MESHES[key] = (default, layout)
    return layout
