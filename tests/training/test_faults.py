"""The catalogue of bad inputs and faults.

Every case must end with one clear line on stderr that names the problem and the fix, a
non-zero exit code, no hang (each case runs under a time bound) and, where a checkpoint
exists, that checkpoint still intact and loadable.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.cli import main
from ddgpipe.errors import UsageError, WorkerError
from ddgpipe.runtime.launch import run_workers
from tests.cifar_files import write_cifar10

FAST = ["train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--batch-size",
        "128", "--no-progress", "--threads", "1"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddgpipe: error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli(args, capsys, seconds: float = 120) -> tuple[int, str]:
    start = time.monotonic()
    code = main(args)
    assert time.monotonic() - start < seconds, "took too long"
    return code, capsys.readouterr().err


# --- bad input on the command line --------------------------------------------------------

BAD_ARGS = [
    ("K > blocks", ["--method", "ddg", "--stages", "12"], "cannot cut a model of 11 blocks"),
    ("K < 1", ["--method", "ddg", "--stages", "0"], "--stages must be >= 1"),
    ("empty stage", ["--method", "ddg", "--stages", "3", "--split", "4,4"],
     "leaves stage 1 empty"),
    ("split count", ["--method", "ddg", "--stages", "3", "--split", "4"], "gives 1 cut points"),
    ("unknown model", ["--model", "resnet21"], "unknown model 'resnet21'"),
    ("unknown data", ["--data", "mnist"], "unknown data set 'mnist'"),
    ("unknown method", ["--method", "sync"], "unknown method 'sync'"),
    ("lr <= 0", ["--lr", "0"], "lr"),
    ("batch size 0", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("batch too big", ["--batch-size", "100000"], "larger than the 1437 training samples"),
    ("epochs < 1", ["--epochs", "0"], "--epochs must be >= 1"),
    ("bp with stages", ["--method", "bp", "--stages", "2"], "--method bp runs the whole"),
    ("stash mode", ["--method", "ddg", "--stash", "all"], "unknown stash mode 'all'"),
    ("grad shrink", ["--method", "ddg", "--grad-shrink", "1.5"], "grad_shrink must be in"),
    ("cifar without dir", ["--data", "cifar10"], "--data-dir is required for cifar10"),
    ("missing cifar dir", ["--data", "cifar10", "--data-dir", "/nonexistent/cifar"],
     "does not exist"),
    ("processes with bp", ["--executor", "processes"], "--executor processes runs one process"),
    ("unknown device", ["--device", "tpu"], "unknown device 'tpu'"),
    ("missing GPU", ["--device", "cuda:7"], "cuda:7"),
    ("timeout", ["--method", "ddg", "--timeout", "0"], "--timeout must be > 0"),
    ("checkpoint dni", ["--method", "dni", "--stages", "2", "--checkpoint-every", "2"],
     "checkpoints support --method bp, ddg and fr"),
    ("resume nothing", ["--resume", "/nonexistent/run"], "has no checkpoint"),
    ("replicas 0", ["--method", "ddg", "--replicas", "0"], "--replicas must be >= 1"),
    ("replicas of bp", ["--replicas", "2"], "--method bp has no replicas"),
    ("replicas of dni", ["--method", "dni", "--stages", "2", "--replicas", "2"],
     "--method dni has no replicas"),
    ("replicas in threads", ["--method", "ddg", "--replicas", "2", "--executor", "threads"],
     "--executor threads runs one process"),
    ("batch by replicas", ["--method", "ddg", "--replicas", "3"],
     "--batch-size 128 is the global minibatch, split into 3 equal shards"),
]


@pytest.mark.parametrize("args, expected", [(a, e) for _, a, e in BAD_ARGS],
                         ids=[name for name, _, _ in BAD_ARGS])
def test_bad_arguments(args, expected, capsys, tmp_path):
    out = [] if "--resume" in args else ["--out", str(tmp_path / "run")]
    code, err = cli([*FAST, *out, *args], capsys)
    assert code == 2
    assert expected in one_line_error(err)


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = cli([*FAST, "--out", str(blocker / "run")], capsys)
    assert code == 2 and "cannot write to output directory" in one_line_error(err)


# --- bad data ---------------------------------------------------------------------------

def _damage(data_dir: Path, name: str, content: bytes) -> None:
    (data_dir / "cifar-10-batches-py" / name).write_bytes(content)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


@pytest.mark.parametrize("name, content, expected", [
    ("data_batch_2", b"\x80\x02}q\x00(X", "corrupt or truncated"),
    ("test_batch", pickle.dumps({b"data": _Exploit()}, protocol=2), "refusing to load"),
    ("data_batch_1", pickle.dumps({b"data": [1, 2], b"labels": [0]}, protocol=2),
     "expected N x 3072 uint8"),
], ids=["truncated", "malicious", "wrong-shape"])
def test_bad_cifar_files(name, content, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_dir = write_cifar10(tmp_path / "data")
    _damage(data_dir, name, content)
    code, err = cli([*FAST, "--data", "cifar10", "--data-dir", str(data_dir), "--out",
                     str(tmp_path / "run")], capsys)
    line = one_line_error(err)
    assert code == 2 and expected in line and name in line
    assert not (tmp_path / "pwned-by-pickle").exists()


# --- the Python API ------------------------------------------------------------------------

def test_a_model_that_is_not_sequential_needs_an_example_to_be_traced():
    with pytest.raises(UsageError, match="Linear is not an nn.Sequential, so it is traced into "
                                         "blocks on an example batch: pass sample_input="):
        ddgpipe.DDG(nn.Linear(4, 2), 2, lambda ps: torch.optim.SGD(ps, lr=0.1))


def test_wrong_input_shape_for_the_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pipe = ddgpipe.DDG(model, 2, lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(UsageError, match=r"stage 0 cannot take an input of shape \(3, 5\)"):
        pipe.step(torch.randn(3, 5), torch.zeros(3, dtype=torch.long),
                  nn.functional.cross_entropy)


def test_nan_loss_stops_with_the_minibatch(capsys, tmp_path):
    code, err = cli([*FAST, "--method", "ddg", "--stages", "2", "--lr", "1e12",
                     "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "training diverged" in one_line_error(err)


# --- processes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_port_already_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
        proc = subprocess.run([sys.executable, "-m", "ddgpipe", *FAST, "--method", "ddg",
                               "--stages", "2", "--timeout", "10", "--out", str(tmp_path / "r")],
                              capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "cannot join the process group at 127.0.0.1:" in one_line_error(proc.stderr)


def _dies_while_its_peer_waits(rank, world):
    if rank == 1:
        os._exit(3)  # gone without a word while rank 0 waits on it
    buf = torch.empty(4)
    torch.distributed.irecv(buf, 1).wait()


def test_a_dead_peer_during_recv_is_named_not_a_hang():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1: exited with code 3"):
        run_workers(_dies_while_its_peer_waits, 2, peer_timeout_s=20, timeout_s=60)
    assert time.monotonic() - start < 45


# --- checkpoints ----------------------------------------------------------------------------

CKPT = [*FAST, "--method", "ddg", "--stages", "2", "--epochs", "2", "--balance", "params"]


@pytest.fixture
def stopped_run(tmp_path, capsys) -> Path:
    run = tmp_path / "run"
    assert main([*CKPT, "--checkpoint-every", "3", "--stop-after", "6", "--out", str(run)]) == 0
    capsys.readouterr()
    return run


def assert_checkpoint_intact(run: Path, capsys) -> None:
    code = main([*CKPT, "--checkpoint-every", "3", "--resume", str(run)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.parametrize("args, expected", [
    (["--stages", "3"], "--stages: saved 2, given 3"),
    (["--model", "resnet32"], "--model: saved resnet20, given resnet32"),
    (["--lr", "0.2"], "--lr: saved 0.1, given 0.2"),
], ids=["other-K", "other-model", "other-lr"])
def test_a_checkpoint_from_another_run(stopped_run, args, expected, capsys):
    code, err = cli([*CKPT, *args, "--resume", str(stopped_run)], capsys)
    assert code == 2 and expected in one_line_error(err)
    assert_checkpoint_intact(stopped_run, capsys)


def test_a_resume_with_no_intact_set_is_refused(stopped_run, capsys):
    """Both kept sets damaged: nothing to fall back to (one damaged set falls back, see
    test_checkpoints)."""
    for name in ("iter-000003", "iter-000006"):
        rank_file = stopped_run / "checkpoints" / name / "rank-0.pt"
        rank_file.write_bytes(rank_file.read_bytes()[:100])
    code, err = cli([*CKPT, "--resume", str(stopped_run)], capsys)
    line = one_line_error(err)
    assert code == 2 and "no checkpoint set" in line and "is intact" in line
    assert "iter-000006: rank-0.pt does not match its manifest" in line
    assert "iter-000003: rank-0.pt does not match its manifest" in line


def test_a_full_disk_while_checkpointing(stopped_run, capsys, monkeypatch):
    import ddgpipe.training.checkpoints as ckpt

    real = ckpt.atomic_write_bytes

    def full(path, data):
        if path.suffix == ".pt":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full)
    code, err = cli([*CKPT, "--checkpoint-every", "3", "--resume", str(stopped_run)], capsys)
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and "previous checkpoint" in line
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    latest = json.loads((stopped_run / "checkpoints" / "latest.json").read_text())
    assert latest["iteration"] == 6
    assert_checkpoint_intact(stopped_run, capsys)


@pytest.fixture
def default_sigint():
    """SIGINT as a fresh interpreter has it (delivered, default handler), whatever an earlier
    test or library left in this process; restored afterwards. In the full suite something
    before these tests leaves SIGINT blocked or ignored in the pytest process, and children
    inherit both."""
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _child_default_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_swallowed_ctrl_c_still_stops_training(tmp_path, capsys, monkeypatch, default_sigint):
    """The KeyboardInterrupt of a Ctrl-C can land in code that swallows it (a finaliser on
    the main thread): the run must still stop at the next minibatch, not train to the end."""
    import ddgpipe.training.loop as train_module

    updates = []

    class SwallowingBar(train_module.tqdm):  # its update runs on the main thread every step
        def update(self, n=1):
            super().update(n)
            updates.append(n)
            if len(updates) == 7:
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass  # what a finaliser does with an exception: print it and go on

    monkeypatch.setattr(train_module, "tqdm", SwallowingBar)
    run = tmp_path / "run"
    code, err = cli([*CKPT, "--epochs", "30", "--checkpoint-every", "5", "--out", str(run)],
                    capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "ddgpipe: interrupted"
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["iteration"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_ctrl_c_during_training(tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddgpipe", *CKPT, "--epochs", "30", "--checkpoint-every", "5",
         "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        preexec_fn=_child_default_sigint)  # a terminal's Ctrl-C reaches a default child
    try:
        latest = run / "checkpoints" / "latest.json"
        deadline = time.monotonic() + 90
        while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert latest.exists(), "no checkpoint was written"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "ddgpipe: interrupted"
    assert "Traceback" not in err
    manifest = json.loads(latest.read_text())
    assert (run / "checkpoints" / manifest["set"] / "manifest.json").exists()
    code = main([*CKPT, "--epochs", "30", "--checkpoint-every", "5", "--stop-after",
                 str(manifest["iteration"] + 1), "--resume", str(run)])
    assert code == 0
