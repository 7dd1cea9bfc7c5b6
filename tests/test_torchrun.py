"""Several nodes: two torchrun agents on 127.0.0.1 meet through a c10d rendezvous, one stage
per node, and train exactly as the reference executor does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ddgpipe.cli import main
from ddgpipe.launch import free_port

ARGS = ["--model", "resnet20", "--data", "digits", "--epochs", "1", "--batch-size", "128",
        "--method", "ddg", "--stages", "2", "--no-progress", "--threads", "1",
        "--balance", "params"]


def epochs(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "wall_time")}
            for r in records if r["kind"] == "epoch"]


def test_two_nodes_with_torchrun_match_the_reference(tmp_path):
    port = free_port()
    run = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ddgpipe",
        "--max-restarts", "0", "-m", "ddgpipe", "train", *ARGS, "--timeout", "60",
        "--out", str(run),
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
    assert "test acc" in "".join(outputs)

    assert main(["train", *ARGS, "--out", str(tmp_path / "reference")]) == 0
    assert epochs(run) == epochs(tmp_path / "reference")
