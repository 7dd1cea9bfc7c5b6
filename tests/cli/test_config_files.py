"""--config FILE (TOML or JSON) under the flags, --print-config, and the one table of settings:
a config file trains exactly as the same flags would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddgpipe.cli import build_parser, main
from ddgpipe.cli.config_files import setting_actions
from ddgpipe.training.config import flat_keys

MLP = ["train", "--model", "mlp", "--data", "digits", "--threads", "1", "--no-progress",
       "--balance", "params"]
RUN_FLAGS = ["--method", "ddg", "--stages", "2", "--iterations", "24", "--batch-size", "32",
             "--lr", "0.05", "--executor", "reference", "--eval-every", "8", "--seed", "3"]
TOML = """\
# a run's settings; --lr on the command line overrides the file's
model = "mlp"
data = "digits"
method = "ddg"
stages = 2
iterations = 24
batch_size = 32
lr = 0.2
executor = "reference"
eval_every = 8
seed = 3
threads = 1
progress = false
balance = "params"
"""
TIMES = ("wall_time", "samples_per_s", "images_per_s")


def train_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["train"]


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def saved_config(run: Path) -> dict:
    ignored = ("out", "label", "machine", "split_tuning")
    return {k: v for k, v in json.loads((run / "config.json").read_text()).items()
            if k not in ignored}


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddgpipe: error: "), err
    return lines[0]


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    dests = set(setting_actions(train_parser()))
    assert set(flat_keys()) - dests == {"compensation_options"}  # one flag per option
    from ddgpipe.core.compensation import OPTION_TABLE

    not_keys = dests - set(flat_keys()) - {o.name for o in OPTION_TABLE}
    assert not_keys == {"preset"}


@pytest.mark.slow
def test_a_toml_config_with_a_flag_over_it_trains_as_the_flags_alone(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(TOML)
    assert main(["train", "--config", str(config), "--lr", "0.05",
                 "--out", str(tmp_path / "file")]) == 0
    assert main([*MLP, *RUN_FLAGS, "--out", str(tmp_path / "flags")]) == 0
    assert saved_config(tmp_path / "file") == saved_config(tmp_path / "flags")
    assert saved_config(tmp_path / "file")["lr"] == 0.05
    assert records(tmp_path / "file") == records(tmp_path / "flags")
    assert len(records(tmp_path / "file")) == 4  # three evaluations and the epoch


def test_print_config_is_a_config_file_that_reads_back(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(TOML)
    assert main(["train", "--config", str(config), "--compensation", "dc",
                 "--dc-lambda", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# ddgpipe train settings (TOML)")
    assert "lr = 0.2\n" in printed and "# clip_grad = (unset)\n" in printed
    assert "compensation_options = {dc_lambda = 0.5}" in printed
    again = tmp_path / "printed.toml"
    again.write_text(printed)
    assert main(["train", "--config", str(again), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_flags_alone_print_as_they_train(capsys):
    assert main([*MLP, *RUN_FLAGS, "--out", "x", "--print-config"]) == 0
    flags = capsys.readouterr().out
    assert 'method = "ddg"\n' in flags and "iterations = 24\n" in flags
    assert "progress = false\n" in flags and "threads = 1\n" in flags


@pytest.mark.slow
def test_a_runs_own_config_json_is_a_config(tmp_path, capsys):
    assert main([*MLP, *RUN_FLAGS, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--config", str(tmp_path / "a/config.json"),
                 "--out", str(tmp_path / "b")]) == 0
    assert saved_config(tmp_path / "a") == saved_config(tmp_path / "b")
    assert records(tmp_path / "a") == records(tmp_path / "b")


@pytest.mark.parametrize("text, says", [
    ('lr = 0.1\nlearning_rate = 0.2\n', "unknown setting 'learning_rate' in {file}"),
    ('lr = "fast"\n', "lr = 'fast' in {file}: expected a float"),
    ('optimizer = "adagrad"\n', "optimizer = 'adagrad' in {file}: expected one of sgd"),
    ('nesterov = 1\n', "nesterov = 1 in {file}: expected true or false"),
    ('split = [2, "x"]\n', "expected a list of ints"),
    ('lr = \n', "{file} is not valid TOML"),
    ('compensation_options = {dc_lambdaa = 1}\n', "unknown compensation option 'dc_lambdaa'"),
])
def test_a_bad_file_is_refused_in_one_line_naming_key_and_file(text, says, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(text)
    assert main(["train", "--config", str(config)]) == 2
    assert says.format(file=config) in one_line_error(capsys.readouterr().err)


def test_a_missing_file_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read --config" in one_line_error(capsys.readouterr().err)


def test_json_and_toml_say_the_same(tmp_path, capsys):
    toml, as_json = tmp_path / "run.toml", tmp_path / "run.json"
    toml.write_text(TOML)
    as_json.write_text(json.dumps({"placement": {"executor": "reference", "threads": 1},
                                   **{k: v for k, v in [
                                       ("model", "mlp"), ("data", "digits"), ("method", "ddg"),
                                       ("stages", 2), ("iterations", 24), ("batch_size", 32),
                                       ("lr", 0.2), ("eval_every", 8), ("seed", 3),
                                       ("progress", False), ("balance", "params")]}}))
    printed = []
    for path in (toml, as_json):
        assert main(["train", "--config", str(path), "--print-config"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]


def test_a_preset_in_a_file_yields_to_the_files_settings(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('preset = "asyncpp"\nmodel = "gpt-2"\nlr = 0.01\n')
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert 'optimizer = "nadam"\n' in printed and "lr = 0.01\n" in printed
