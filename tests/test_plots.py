"""Plots are drawn from run files, and a directory that is not a run gets a clear error."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from ddgpipe.errors import UsageError
from ddgpipe.plots import plot_bench, plot_learning_curves, plot_timeline, read_jsonl


def make_run(path, label, losses):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"label": label}))
    lines = [json.dumps({"kind": "iter", "iteration": 1, "epoch": 1, "loss": 2.0, "lr": 0.1})]
    for i, loss in enumerate(losses):
        lines.append(json.dumps({"kind": "epoch", "epoch": i + 1, "iteration": 10 * (i + 1),
                                 "train_loss": loss, "train_acc": 0.5, "test_loss": loss,
                                 "test_acc": 0.5 + 0.1 * i, "lr": 0.1, "images_per_s": 100.0,
                                 "wall_time": 1.5 * (i + 1)}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"ep")  # torn tail
    return path


def assert_png(path):
    assert path.read_bytes()[:4] == b"\x89PNG"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_learning_curves(tmp_path):
    a = make_run(tmp_path / "a", "BP", [1.0, 0.5, 0.2])
    b = make_run(tmp_path / "b", "DDG K=2", [1.1, "nan", 0.3])
    assert len(read_jsonl(a / "metrics.jsonl")) == 4
    assert_png(plot_learning_curves([a, b], tmp_path / "out" / "curves.png", title="t"))


def test_timeline(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = []
    for rank in range(2):
        for m in range(4):
            base = 100.0 * rank + m * 0.01
            records.append({"stage": rank, "op": "F", "minibatch": m, "start": base,
                            "end": base + 0.004, "rank": rank})
            records.append({"stage": rank, "op": "B", "minibatch": m, "start": base + 0.004,
                            "end": base + 0.009, "rank": rank})
    (run / "timeline.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert_png(plot_timeline(run))
    assert (run / "timeline.png").exists()


def test_bench_chart(tmp_path):
    rows = [{"name": "bp-1t", "ratio_median": 1.0, "ratio_min": 1.0, "ratio_max": 1.0},
            {"name": "ddg-graph", "ratio_median": 1.8, "ratio_min": 1.7, "ratio_max": 1.9}]
    assert_png(plot_bench(rows, tmp_path / "bench.png", title="bench"))


def test_not_a_run_dir(tmp_path):
    with pytest.raises(UsageError, match="has no metrics.jsonl with epoch records"):
        plot_learning_curves([tmp_path], tmp_path / "x.png")
    with pytest.raises(UsageError, match="has no timeline.jsonl; train with --timeline"):
        plot_timeline(tmp_path)
