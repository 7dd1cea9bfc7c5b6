"""A run's folder is never taken over silently: a rerun into a finished run is refused and
deletes nothing, --overwrite is explicit, the default folder never collides, bench outputs get
the same care, and experiments still train over their own unfinished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddgpipe.cli import main
from ddgpipe.errors import UsageError
from ddgpipe.experiments.common import _train_one, read_outcome
from ddgpipe.training import TrainConfig
from ddgpipe.training.run_dir import check_out_dir, default_run_dir, prepare_out_dir

MLP = ["train", "--model", "mlp", "--data", "digits", "--batch-size", "64", "--threads", "1",
       "--no-progress"]
DDG_RUN = [*MLP, "--method", "ddg", "--stages", "2", "--iterations", "20",
           "--checkpoint-every", "10", "--executor", "reference", "--balance", "params"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddgpipe: error: "), err
    return lines[0]


def test_a_rerun_into_a_finished_run_is_refused_and_deletes_nothing(tmp_path, capsys):
    run = tmp_path / "a"
    assert main([*DDG_RUN, "--out", str(run)]) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert {"checkpoints/iter-000010/manifest.json", "checkpoints/iter-000020/manifest.json",
            "metrics.jsonl", "model.pt", "model.safetensors"} <= set(before)
    assert main([*MLP, "--method", "bp", "--iterations", "5", "--out", str(run)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{run} is not empty" in line
    assert f"--resume {run}" in line and "--out" in line and "--overwrite" in line
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_and_keeps_foreign_files(tmp_path, capsys):
    run = tmp_path / "a"
    assert main([*DDG_RUN, "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    assert main([*MLP, "--method", "bp", "--iterations", "5", "--out", str(run),
                 "--overwrite"]) == 0
    capsys.readouterr()
    assert not (run / "checkpoints").exists()  # the old run's sets are gone with it
    assert json.loads((run / "config.json").read_text())["method"] == "bp"
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main([*DDG_RUN, "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "--overwrite replaces a run and --resume continues one" in \
        one_line_error(capsys.readouterr().err)


def test_the_default_folder_names_the_model_and_never_collides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main([*MLP, "--method", "bp", "--iterations", "3"]) == 0
    capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["mlp-bp-k1-s0", "mlp-bp-k1-s0-2"]
    (tmp_path / "runs" / "mlp-bp-k1-s0-3").mkdir()  # an empty folder is free
    assert default_run_dir("mlp", "bp", 1, 0) == Path("runs/mlp-bp-k1-s0-3")
    assert default_run_dir("gpt-2", "bp", 1, 0) == Path("runs/gpt-2-bp-k1-s0")


def test_bench_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    (tmp_path / "bench.json").write_text("{}")
    args = ["bench", "--model", "resnet20", "--image-size", "8", "--batch-size", "16",
            "--steps", "2", "--warmup", "1", "--rounds", "1", "--configs", "bp-1t",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "is not empty" in line and "--overwrite" in line and "--resume" not in line
    assert (tmp_path / "bench.json").read_text() == "{}"
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["name"] == "bp-1t"


def test_prepare_out_dir_clears_only_what_it_owns(tmp_path):
    (tmp_path / "bench.json").write_text("old")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty"):
        prepare_out_dir(tmp_path, owned=("bench.json",), resumable=False)
    prepare_out_dir(tmp_path, overwrite=True, owned=("bench.json",), resumable=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    check_out_dir(tmp_path, resuming=True)  # a resumed run continues in its own folder
    check_out_dir(tmp_path / "missing")


def test_an_experiment_trains_over_its_own_unfinished_run(tmp_path):
    run = tmp_path / "run"
    config = TrainConfig.from_flat(model="mlp", method="ddg", stages=2, iterations=4, batch_size=64,
                         out=str(run), executor="reference", threads=1, progress=False,
                         balance="params")
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # a run stopped before its first record
    assert read_outcome(config) is None
    _train_one(config)
    assert read_outcome(config)["status"] == "finished"


def test_the_process_executor_refuses_before_spawning(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code = main([*MLP, "--method", "ddg", "--stages", "2", "--iterations", "4",
                 "--executor", "processes", "--timeout", "30", "--out", str(tmp_path)])
    assert code == 2 and "is not empty" in one_line_error(capsys.readouterr().err)
    assert (tmp_path / "config.json").read_text() == "{}"


def test_the_process_executor_trains_into_a_fresh_folder(tmp_path, capsys):
    """Only the reporter rank prepares the folder; the parent's check leaves it usable."""
    run = tmp_path / "p"
    assert main([*MLP, "--method", "ddg", "--stages", "2", "--iterations", "4",
                 "--executor", "processes", "--timeout", "60", "--balance", "params",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert torch.load(run / "model.pt", weights_only=True)
