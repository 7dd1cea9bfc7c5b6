"""Where a pipeline runs: one value carried from the CLI (or ``DDG(...)``) to the executor.

A :class:`Placement` names the cut (``split`` or how to ``balance`` it), the executor, the
devices, the intra-op threads per stage, the communication path and the replicas. A new
placement option is one field here; ``DDG`` and ``DNI`` take every field as a keyword.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddgpipe.errors import UsageError

__all__ = ["Placement", "EXECUTORS", "COMMS", "BALANCE_MODES", "world_size", "choose_executor"]

EXECUTORS = ("reference", "threads", "processes")
COMMS = ("auto", "host")
BALANCE_MODES = ("params", "flops", "time", "pipeline")
"""``pipeline``: the profiled cut and its neighbours timed as real pipelines (see
:mod:`ddgpipe.balance.timed`)."""


@dataclass(frozen=True)
class Placement:
    """How a model's stages are cut, placed and run.

    ``split``: cut points (``[4, 8]``), or None to cut by ``balance`` (``params``, ``flops``,
    ``time``, ``pipeline``; None: the timed cut remembered for this machine when a sample
    input is given, else ``params``). ``executor``: ``reference``, ``threads`` or
    ``processes`` (None: the natural one). ``device``/``devices``: one device for all stages,
    or one per stage. ``threads``: intra-op threads per stage (None: cores / K). ``comm``:
    ``auto`` or ``host`` for GPU ranks. ``replicas``: R pipelines (process runtime).
    ``peer_timeout_s``: how long a stage waits for a peer.
    """

    split: Sequence[int] | None = None
    balance: str | None = None
    executor: str | None = None
    device: str | torch.device = "cpu"
    devices: Sequence[str | torch.device] | None = None
    threads: int | None = None
    comm: str = "auto"
    replicas: int = 1
    peer_timeout_s: float = 300.0

    @classmethod
    def of(cls, placement: Placement | None = None, **fields) -> Placement:
        """``placement`` (default: the defaults) with ``fields`` replaced; an unknown name is
        refused as Python refuses an unknown keyword."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the placement "
                            f"options are {', '.join(sorted(names))}")
        return dataclasses.replace(placement or cls(), **fields)

    def check(self) -> Placement:
        """Refuse what no executor can do, naming the option and its choices: the one place
        that checks the placement's values (executor, balance, comm, replicas, threads,
        timeout); everything after it takes them as valid."""
        if self.executor is not None and self.executor not in EXECUTORS:
            raise UsageError(f"unknown executor {self.executor!r}; choose one of "
                             f"{', '.join(EXECUTORS)}")
        if self.balance is not None and self.balance not in BALANCE_MODES:
            raise UsageError(f"unknown balance {self.balance!r}; choose one of "
                             f"{', '.join(BALANCE_MODES)}")
        if self.comm not in COMMS:
            raise UsageError(f"unknown comm {self.comm!r}; choose one of {', '.join(COMMS)}")
        if self.replicas < 1:
            raise UsageError(f"replicas must be >= 1 (got {self.replicas})")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1 (got {self.threads})")
        if not self.peer_timeout_s > 0:
            raise UsageError(f"the peer timeout must be > 0 seconds (got {self.peer_timeout_s})")
        return self

    def as_dict(self) -> Mapping[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def world_size() -> int:
    """Processes in the default group, or 1 when torch.distributed is not in use."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def choose_executor(executor: str | None, stages: int, replicas: int = 1) -> str:
    """The executor to use: ``processes`` under torch.distributed, else as asked (default:
    ``threads`` for K > 1, ``reference`` for K = 1). ``executor`` and ``replicas`` are a
    checked :class:`Placement`'s (:meth:`Placement.check` refuses unknown names); what is
    refused here is what this process cannot run."""
    if replicas > 1 and (world_size() == 1 or executor not in (None, "processes")):
        raise UsageError(
            f"{replicas} replicas run one process per stage and replica, under the process "
            f"runtime: start {stages} x {replicas} = {stages * replicas} ranks with torchrun, "
            "with `ddgpipe train --executor processes --replicas R`, or with "
            "ddgpipe.runtime.launch.run_workers, and build the pipeline in each"
        )
    if world_size() > 1:
        if executor not in (None, "processes"):
            raise UsageError(f"executor {executor!r} runs every stage in one process, but this "
                             f"process is one of {world_size()} ranks (torchrun or the "
                             "launcher): leave the executor out or choose processes")
        return "processes"
    if executor == "processes":
        raise UsageError("executor 'processes' runs one stage per process: start the ranks "
                         "with torchrun, with `ddgpipe train --executor processes`, or with "
                         "ddgpipe.runtime.launch.run_workers, and build the pipeline in each")
    if executor is None:
        return "threads" if stages > 1 else "reference"
    return executor
