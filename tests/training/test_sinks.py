"""--log tensorboard,csv and train(callback=): every record of metrics.jsonl, as it holds it,
also after a resume (read back with TensorBoard's own reader)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ddgpipe.cli import main
from ddgpipe.errors import UsageError
from ddgpipe.training import TrainConfig, train
from ddgpipe.training.sinks import as_number, check_sinks

SETTINGS = dict(model="mlp", data="digits", method="ddg", stages=2, executor="reference",
                batch_size=32, iterations=30, lr=0.05, eval_every=10, log_every=4, threads=1,
                progress=False, balance="params", seed=1)
RUN = ["train", "--model", "mlp", "--data", "digits", "--method", "ddg", "--stages", "2",
       "--executor", "reference", "--batch-size", "32", "--iterations", "30", "--lr", "0.05",
       "--eval-every", "10", "--log-every", "4", "--threads", "1", "--no-progress",
       "--balance", "params", "--seed", "1", "--checkpoint-every", "5"]
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed")


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_csv_holds_the_records(run: Path) -> None:
    records = jsonl(run)
    for kind in {r["kind"] for r in records}:
        with (run / f"metrics-{kind}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        expected = [{k: "" if v is None else str(v) for k, v in r.items() if k != "kind"}
                    for r in records if r["kind"] == kind]
        assert rows == expected, kind


def assert_tensorboard_holds_the_records(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in jsonl(run):
        for key, value in r.items():
            if key not in ("kind", "iteration") and as_number(value) is not None:
                expected.setdefault(f"{r['kind']}/{key}", []).append(
                    (r["iteration"], float(np.float32(as_number(value)))))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == points, tag  # NaN never occurs in these runs, so == is exact


@needs_tensorboard
@pytest.mark.slow
def test_every_sink_and_the_callback_hold_the_records_of_metrics_jsonl(tmp_path):
    seen = []
    config = TrainConfig.from_flat(**SETTINGS, out=str(tmp_path / "run"),
                                   log=["tensorboard", "csv"])
    train(config, callback=lambda kind, values: seen.append({"kind": kind, **values}))
    records = jsonl(tmp_path / "run")
    assert seen == records
    assert [r["kind"] for r in records].count("iter") == 7 and len(records) == 11
    assert_csv_holds_the_records(tmp_path / "run")
    assert_tensorboard_holds_the_records(tmp_path / "run")


def test_the_callback_gets_the_records_without_an_output_folder():
    seen = []
    settings = SETTINGS | dict(iterations=8, eval_every=4, log_every=0)
    train(TrainConfig.from_flat(**settings), callback=lambda kind, values: seen.append(kind))
    assert seen == ["eval", "eval", "epoch"]


@needs_tensorboard
@pytest.mark.slow
def test_a_resumed_run_s_sinks_hold_its_records_once(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*RUN, "--out", str(run), "--log", "tensorboard,csv", "--stop-after", "13"]) == 0
    assert main(["train", "--resume", str(run)]) == 0  # the sinks come with the settings
    assert [r["iteration"] for r in jsonl(run) if r["kind"] == "iter"] == [4, 8, 12, 16, 20,
                                                                           24, 28]
    assert_csv_holds_the_records(run)
    assert_tensorboard_holds_the_records(run)
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file, rebuilt


def test_an_unknown_sink_is_refused(tmp_path, capsys):
    assert main([*RUN, "--out", str(tmp_path / "x"), "--log", "csv,wandb"]) == 2
    assert "unknown --log sink 'wandb'; choose from tensorboard, csv" in capsys.readouterr().err


def test_a_missing_tensorboard_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install ddgpipe\[tensorboard\]"):
        check_sinks(["tensorboard"])
    check_sinks(["csv"])  # CSV needs nothing
