"""Plots are drawn from run files, and a directory that is not a run gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from ddgpipe.errors import UsageError
from ddgpipe.training.plots import plot_bench, plot_learning_curves, plot_timeline, read_jsonl


def make_run(path: Path, label: str | None, losses: list) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"label": label} if label else {"model": "x"}))
    lines = [json.dumps({"kind": "iter", "iteration": 1, "epoch": 1, "loss": 2.0, "lr": 0.1})]
    for i, loss in enumerate(losses):
        lines.append(json.dumps({"kind": "epoch", "epoch": i + 1, "iteration": 10 * (i + 1),
                                 "train_loss": loss, "train_acc": 0.5, "test_loss": loss,
                                 "test_acc": 0.5 + 0.1 * i, "lr": 0.1, "images_per_s": 100.0,
                                 "wall_time": 1.5 * (i + 1)}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"ep")  # torn tail
    return path


def assert_png(path: Path) -> None:
    assert isinstance(path, Path) and path.stat().st_size > 0
    assert path.read_bytes()[:4] == b"\x89PNG"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def write_timeline(run: Path, records: list[dict]) -> None:
    run.mkdir(exist_ok=True)
    (run / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    run = make_run(tmp_path / "a", "BP", [1.0, "nan"])
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["iter", "epoch", "epoch"]
    assert records[2]["train_loss"] == "nan"


def test_learning_curves(tmp_path):
    a = make_run(tmp_path / "a", "BP", [1.0, 0.5, 0.2])
    b = make_run(tmp_path / "b", "DDG K=2", [1.1, "nan", 0.3])
    c = make_run(tmp_path / "c", None, ["inf", 0.9])  # no label: the directory name is used
    out = plot_learning_curves([a, str(b), c], tmp_path / "out" / "curves.png", title="t")
    assert out == tmp_path / "out" / "curves.png"
    assert_png(out)


def test_timeline_aligns_each_rank(tmp_path):
    run = tmp_path / "run"
    records = []
    for rank in range(2):  # two processes, clocks 100 s apart
        for m in range(30):
            base = 100.0 * rank + m * 0.01
            records.append({"stage": rank, "op": "F", "minibatch": m, "start": base,
                            "end": base + 0.004, "rank": rank})
            records.append({"stage": rank, "op": "B", "minibatch": m, "start": base + 0.004,
                            "end": base + 0.009, "rank": rank})
            records.append({"stage": rank, "op": "S", "minibatch": m, "start": base + 0.009,
                            "end": base + 0.0095, "rank": rank})
    write_timeline(run, records)
    out = plot_timeline(run)
    assert out == run / "timeline.png"
    assert_png(out)


def test_timeline_single_process_with_dni_ops(tmp_path):
    run = tmp_path / "run"
    records = [{"stage": k, "op": op, "minibatch": m, "start": 5.0 + m + 0.1 * i,
                "end": 5.0 + m + 0.1 * (i + 1)}
               for m in range(3) for k in range(3) for i, op in enumerate("FBSG")]
    write_timeline(run, records)
    assert_png(plot_timeline(str(run), tmp_path / "elsewhere" / "t.png"))


def test_bench_chart(tmp_path):
    rows = [{"name": "bp-1t", "ratio_median": 1.0, "ratio_min": 1.0, "ratio_max": 1.0},
            {"name": "ddg-graph", "ratio_median": 1.8, "ratio_min": 1.7, "ratio_max": 1.9},
            {"name": "failed", "ratio_median": None, "ratio_min": None, "ratio_max": None}]
    out = plot_bench(rows, str(tmp_path / "bench.png"), title="bench")
    assert out == tmp_path / "bench.png"
    assert_png(out)


def test_not_a_run_dir(tmp_path):
    with pytest.raises(UsageError) as info:
        plot_learning_curves([tmp_path], tmp_path / "x.png")
    assert str(info.value) == (f"{tmp_path} has no metrics.jsonl with epoch records; "
                               "is it a ddgpipe run directory?")
    only_iters = tmp_path / "iters"
    only_iters.mkdir()
    (only_iters / "metrics.jsonl").write_text(json.dumps({"kind": "iter", "loss": 1.0}) + "\n")
    with pytest.raises(UsageError, match="has no metrics.jsonl with epoch records"):
        plot_learning_curves([only_iters], tmp_path / "x.png")
    with pytest.raises(UsageError) as info:
        plot_timeline(tmp_path)
    assert str(info.value) == (f"{tmp_path} has no timeline.jsonl; "
                               "train with --timeline to record one")
    assert not (tmp_path / "x.png").exists()
