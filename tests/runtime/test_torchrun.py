"""Several nodes: two torchrun agents on 127.0.0.1 meet through a c10d rendezvous and train
exactly as one machine does: one stage per node (against the reference executor), and two
stages x two replicas, one replica per node (against the spawned process runtime)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ddgpipe.cli import main
from ddgpipe.runtime.launch import free_port

# every test here spawns processes; the replicas case is slow

ARGS = ["--model", "resnet20", "--data", "digits", "--epochs", "1", "--batch-size", "128",
        "--method", "ddg", "--stages", "2", "--no-progress", "--threads", "1",
        "--balance", "params"]


def epochs(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time")}
            for r in records if r["kind"] == "epoch"]


def _two_agents(run: Path, args: list[str], nproc: int) -> str:
    """Run ``ddgpipe train ARGS`` under two torchrun agents of ``nproc`` workers each."""
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
        str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", "ddgpipe", "--max-restarts", "0", "-m", "ddgpipe", "train", *args,
        "--timeout", "60", "--out", str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            out, _ = node.communicate(timeout=240)
            outputs.append(out)
    finally:
        for node in nodes:  # never leave an agent or its worker behind
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    return "".join(outputs)


def test_two_nodes_with_torchrun_match_the_reference(tmp_path):
    run = tmp_path / "torchrun"
    assert "test acc" in _two_agents(run, ARGS, nproc=1)
    assert main(["train", *ARGS, "--out", str(tmp_path / "reference")]) == 0
    assert epochs(run) == epochs(tmp_path / "reference")


@pytest.mark.slow
def test_two_nodes_of_one_replica_each_match_the_spawned_runtime(tmp_path):
    """K = 2 x R = 2 under torchrun (nnodes 2 x nproc-per-node 2: rank r*K + k is stage k of
    replica r, so each node holds one replica) trains bitwise as the four processes
    `--executor processes` spawns on one machine."""
    args = [*ARGS, "--replicas", "2"]
    run = tmp_path / "torchrun"
    assert "test acc" in _two_agents(run, args, nproc=2)
    assert main(["train", *args, "--executor", "processes", "--timeout", "60",
                 "--out", str(tmp_path / "spawned")]) == 0
    assert epochs(run) == epochs(tmp_path / "spawned")
    config = json.loads((run / "config.json").read_text())
    assert (config["replicas"], config["executor"]) == (2, "processes")
