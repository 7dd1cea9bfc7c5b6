"""Language models through `ddgpipe train`: one stage is backprop bitwise, the threads are the
reference bitwise with dropout on, held-out loss in bits per byte every N iterations, and bad
input ends in one line with exit code 2."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ddgpipe.cli import main

TINY = ["--model", "gpt-2", "--width", "32", "--heads", "2", "--context", "32",
        "--batch-size", "4", "--iterations", "12", "--eval-every", "6", "--no-progress",
        "--threads", "1"]


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def numbers(run_dir):
    """Every record without the timings, which no two runs share."""
    timing = ("wall_time", "samples_per_s", "tokens_per_s", "images_per_s")
    return [{k: v for k, v in r.items() if k not in timing}
            for kind in ("eval", "epoch") for r in records(run_dir, kind)]


def train(tmp_path, name, *flags):
    assert main(["train", *TINY, *flags, "--out", str(tmp_path / name)]) == 0
    return tmp_path / name


def test_eval_records_hold_the_held_out_loss_in_bits_per_byte(tmp_path, capsys):
    run = train(tmp_path, "bp")
    evals = records(run, "eval")
    assert [r["iteration"] for r in evals] == [6, 12]
    assert [r["tokens"] for r in evals] == [6 * 4 * 32, 12 * 4 * 32]
    for r in evals:
        assert abs(r["val_bits_per_byte"] - r["val_loss"] / 0.6931471805599453) < 1e-9
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    config = json.loads((run / "config.json").read_text())
    assert config["data_info"]["corpus"] == "shakespeare" and config["optimizer"] == "adamw"
    assert config["clip_grad"] == 1.0 and config["warmup_iters"] == 1
    out = capsys.readouterr().out
    assert "bits/byte" in out and "tokens/s" in out


def test_one_stage_is_backprop_bitwise(tmp_path, capsys):
    bp = train(tmp_path, "bp", "--method", "bp")
    ddg = train(tmp_path, "ddg1", "--method", "ddg", "--stages", "1")
    assert numbers(ddg) == numbers(bp)


@pytest.mark.parametrize("optimizer", ["adamw", "nadam", "muon"])
def test_threads_are_the_reference_bitwise_with_dropout(tmp_path, capsys, optimizer):
    common = ["--method", "ddg", "--stages", "3", "--optimizer", optimizer, "--dropout", "0.2"]
    ref = train(tmp_path, "ref", *common, "--executor", "reference")
    threads = train(tmp_path, "threads", *common, "--executor", "threads")
    assert numbers(threads) == numbers(ref)
    assert json.loads((threads / "config.json").read_text())["split"] == \
        json.loads((ref / "config.json").read_text())["split"]


@pytest.mark.parametrize("flags,says", [
    (["--method", "dni", "--stages", "2", "--tie-embeddings"],
     "DNI has no rule for a parameter used by two stages"),
    (["--method", "ddg", "--stages", "5"], "cannot cut a model of 4 blocks into 5 stages; pass "
                                           "--stages 4 or fewer"),
    (["--data", "digits"], "--model gpt-2 is a language model of token windows: use it with "
                           "--data shakespeare"),
    (["--context", "0"], "context must be >= 1 (got 0); pass --context 1 or more"),
    (["--width", "30", "--heads", "4"], "the width 30 does not split into 4 heads"),
    (["--optimizer", "sgd", "--beta1", "0.9"], "--beta1/--beta2 are for adamw, nadam and muon"),
])
def test_bad_input_ends_in_one_line_with_exit_code_2(tmp_path, capsys, flags, says):
    assert main(["train", *TINY, *flags, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_text_data_needs_a_language_model(tmp_path, capsys):
    assert main(["train", "--data", "shakespeare", "--out", str(tmp_path / "r")]) == 2
    assert "--data shakespeare holds windows of byte tokens" in capsys.readouterr().err


def test_microbatched_ddg_trains_a_language_model(tmp_path, capsys):
    """`--microbatches 2`: a short run under one executor, its setting recorded."""
    short = ["--iterations", "4", "--eval-every", "2", "--balance", "params"]
    run = train(tmp_path, "m2", "--method", "ddg", "--stages", "2", "--microbatches", "2",
                "--executor", "reference", *short)
    assert json.loads((run / "config.json").read_text())["microbatches"] == 2
    assert "DDG K=2 M=2" in capsys.readouterr().out
    evals = [r["val_loss"] for r in records(run, "eval")]
    assert len(evals) == 2 and evals[1] < evals[0]


@pytest.mark.slow
def test_microbatched_ddg_threads_match_the_reference(tmp_path):
    flags = ["--method", "ddg", "--stages", "2", "--microbatches", "2"]
    reference = train(tmp_path, "reference", *flags, "--executor", "reference")
    threads = train(tmp_path, "threads", *flags, "--executor", "threads")
    assert numbers(threads) == numbers(reference)


@pytest.mark.parametrize("flags, says", [
    (["--method", "bp", "--microbatches", "2"], "--method bp computes the whole minibatch"),
    (["--method", "ddg", "--stages", "2", "--microbatches", "3"],
     "--batch-size 4 does not split into --microbatches 3"),
    (["--method", "ddg", "--stages", "2", "--microbatches", "2", "--compensation",
      "accumulate"], "accumulate duplicates microbatching"),
])
def test_microbatches_refuse_what_they_do_not_apply_to(flags, says, tmp_path, capsys):
    assert main(["train", *TINY, *flags, "--out", str(tmp_path / "run")]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.slow
def test_tied_embeddings_train_across_stages_the_same_on_every_in_process_executor(tmp_path):
    """The first and the last stage each hold a copy of the tied embedding; the copies
    stay bitwise equal, and the threads are the reference bitwise."""
    common = ["--method", "ddg", "--stages", "2", "--tie-embeddings"]
    ref = train(tmp_path, "ref", *common, "--executor", "reference")
    threads = train(tmp_path, "threads", *common, "--executor", "threads")
    assert numbers(threads) == numbers(ref)
    weights = load_file(str(threads / "model.safetensors"))
    last = max(int(k.split(".")[0]) for k in weights)
    assert torch.equal(weights["0.tokens.weight"], weights[f"{last}.proj.weight"])
