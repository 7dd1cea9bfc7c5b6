"""model.safetensors beside model.pt: the user's model loads it with safetensors'
load_file and load_state_dict and gives the same logits, tied embeddings included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddgpipe.cli import main
from ddgpipe.models import GPTConfig, build_model, gpt
from ddgpipe.training.run_dir import save_safetensors

GPT = ["train", "--model", "gpt-2", "--width", "32", "--heads", "2", "--context", "16",
       "--batch-size", "4", "--iterations", "4", "--no-progress", "--threads", "1"]


def test_a_tied_state_dict_is_saved_whole(tmp_path):
    torch.manual_seed(0)
    model = gpt(GPTConfig(layers=2, width=32, heads=2, context=16, tie_embeddings=True)).eval()
    state = model.state_dict()
    with pytest.raises(RuntimeError, match="share memory"):  # why the copy is needed
        save_file(state, str(tmp_path / "plain.safetensors"))
    save_safetensors(state, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    loaded = gpt(GPTConfig(layers=2, width=32, heads=2, context=16, tie_embeddings=True)).eval()
    loaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(ids), model(ids))
    assert loaded[0].tokens.weight is loaded[-1].proj.weight  # still tied after loading


@pytest.mark.parametrize("flags", [
    ["--method", "bp", "--tie-embeddings"],
    ["--method", "ddg", "--stages", "2", "--executor", "threads", "--balance", "params"],
], ids=["bp-tied", "ddg-threads"])
def test_a_run_writes_safetensors_with_the_same_logits(flags, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*GPT, *flags, "--out", str(run)]) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    options = {"width": 32, "heads": 2, "context": 16, "dropout": 0.0,
               "tie_embeddings": config["tie_embeddings"]}
    from_pt = build_model("gpt-2", num_classes=256, **options).eval()
    from_pt.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    from_st = build_model("gpt-2", num_classes=256, **options).eval()
    from_st.load_state_dict(load_file(str(run / "model.safetensors")))
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_st(ids), from_pt(ids))
