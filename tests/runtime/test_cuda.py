"""On GPUs: every executor against the reference, bitwise, in deterministic mode.

Skipped without CUDA (the CI machine has none); ``make gpu-check`` runs it on a GPU machine.
Every stage of the threaded executor computes on a CUDA stream of its own, so with all stages
on one GPU these tests exercise the stream hand-offs (events, ``record_stream``); with two
GPUs, the cross-device copies.
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import ddgpipe  # noqa: E402
from ddgpipe.runtime.launch import run_workers  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_same,
    batches,
    conv_block,
    pool_head,
    sgd,
    train,
)
from tests.runtime_helpers import (  # noqa: E402
    assert_runtime_matches_reference,
    local_stage_arrays,
    run_clocks,
)

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def deterministic():
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(False)


def make_model():
    """BatchNorm and dropout in several stages: buffers and CUDA random streams matter."""
    torch.manual_seed(0)
    return nn.Sequential(
        conv_block(3, 16, batchnorm=True, dropout=0.1),
        conv_block(16, 16, batchnorm=True),
        conv_block(16, 32, stride=2, dropout=0.1),
        pool_head(32),
    )


def image_batches(n):
    return batches(n, (3, 16, 16), sizes=32)


optimizer = sgd()
SEED = 5


@pytest.mark.parametrize("stash", ["graph", "recompute"])
@pytest.mark.parametrize("stages", [2, 3])
def test_threads_on_one_gpu_match_the_reference(stash, stages):
    devices = ["cuda:0"] * stages  # one GPU, a stream per stage
    data = image_batches(7)
    ref = train(ddgpipe.DDG(make_model(), stages, optimizer, stash=stash, devices=devices,
                            executor="reference"), data, SEED)
    thr = train(ddgpipe.DDG(make_model(), stages, optimizer, stash=stash, devices=devices,
                            executor="threads"), data, SEED)
    assert_same(thr, ref)
    assert all(torch.isfinite(v).all() for v in thr[1].values() if v.is_floating_point())


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_threads_across_gpus_match_the_reference():
    data = image_batches(7)
    ref = train(ddgpipe.DDG(make_model(), 2, optimizer, device="cuda", executor="reference"),
                data, SEED)
    thr = train(ddgpipe.DDG(make_model(), 2, optimizer, device="cuda", executor="threads"),
                data, SEED)
    assert_same(thr, ref)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(precision):
    data = image_batches(6)
    ref = train(ddgpipe.DDG(make_model(), 2, optimizer, devices=["cuda:0"] * 2, precision=precision,
                            executor="reference"), data, SEED)
    thr = train(ddgpipe.DDG(make_model(), 2, optimizer, devices=["cuda:0"] * 2, precision=precision,
                            executor="threads"), data, SEED)
    assert_same(thr, ref)


def test_recompute_replays_gpu_dropout_exactly():
    """The replay restores the stage GPU's random state: recompute gives graph's weights."""
    data = image_batches(6)
    graph = train(ddgpipe.DDG(make_model(), 3, optimizer, devices=["cuda:0"] * 3, stash="graph",
                              executor="reference"), data, SEED)
    recompute = train(ddgpipe.DDG(make_model(), 3, optimizer, devices=["cuda:0"] * 3,
                                  stash="recompute", executor="reference"), data, SEED)
    for name in graph[1]:
        torch.testing.assert_close(recompute[1][name], graph[1][name], rtol=1e-5, atol=1e-6)


def gpu_stage_worker(rank, world, comm, clocks):
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(5)
    torch.cuda.manual_seed_all(5)
    device = "cuda:0" if comm == "host" else "cuda"  # host: both ranks share one GPU
    pipe = ddgpipe.DDG(make_model(), world, optimizer, device=device, comm=comm, peer_timeout_s=60)
    losses = run_clocks(pipe, rank, world, image_batches(clocks))
    return {"state": local_stage_arrays(pipe), "losses": losses}


def reference_on_gpu():
    return ddgpipe.DDG(make_model(), 2, optimizer, devices=["cuda:0"] * 2, executor="reference")


@pytest.mark.slow
def test_processes_sharing_one_gpu_through_host_memory():
    results = run_workers(gpu_stage_worker, 2, ("host", 5), timeout_s=300, threads=1)
    torch.manual_seed(5)
    torch.cuda.manual_seed_all(5)
    assert_runtime_matches_reference(results, reference_on_gpu, image_batches(5))


@pytest.mark.slow
@pytest.mark.skipif(GPUS < 2, reason="nccl needs a GPU per rank")
def test_processes_over_nccl():
    results = run_workers(gpu_stage_worker, 2, ("auto", 5), timeout_s=300, threads=1,
                          backend="cpu:gloo,cuda:nccl")
    torch.manual_seed(5)
    torch.cuda.manual_seed_all(5)
    assert_runtime_matches_reference(
        results, lambda: ddgpipe.DDG(make_model(), 2, optimizer, device="cuda",
                                     executor="reference"), image_batches(5))


def test_training_on_gpu_from_the_command_line(tmp_path, capsys):
    from ddgpipe.cli import main

    out = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--method", "ddg", "--stages", "2", "--epochs",
                 "1", "--batch-size", "64", "--no-progress", "--out", str(out)]) == 0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in saved.values())  # loads on any machine
    assert "test acc" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_bench_runs_and_reports_gpu_memory(tmp_path):
    from ddgpipe.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(model="resnet20", batch_size=32, stages=2, steps=2,
                                   warmup=1, rounds=1, device="cuda",
                                   configs=("bp-1gpu", "ddg-graph-threads",
                                            "ddg-graph-processes")),
                       out_dir=tmp_path, progress=False)
    rows = {row["name"]: row for row in result["rows"]}
    assert all("error" not in row for row in rows.values()), rows
    assert rows["ddg-graph-threads"]["peak_gpu_mb"] and rows["bp-1gpu"]["ratio_median"] == 1.0
