"""HuggingFace causal LMs handed to DDG as they are (no wrapper; traced by the method): a
Llama and a Qwen2 from tiny configs with tied embeddings and attention dropout. K = 1 is
backprop bitwise, the threads and the processes equal the reference bitwise, K = 4 trains,
the trained weights are in the user's own model object, and save_pretrained then
from_pretrained gives its logits. All of it runs in the quick suite (CI): both families at
K = 2 and 4, on threads and on processes."""

import pytest
import torch
from torch import nn

import ddgpipe
from ddgpipe.errors import UsageError
from ddgpipe.losses import token_cross_entropy
from ddgpipe.runtime.launch import run_workers

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 8


def causal_lm(family: str, layers: int = 2, seed: int = 0) -> nn.Module:
    """A random-init ``family`` causal LM (hidden 32, tied embeddings, attention dropout
    0.1), in training mode."""
    make, config_class = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                          "qwen2": (transformers.Qwen2ForCausalLM,
                                    transformers.Qwen2Config)}[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4 * T, tie_word_embeddings=True,
                          attention_dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return make(config).train()


def pattern_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A repeating sequence a model learns in a few steps: next-token inputs and targets."""
    rows = [(torch.arange(T + 1) * 5 + 3 * r) % VOCAB for r in range(4)]
    ids = torch.stack(rows)
    return [(ids[:, :-1], ids[:, 1:])] * n


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def train(pipe, data, rank: int = 0, world: int = 1) -> list:
    """Feed ``data`` as rank ``rank`` of ``world`` does (seeded), drain; the losses seen."""
    torch.manual_seed(9)
    first, last = rank == 0, rank == world - 1
    losses = []
    for x, y in data:
        loss = pipe.step(x if first else None, y if last else None,
                         token_cross_entropy if last else None)
        losses.append(None if loss is None else loss.item())
    pipe.drain()
    return losses


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_stage_is_backprop_bitwise(family):
    """DDG at K = 1 on the traced model takes the steps Backprop takes on the model itself."""
    data = pattern_batches(3)
    runs = []
    for make in (lambda m: ddgpipe.Backprop(m, adamw), lambda m: ddgpipe.DDG(m, 1, adamw)):
        model = causal_lm(family)
        pipe = make(model)
        assert pipe.model is model
        runs.append((train(pipe, data), state(model)))
    assert runs[0][0] == runs[1][0]
    assert_same_state(runs[0][1], runs[1][1])


@pytest.mark.parametrize("family,stages", [("llama", 4), ("qwen2", 2)])
def test_threads_equal_the_reference_and_the_users_model_trains(family, stages, tmp_path,
                                                                 one_thread):
    """The threaded executor equals the reference bitwise; the loss falls; the user's model
    object holds the trained weights, and a save_pretrained/from_pretrained round trip keeps
    its logits."""
    data = pattern_batches(25)
    runs = []
    for executor in ("reference", "threads"):
        model = causal_lm(family)
        before = list(model.parameters())
        with ddgpipe.DDG(model, stages, adamw, executor=executor, threads=1) as pipe:
            assert pipe.model is model and len(pipe.split) == stages - 1
            runs.append((train(pipe, data), model))
        assert all(p is q for p, q in zip(before, model.parameters()))
    (losses, model), (thread_losses, threaded) = runs
    assert losses == thread_losses
    assert_same_state(state(model), state(threaded))
    assert losses[0] > 3.5 and max(losses[-3:]) < 0.6 * losses[0], losses
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    ids = data[0][0]
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def process_worker(rank: int, world: int, family: str, clocks: int) -> dict:
    """One rank of a process pipeline of the traced model; after drain its model object
    holds every stage's trained weights."""
    model = causal_lm(family)
    pipe = ddgpipe.DDG(model, world, adamw, peer_timeout_s=60)
    assert pipe.executor_kind == "processes"
    losses = train(pipe, pattern_batches(clocks), rank, world)
    return {"losses": losses, "state": {k: v.numpy() for k, v in state(model).items()}}


@pytest.mark.parametrize("family,stages", [("llama", 2), ("qwen2", 4)])  # K = 4: ~40 s
def test_processes_equal_the_reference_and_gather_the_model(family, stages, one_thread):
    """Every rank's model holds the whole trained model after drain, bitwise the
    reference's; the last rank's losses are the reference's."""
    clocks = 6
    results = run_workers(process_worker, stages, (family, clocks), timeout_s=300, threads=1)
    model = causal_lm(family)
    losses = train(ddgpipe.DDG(model, stages, adamw, executor="reference"),
                   pattern_batches(clocks))
    assert results[-1]["losses"] == losses
    expected = state(model)
    for result in results:
        assert_same_state({k: torch.from_numpy(v) for k, v in result["state"].items()},
                          expected)


def test_bad_models_and_split_points_are_refused_with_the_fix():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -self.linear(x)  # data-dependent

    with pytest.raises(UsageError, match="pass sample_input="):
        ddgpipe.DDG(Opaque(), 2, adamw)
    with pytest.raises(UsageError, match="cannot trace Opaque.*name the split points"):
        ddgpipe.DDG(Opaque(), 1, adamw, sample_input=torch.randn(3, 4))
    with pytest.raises(UsageError, match="makes 3 stages, but 2"):
        ddgpipe.DDG(causal_lm("llama"), 2, adamw, split_points=["model.layers.0",
                                                                "model.layers.1"])
    with pytest.raises(UsageError, match="pass split="):
        ddgpipe.DDG(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2, adamw,
                    split_points=["1"])
