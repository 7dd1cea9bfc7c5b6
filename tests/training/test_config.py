"""TrainConfig's tree and its flat form (config.json): what one writes, the other reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ddgpipe.cli.main import build_parser
from ddgpipe.core.compensation import OPTION_TABLE, CompensationSpec
from ddgpipe.errors import UsageError
from ddgpipe.training import TrainConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_flat_form_round_trips():
    config = TrainConfig.from_flat(method="ddg", stages=3, executor="reference", threads=1,
                                   timeout_s=5.0, split=[2, 5], compensation="pipemare-lr",
                                   compensation_options={"pipemare_anneal": 7})
    assert config.placement.executor == "reference" and config.placement.peer_timeout_s == 5.0
    assert config.compensation == CompensationSpec(("pipemare-lr",), {"pipemare_anneal": 7})
    flat = config.to_dict()
    assert flat["timeout_s"] == 5.0 and flat["compensation"] == "pipemare-lr"
    assert TrainConfig.from_dict(json.loads(json.dumps(flat))) == config


def test_the_nested_form_reads_as_the_flat_one():
    config = TrainConfig.from_flat(method="ddg", stages=2, replicas=2, compensation="sc,lwp")
    nested = json.loads(json.dumps(dataclasses.asdict(config)))
    assert "placement" in nested
    assert TrainConfig.from_dict(nested) == config


def test_a_committed_config_json_reads_back():
    """Every setting of a committed run reads back as it was recorded (except what the run
    derived: the label shown, the cut and the executor used)."""
    saved = json.loads(next((DOCS / "lm").rglob("config.json")).read_text())
    flat = TrainConfig.from_dict(saved).to_dict()
    derived = {"label", "split", "executor"}
    assert {k: saved[k] for k in saved if k in flat and k not in derived} == \
        {k: flat[k] for k in saved if k in flat and k not in derived}
    assert "resume" in flat and "machine" not in flat


def test_an_unknown_setting_is_refused_as_python_refuses_a_keyword():
    with pytest.raises(TypeError, match="unexpected keyword argument 'executer'"):
        TrainConfig.from_flat(executer="threads")


def test_compensation_names_and_options_are_checked_when_parsed():
    with pytest.raises(UsageError, match="unknown compensation 'sd'"):
        TrainConfig.from_flat(method="ddg", stages=2, compensation="sd")
    with pytest.raises(UsageError, match="option dc_decay only applies to compensation dc"):
        TrainConfig.from_flat(method="ddg", stages=2, compensation="sc",
                              compensation_options={"dc_decay": 0.5})


def test_every_compensation_option_is_a_train_flag():
    args = build_parser().parse_args(["train", *[a for o in OPTION_TABLE for a in
                                                  (o.flag, "3")]])
    assert all(getattr(args, o.name) == 3 for o in OPTION_TABLE)
