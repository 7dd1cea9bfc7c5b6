"""HuggingFace causal LMs (GPT-2, Llama, Qwen2) built from tiny configs with dropout, split
by tracing with no wrapper code: the blocks are the user's model, bitwise — same logits in
evaluation and (under one seed) training, same gradients, the user's parameter objects —
and DDG trains them like backprop at K = 1."""

import copy
import functools
import math

import pytest
import torch

import ddgpipe
from ddgpipe.balance.shared import shared_tensors
from ddgpipe.losses import token_cross_entropy
from ddgpipe.trace import as_pipeline_blocks

transformers = pytest.importorskip("transformers")

VOCAB, T, LAYERS = 64, 12, 2
FAMILIES = ["gpt2", "llama", "qwen2"]


def causal_lm(family, tied=False, seed=0):
    """A random-init causal LM of ``family`` with dropout on (embeddings, attention and
    residuals for GPT-2; attention for Llama and Qwen2), in training mode."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=2 * T, n_embd=32,
                                         n_layer=LAYERS, n_head=4, tie_word_embeddings=tied,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        make, config_class = {"llama": (transformers.LlamaForCausalLM,
                                        transformers.LlamaConfig),
                              "qwen2": (transformers.Qwen2ForCausalLM,
                                        transformers.Qwen2Config)}[family]
        config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=LAYERS, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=2 * T,
                              tie_word_embeddings=tied, attention_dropout=0.1,
                              bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = make(config)
    return model.train()


def token_ids(shape=(4, T), seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    return model(ids, use_cache=False).logits


@functools.cache
def _traced_once(family, tied):
    model = causal_lm(family, tied)
    return model, as_pipeline_blocks(model, token_ids())


def traced_copy(family, tied=False):
    """A fresh (model, blocks) pair: one deep copy of both, so the copied blocks hold the
    copied model's parameters (tracing once per family keeps the tests fast)."""
    return copy.deepcopy(_traced_once(family, tied))


QUICK = [("gpt2", True), ("llama", True)]  # ~5 s of tracing each; the rest run as slow


@pytest.fixture(params=[pytest.param((f, tied), marks=() if (f, tied) in QUICK else
                                     pytest.mark.slow)
                        for f in FAMILIES for tied in (False, True)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def traced(request):
    return traced_copy(*request.param)


@pytest.mark.parametrize("copied", [False, True], ids=["traced", "deep-copied"])
def test_blocks_hold_the_users_parameter_objects(traced, copied):
    model, blocks = traced if copied else _traced_once(model_family(traced[0]),
                                                       traced[0].config.tie_word_embeddings)
    assert len(blocks) == LAYERS + 2  # embeddings, each layer, head
    held = {id(p) for p in blocks.parameters()}
    assert held == {id(p) for p in model.parameters()}
    head = model.get_output_embeddings().weight
    assert any(p is head for p in blocks[-1].parameters())


def model_family(model):
    return {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2"}[type(model).__name__]


def test_logits_equal_the_models_bitwise_in_eval_and_in_training(traced):
    model, blocks = traced
    ids = token_ids((3, T - 2), seed=2)  # another batch size and length than the trace's
    model.eval()
    try:
        assert torch.equal(blocks(ids), logits(model, ids))
    finally:
        model.train()
    torch.manual_seed(5)
    through_blocks = blocks(ids)
    torch.manual_seed(5)
    through_model = logits(model, ids)
    torch.manual_seed(6)
    other_seed = blocks(ids)
    assert torch.equal(through_blocks, through_model)
    assert not torch.equal(through_blocks, other_seed)  # dropout draws, and follows the seed


def test_gradients_equal_the_models_bitwise(traced):
    model, blocks = traced
    ids, targets = token_ids(seed=3), token_ids(seed=4)
    grads = []
    for forward in (blocks, lambda x: logits(model, x)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        token_cross_entropy(forward(ids), targets).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_users_eval_switches_the_blocks_dropout_off(traced):
    model, blocks = traced
    ids = token_ids(seed=5)
    model.eval()
    try:
        assert torch.equal(blocks(ids), blocks(ids))
    finally:
        model.train()
    assert not torch.equal(blocks(ids), blocks(ids))
    blocks.eval()  # the blocks' own switch reaches the user's dropout modules too
    try:
        assert torch.equal(blocks(ids), logits(model.eval(), ids))
    finally:
        blocks.train()
        model.train()


def test_a_tied_embedding_is_one_parameter_of_the_first_and_last_block(traced):
    model, blocks = traced
    shared = shared_tensors(blocks)
    if not model.config.tie_word_embeddings:
        assert shared == []
        return
    assert len(shared) == 1 and shared[0].kind == "parameter"
    assert shared[0].blocks == (0, len(blocks) - 1)
    embedding = model.get_input_embeddings().weight
    assert embedding is model.get_output_embeddings().weight
    for index, name in shared[0].uses:
        assert blocks[index].get_parameter(name) is embedding


def train(pipe, batches):
    losses = [pipe.step(x, y, token_cross_entropy).item() for x, y in batches]
    if hasattr(pipe, "drain"):
        pipe.drain()
    return losses


def batches(n, seed=11):
    ids = [token_ids((4, T + 1), seed=seed + i) for i in range(n)]
    return [(b[:, :-1], b[:, 1:]) for b in ids]


def adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def states(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # untied Llama and Qwen2: tests/methods/test_hf_interop.py, direct form
@pytest.mark.parametrize("family,tied", [("gpt2", False), ("llama", True)])
def test_one_stage_trains_the_users_model_as_backprop_does_bitwise(family, tied):
    """DDG at K = 1 on the blocks = Backprop on the blocks = a hand-written loop on the plain
    model; afterwards the user's own model holds the trained weights."""
    data = batches(3)
    by_hand = causal_lm(family, tied)
    optimizer = adamw(list(by_hand.parameters()))
    hand_losses = []
    torch.manual_seed(9)  # the same dropout draws in all three runs
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        loss = token_cross_entropy(logits(by_hand, x), y)
        loss.backward()
        optimizer.step()
        hand_losses.append(loss.item())
    results = []
    for make in (lambda b: ddgpipe.Backprop(b, adamw), lambda b: ddgpipe.DDG(b, 1, adamw)):
        model, blocks = traced_copy(family, tied)
        before = [p for p in model.parameters()]
        torch.manual_seed(9)
        results.append((train(make(blocks), data), model))
        assert all(p is q for p, q in zip(before, model.parameters()))
    for losses, model in results:
        assert losses == hand_losses
        trained, expected = states(model), states(by_hand)
        assert trained.keys() == expected.keys()
        assert all(torch.equal(trained[k], expected[k]) for k in expected)


@pytest.mark.slow  # Llama and Qwen2 at K = 2 and 4: tests/methods/test_hf_interop.py
@pytest.mark.parametrize("family", ["gpt2"])
def test_two_stages_train_the_users_model_in_place(family, tmp_path):
    """DDG at K = 2 on the traced blocks learns a repeating sequence, the threads equal the
    reference bitwise, and save_pretrained then from_pretrained gives the trained logits."""
    pattern = (torch.arange(T + 1) * 5 % VOCAB).repeat(8, 1)
    data = [(pattern[:, :-1], pattern[:, 1:])] * 30
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference on one thread, as each stage thread runs
    try:
        for executor in ("reference", "threads"):
            model, blocks = traced_copy(family)
            with ddgpipe.DDG(blocks, 2, adamw, split=[2], executor=executor, threads=1) as pipe:
                runs.append((train(pipe, data), model))
    finally:
        torch.set_num_threads(threads)
    (losses, model), (thread_losses, threaded) = runs
    assert losses == thread_losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), threaded.parameters()))
    assert losses[0] > 3.5 and max(losses[-3:]) < 2.0, losses
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, pattern), logits(model, pattern))


def test_a_tied_embedding_across_two_stages_is_a_tie_whose_copies_stay_equal():
    """The tracer's blocks hold the tied embedding in the first and the last stage; DDG
    keeps the two copies bitwise equal, with microbatches too."""
    model, blocks = traced_copy("llama", tied=True)
    with ddgpipe.DDG(blocks, 2, adamw, split=[2], executor="reference") as pipe:
        losses = train(pipe, batches(4))
    assert all(math.isfinite(loss) for loss in losses)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(embedding, head)
    assert not torch.equal(embedding, causal_lm("llama", tied=True).lm_head.weight)
    model, blocks = traced_copy("llama", tied=True)
    with ddgpipe.DDG(blocks, 2, adamw, split=[2], microbatches=2,
                     executor="reference") as pipe:
        losses = train(pipe, batches(4))
    assert all(math.isfinite(loss) for loss in losses)
    assert torch.equal(model.get_input_embeddings().weight,
                       model.get_output_embeddings().weight)
