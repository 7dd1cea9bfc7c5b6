"""The throughput bench: a tiny real run, the ratio arithmetic, and input checks.

Nothing here asserts a timing or a speedup: the machine is shared and noisy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import pytest

from ddgpipe.bench import (
    CONFIG_NAMES,
    BenchConfig,
    config_names,
    format_bench_table,
    run_bench,
    summarise,
)
from ddgpipe.bench.config import resolve
from ddgpipe.bench.workers import stage_profile
from ddgpipe.errors import UsageError

TINY = dict(model="mlp", in_channels=1, image_size=8, batch_size=16, stages=2, steps=2,
            warmup=1, rounds=1)
SUBSET = ("bp-1t", "bp-2t", "ddp", "gpipe-m2", "1f1b-m2", "ddg-graph-threads",
          "ddg-graph-processes")


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path, capsys):
    result = run_bench(BenchConfig(**TINY, configs=SUBSET), out_dir=tmp_path)

    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == list(SUBSET)
    for name, row in rows.items():
        assert "error" not in row, row.get("error")
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
        one_process = name.startswith("bp-") or name.endswith("-threads")
        assert len(row["peak_mem_mb"]) == (1 if one_process else 2)
        assert all(m > 0 for m in row["peak_mem_mb"])
    assert rows["bp-1t"]["ratio_median"] == 1.0
    assert rows["bp-1t"]["ratio_min"] == rows["bp-1t"]["ratio_max"] == 1.0
    assert rows["bp-2t"]["ratio_vs_bp_Kt_median"] == 1.0
    for name in ("ddg-graph-threads", "ddg-graph-processes"):
        profile = rows[name]["stage_profile"]
        assert [p["stage"] for p in profile] == [0, 1]
        assert all(p["waits_logged"] and p["f_ms"] > 0 and p["b_ms"] > 0 for p in profile)
    assert len(result["split_threads"]) == 1
    # every (executor, stash mode) in use has its own timed cut, and its rows run it
    assert set(result["split_choice"]) == {"threads/graph", "processes/graph"}
    assert rows["ddg-graph-threads"]["split"] == result["split_threads"]
    assert rows["ddg-graph-processes"]["split"] == rows["gpipe-m2"]["split"] == result["split"]
    assert rows["bp-1t"]["split"] is None
    assert result["best_sync_pipeline"]["name"] in ("gpipe-m2", "1f1b-m2")
    assert len(result["split"]) == 1 and 0 < result["split"][0] < result["blocks"]
    assert result["rounds"][0].keys() == set(SUBSET)
    assert "hostname" not in json.dumps(result["machine"]).lower()

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [row["name"] for row in saved["rows"]] == list(SUBSET)
    if importlib.util.find_spec("ddgpipe.training.plots") is not None:
        assert (tmp_path / "bench.png").stat().st_size > 0

    err = capsys.readouterr().err
    assert sum(line.startswith("round 1/1") for line in err.splitlines()) == len(SUBSET)
    table = format_bench_table(result)
    assert all(name in table for name in SUBSET)


@pytest.mark.slow
def test_tiny_replica_rows(tmp_path):
    """K x R rows through the same code: one stage in two replicas (data parallelism) and two
    stages in two replicas, four processes on this machine's cores."""
    config = BenchConfig(**TINY, replicas=2,
                         configs=("bp-1t", "ddg-graph-k1r2", "ddg-graph-k2r2"))
    result = run_bench(config, progress=False)
    rows = {row["name"]: row for row in result["rows"]}
    for name, processes in (("ddg-graph-k1r2", 2), ("ddg-graph-k2r2", 4)):
        row = rows[name]
        assert "error" not in row, row.get("error")
        assert row["images_per_s"] > 0 and row["processes"] == processes
        assert row["replicas"] == 2 and len(row["stage_profile"]) == processes
        assert row["oversubscribed"] == (processes > (os.cpu_count() or 1))
    assert sorted((p["stage"], p["replica"]) for p in rows["ddg-graph-k2r2"]["stage_profile"]) \
        == [(0, 0), (0, 1), (1, 0), (1, 1)]
    table = format_bench_table(result)
    if rows["ddg-graph-k2r2"]["oversubscribed"]:
        assert "ddg-graph-k2r2: 4 processes (2 stages x 2 replicas)" in table
        assert "oversubscribed" in table


def test_summarise_medians_and_ratios_per_round():
    rounds = [
        {"bp-1t": 100.0, "bp-2t": 200.0, "x": 50.0},
        {"bp-1t": 200.0, "bp-2t": 200.0, "x": 300.0},
        {"bp-1t": 100.0, "bp-2t": 100.0, "x": None},  # x failed in this round
    ]
    s = summarise(rounds, "bp-1t", "bp-2t")
    assert s["bp-1t"]["images_per_s"] == 100.0
    assert (s["bp-1t"]["ratio_median"], s["bp-1t"]["ratio_min"], s["bp-1t"]["ratio_max"]) == (
        1.0, 1.0, 1.0)
    assert s["bp-2t"]["images_per_s"] == 200.0
    assert (s["bp-2t"]["ratio_median"], s["bp-2t"]["ratio_min"], s["bp-2t"]["ratio_max"]) == (
        1.0, 1.0, 2.0)
    assert s["x"]["images_per_s"] == 175.0
    assert s["x"]["images_per_s_rounds"] == [50.0, 300.0, None]
    assert (s["x"]["ratio_median"], s["x"]["ratio_min"], s["x"]["ratio_max"]) == (1.0, 0.5, 1.5)
    assert s["x"]["ratio_vs_bp_Kt_median"] == 0.875  # median of 0.25 and 1.5
    assert summarise(rounds, "bp-1t")["x"]["ratio_vs_bp_Kt_median"] is None


def test_summarise_without_baseline_gives_no_ratio():
    s = summarise([{"bp-1t": None, "y": 10.0}])
    assert s["y"]["images_per_s"] == 10.0
    assert s["y"]["ratio_median"] is None and s["bp-1t"]["images_per_s"] is None


def test_stage_profile_subtracts_waits_and_keeps_the_window():
    records = [
        {"stage": 0, "op": "F", "minibatch": 1, "start": 0.0, "end": 1.0},
        {"stage": 0, "op": "B", "minibatch": 0, "start": 1.0, "end": 2.0},
        {"stage": 0, "op": "S", "minibatch": 0, "start": 2.0, "end": 2.25},
        {"stage": 0, "op": "F", "minibatch": 2, "start": 2.5, "end": 3.0},
        {"stage": 0, "op": "F", "minibatch": 3, "start": 4.0, "end": 5.0},  # after the window
    ]
    p = stage_profile(records, [(1.0, 1.5)], t0=0.0, t1=4.0, clocks=2, rank=0)
    assert (p["f_ms"], p["b_ms"], p["s_ms"], p["wait_ms"]) == (750.0, 250.0, 125.0, 250.0)
    assert (p["busy_s"], p["wall_s"], p["utilisation"]) == (2.25, 4.0, 0.5625)
    assert p["waits_logged"] is True
    assert stage_profile(records, None, 0.0, 4.0, 2, 0)["waits_logged"] is False


def test_config_names_follow_batch_and_stages():
    ddg = ("ddg-graph-threads", "ddg-recompute-threads", "ddg-none-threads",
           "ddg-graph-processes", "ddg-recompute-processes", "ddg-none-processes")
    assert CONFIG_NAMES == ("bp-1t", "bp-2t", "ddp", "gpipe-m2", "gpipe-m4", "gpipe-m8",
                            "1f1b-m2", "1f1b-m4", "1f1b-m8", "ddg-m2", "ddg-m4", "ddg-m8", *ddg)
    names = config_names(BenchConfig(batch_size=12, stages=3, microbatches=(2, 3, 8)))
    assert names == ("bp-1t", "bp-3t", "ddp", "gpipe-m2", "gpipe-m3", "1f1b-m3", "ddg-m2",
                     "ddg-m3", *ddg)
    names = config_names(BenchConfig(replicas=4))
    assert names[-3:] == ("ddg-graph-k2r1", "ddg-graph-k1r4", "ddg-graph-k2r4")
    names = config_names(BenchConfig(compile=True))
    assert names[-5:] == ("bp-1t-compile", "bp-2t-compile", "ddg-graph-threads-compile",
                          "ddg-recompute-threads-compile", "ddg-graph-processes-compile")


def test_microbatched_ddg_rows_are_ddg_on_the_process_runtime_at_the_same_batch():
    spec = resolve(BenchConfig(configs=("ddg-m4",)))[1]
    assert (spec.kind, spec.microbatches, spec.stash, spec.processes) == ("ddg", 4, "graph", 2)
    with pytest.raises(UsageError, match="3 microbatches do not divide the batch of 128"):
        resolve(BenchConfig(configs=("ddg-m3",)))


def test_a_compensated_row_is_its_ddg_row_with_the_compensation():
    adamw = BenchConfig(optimizer="adamw",
                        configs=("ddg-m4", "ddg-m4+wp", "ddg-graph-threads+wp"))
    specs = {s.name: s for s in resolve(adamw)}
    assert specs["ddg-m4+wp"] == dataclasses.replace(specs["ddg-m4"], name="ddg-m4+wp",
                                                     compensation="wp")
    assert (specs["ddg-m4+wp"].kind, specs["ddg-m4+wp"].microbatches) == ("ddg", 4)
    assert (specs["ddg-graph-threads+wp"].kind, specs["ddg-graph-threads+wp"].compensation) \
        == ("ddg-threads", "wp")
    assert specs["ddg-m4"].compensation is None
    # names joined by "+" (the command line's --configs splits at commas) or by commas
    sgd = [resolve(BenchConfig(configs=(name,)))[1] for name in ("ddg-m4+sc+lwp",
                                                                  "ddg-m4+sc,lwp")]
    assert [s.compensation for s in sgd] == ["sc,lwp", "sc,lwp"]
    # the engine's check: wp follows momentum SGD's velocity too, so sgd takes it
    assert resolve(BenchConfig(configs=("ddg-m4+wp",)))[1].compensation == "wp"


def test_a_refused_compensation_starts_no_process(monkeypatch):
    import ddgpipe.bench.runner as runner

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker started before the compensation was checked")

    monkeypatch.setattr(runner, "run_workers", no_workers)
    with pytest.raises(UsageError, match="lwp needs SGD with momentum, got AdamW"):
        run_bench(BenchConfig(**TINY, optimizer="adamw", configs=("ddg-m2+lwp",)),
                  progress=False)


@pytest.mark.parametrize("name, settings", [
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("adamw", {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}),
])
def test_every_row_steps_with_the_benchs_optimizer(name, settings):
    import torch

    from ddgpipe.bench.workload import bench_optimizer

    opt = bench_optimizer(BenchConfig(optimizer=name))([torch.nn.Parameter(torch.zeros(1))])
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    assert {k: opt.param_groups[0][k] for k in settings} == settings


def test_a_threaded_compensated_row_builds_ddg_with_its_compensation(monkeypatch):
    """The worker itself (in this process: the threaded executor) passes the row's
    compensation and the bench's optimizer to DDG."""
    import torch

    import ddgpipe.methods
    from ddgpipe.bench.workers import run_config_worker

    built = []

    class Recorded(ddgpipe.methods.DDG):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ddgpipe.methods, "DDG", Recorded)
    config = BenchConfig(**TINY, optimizer="adamw", configs=("ddg-graph-threads+wp",))
    spec = resolve(config)[1]
    out = run_config_worker(0, 1, config, spec, [2])
    assert out["elapsed_s"] > 0 and len(built) == 1
    assert built[0]["compensation"] == ("wp",)
    probe = built[0]["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(probe, torch.optim.AdamW) and probe.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.slow
def test_tiny_adamw_bench_times_weight_prediction(tmp_path):
    configs = ("bp-2t", "ddg-m2+wp", "ddg-graph-threads+wp")
    result = run_bench(BenchConfig(**TINY, optimizer="adamw", configs=configs),
                       out_dir=tmp_path, progress=False)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["bp-1t", *configs]
    for name in configs:
        assert "error" not in rows[name], rows[name].get("error")
        assert rows[name]["images_per_s"] > 0
    assert rows["ddg-m2+wp"]["compensation"] == rows["ddg-graph-threads+wp"]["compensation"] \
        == "wp"
    assert rows["ddg-m2+wp"]["microbatches"] == 2 and rows["bp-2t"]["compensation"] is None
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["config"]["optimizer"] == "adamw"
    assert saved["optimizer"] == {"name": "AdamW", "lr": 1e-3, "betas": [0.9, 0.95],
                                  "weight_decay": 0.1}


@pytest.mark.slow
def test_tiny_bench_runs_microbatched_ddg_beside_gpipe(tmp_path):
    result = run_bench(BenchConfig(**TINY, configs=("gpipe-m2", "ddg-m2")), progress=False)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["bp-1t", "gpipe-m2", "ddg-m2"]
    assert "error" not in rows["ddg-m2"], rows["ddg-m2"].get("error")
    assert rows["ddg-m2"]["microbatches"] == 2 and rows["ddg-m2"]["images_per_s"] > 0
    assert rows["ddg-m2"]["split"] == rows["gpipe-m2"]["split"]  # the same cut


def test_a_compile_twin_is_its_plain_row_through_torch_compile():
    specs = resolve(BenchConfig(configs=("ddg-none-processes-compile",)))
    assert [s.name for s in specs] == ["bp-1t", "ddg-none-processes-compile"]
    assert specs[1] == dataclasses.replace(resolve(BenchConfig(configs=(
        "ddg-none-processes",)))[1], name="ddg-none-processes-compile", compile=True)


@pytest.mark.parametrize("changes, message", [
    (dict(configs=("bp-1t", "nope")), "unknown bench config 'nope'"),
    (dict(batch_size=15, configs=("ddp",)), "not divisible by 2"),
    (dict(batch_size=15), "not divisible by 2"),  # all configs include ddp
    (dict(stages=1), "the bench compares K >= 2 workers"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(rounds=0), "rounds must be an integer >= 1"),
    (dict(model="resnet7"), "unknown model 'resnet7'"),
    (dict(configs=("1f1b-m1",)), "needs at least as many microbatches as stages"),
    (dict(configs=("gpipe-m3",)), "3 microbatches do not divide the batch of 16"),
    (dict(configs="ddp"), "configs must be a tuple of names"),
    (dict(configs=("ddg-graph",)), "unknown bench config 'ddg-graph'"),
    (dict(device="tpu"), "bench device must be cpu or cuda"),
    (dict(replicas=3, configs=("ddg-graph-k2r3",)), "not divisible by 3"),
    (dict(configs=("ddg-graph-k3r2",)), "a K x R row runs K = 1 or the bench's K = 2"),
    (dict(replicas=0), "replicas must be an integer >= 1"),
    (dict(configs=("ddp-compile",)), "only backprop .* and DDG rows"),
    (dict(optimizer="adam"), "optimizer must be one of sgd, adamw"),
    (dict(optimizer="adamw", configs=("ddg-m2+lwp",)),
     r"'ddg-m2\+lwp' \(optimizer adamw\): compensation lwp needs SGD with momentum, got AdamW"),
    (dict(configs=("gpipe-m2+wp",)), r"'gpipe-m2\+wp': only a DDG row takes a compensation"),
    (dict(configs=("bp-2t+wp",)), "only a DDG row takes a compensation"),
    (dict(configs=("ddg-m2+",)), "names no compensation"),
    (dict(configs=("ddg-m2+nope",)), "unknown compensation 'nope'"),
    (dict(configs=("ddg-m2+accumulate",)), "does not compose with microbatches"),
])
def test_bad_input_raises_usage_error(changes, message):
    with pytest.raises(UsageError, match=message):
        run_bench(BenchConfig(**{**TINY, **changes}), progress=False)


def test_format_table_of_a_failed_row():
    result = {
        "config": {"model": "m", "batch_size": 4, "stages": 2, "steps": 1, "rounds": 1},
        "split": [1],
        "rows": [
            {"name": "bp-1t", "images_per_s": 10.0, "ratio_median": 1.0, "ratio_min": 1.0,
             "ratio_max": 1.0, "ratio_vs_bp_Kt_median": None, "peak_mem_mb": [300.0]},
            {"name": "ddp", "images_per_s": None, "ratio_median": None, "ratio_min": None,
             "ratio_max": None, "ratio_vs_bp_Kt_median": None, "peak_mem_mb": [],
             "error": "rank 1: boom"},
        ],
        "best_sync_pipeline": None,
    }
    lines = format_bench_table(result).splitlines()
    assert lines[3].split() == ["bp-1t", "10.0", "1.00", "[1.00-1.00]", "-", "300"]
    assert lines[4].split()[:5] == ["ddp", "-", "-", "-", "-"]
    assert lines[4].endswith("error: rank 1: boom")


def test_one_dimensional_resnets_get_signals():
    from ddgpipe.bench.workload import bench_batch, bench_model

    cfg = BenchConfig(model="resnet1d-20", image_size=40, in_channels=1, batch_size=4)
    x, y = bench_batch(cfg)
    assert x.shape == (4, 1, 40) and y.shape == (4,)
    assert bench_model(cfg)(x).shape == (4, 10)


def test_the_command_line_passes_the_optimizer_and_compensated_rows(monkeypatch, tmp_path):
    import ddgpipe.bench
    from ddgpipe.cli import main

    seen = []

    def record(config, **kwargs):
        seen.append(config)
        raise UsageError("recorded; nothing is run")

    monkeypatch.setattr(ddgpipe.bench, "run_bench", record)
    main(["bench", "--model", "mlp", "--optimizer", "adamw", "--configs",
          "bp-2t,ddg-m4+wp,ddg-graph-threads+sc+lwp", "--out", str(tmp_path / "b")])
    assert seen[0].optimizer == "adamw"
    assert seen[0].configs == ("bp-2t", "ddg-m4+wp", "ddg-graph-threads+sc+lwp")
