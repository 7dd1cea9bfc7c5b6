"""Tracing a plain nn.Module into blocks: a skip connection that crosses blocks carries its
gradient, BatchNorm follows train()/eval(), the user's module is left as it was, and models
that cannot be traced, bad split points and bad examples are refused with the fix."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.balance.shared import shared_tensors
from ddgpipe.errors import UsageError
from ddgpipe.methods import DNI
from ddgpipe.trace import as_pipeline_blocks, repeated_blocks


class Layer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear, self.norm, self.drop = nn.Linear(width, width), nn.BatchNorm1d(width), \
            nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.norm(self.linear(x))))


class SkipNet(nn.Module):
    """The stem's output is added again after the last layer: a value that a later block
    needs, carrying a gradient, crosses every block between."""

    def __init__(self, width=8, layers=3, classes=4):
        super().__init__()
        self.stem = nn.Linear(6, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(layers))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        stem = self.stem(x)
        h = stem
        for layer in self.layers:
            h = layer(h)
        return self.head(F.dropout(h + stem, 0.1, self.training))


def skipnet(seed=0):
    torch.manual_seed(seed)
    return SkipNet().train()


def inputs(rows=5, seed=1):
    return torch.randn(rows, 6, generator=torch.Generator().manual_seed(seed))


def test_blocks_are_the_model_bitwise_forward_backward_and_statistics():
    model = skipnet()
    blocks = as_pipeline_blocks(model, inputs())
    assert len(blocks) == 5  # stem, three layers, head
    assert {id(p) for p in blocks.parameters()} == {id(p) for p in model.parameters()}
    twin = skipnet()
    x, y = inputs(7, seed=2), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    torch.manual_seed(3)
    F.cross_entropy(blocks(x), y).backward()
    torch.manual_seed(3)
    F.cross_entropy(twin(x), y).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name  # running statistics moved alike
    model.eval()
    twin.eval()
    assert torch.equal(blocks(x), twin(x))  # running statistics, no dropout


def test_the_skip_travels_forward_through_every_middle_block():
    blocks = as_pipeline_blocks(skipnet(), inputs())
    stem = blocks[0](inputs())
    out = stem
    for block in list(blocks)[1:-1]:
        out = block(*out) if isinstance(out, tuple) else block(out)
        assert isinstance(out, tuple) and len(out) == 2  # the stem's output, the hidden
        assert out[0] is stem and out[1].requires_grad


def test_tracing_leaves_the_model_its_forwards_modes_and_the_random_state():
    model = skipnet()
    model.layers[1].eval()
    modes = [m.training for m in model.modules()]
    state = torch.get_rng_state()
    as_pipeline_blocks(model, inputs())
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_named_split_points_begin_blocks():
    model = skipnet()
    blocks = as_pipeline_blocks(model, inputs(), split_points=["layers.1", "head"])
    assert len(blocks) == 3
    names = [{n.removeprefix("stage.") for n, _ in b.named_parameters()} for b in blocks]
    assert "layers.0.linear.weight" in names[0] and "layers.1.linear.weight" in names[1]
    assert names[2] == {"head.weight", "head.bias"}


def test_a_sequential_is_returned_as_it_is():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    assert as_pipeline_blocks(model, inputs()) is model


def test_default_candidates_are_the_largest_module_list():
    assert repeated_blocks(skipnet()) == ["layers.0", "layers.1", "layers.2"]


def test_a_copy_of_the_blocks_switches_with_its_own_owners():
    model = skipnet()
    blocks = as_pipeline_blocks(model, inputs())
    copied = copy.deepcopy(blocks)
    assert not any(p is q for p, q in zip(blocks.parameters(), copied.parameters()))
    x = inputs()
    model.eval()
    copied.eval()
    assert torch.equal(copied(x), blocks(x))
    copied.train()  # the copy's own modules: the original stays in evaluation
    assert torch.equal(blocks(x), blocks(x))
    assert not torch.equal(copied(x), copied(x))


def test_ddg_trains_the_traced_blocks_and_one_stage_is_backprop():
    data = [(inputs(8, seed=s), torch.arange(8) % 4) for s in range(4)]

    def run(pipe):
        torch.manual_seed(4)
        losses = [pipe.step(x, y, F.cross_entropy).item() for x, y in data]
        getattr(pipe, "drain", lambda: None)()
        return losses

    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    bp_model, ddg_model = skipnet(), skipnet()
    bp = run(ddgpipe.Backprop(as_pipeline_blocks(bp_model, inputs()), sgd))
    ddg = run(ddgpipe.DDG(as_pipeline_blocks(ddg_model, inputs()), 1, sgd))
    assert bp == ddg
    assert all(torch.equal(a, b) for a, b in zip(bp_model.state_dict().values(),
                                                 ddg_model.state_dict().values()))
    staged = skipnet()
    run(ddgpipe.DDG(as_pipeline_blocks(staged, inputs()), 3, sgd))
    assert not torch.equal(staged.stem.weight, skipnet().stem.weight)  # trained in place


def test_ddg_takes_the_module_itself_as_it_takes_its_traced_blocks():
    """DDG traces a module that is not a Sequential on its sample_input: the same steps as on
    the blocks traced by hand, bitwise, the trained weights in the user's model."""
    data = [(inputs(8, seed=s), torch.arange(8) % 4) for s in range(4)]
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    runs = []
    for direct in (True, False):
        model = skipnet()
        given = model if direct else as_pipeline_blocks(model, inputs())
        pipe = ddgpipe.DDG(given, 3, sgd, sample_input=inputs() if direct else None,
                           split=[2, 4], executor="reference")
        assert pipe.model is given
        torch.manual_seed(4)
        losses = [pipe.step(x, y, F.cross_entropy).item() for x, y in data]
        pipe.drain()
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].values(), runs[1][1].values()))
    assert not torch.equal(runs[0][1]["stem.weight"], skipnet().stem.weight)


def test_split_points_name_where_the_stages_of_ddg_and_dni_begin():
    for method in (ddgpipe.DDG, DNI):
        model = skipnet()
        pipe = method(model, 2, lambda ps: torch.optim.SGD(ps, lr=0.1), sample_input=inputs(),
                      split_points=["layers.2"], executor="reference")
        assert pipe.split == [1]
        held = {id(p) for p in pipe.stages[1].module.parameters()}
        assert {id(p) for p in model.layers[2].parameters()} <= held
        assert {id(p) for p in model.layers[1].parameters()}.isdisjoint(held)


@pytest.mark.parametrize("stash", ["recompute"])  # a replay through the traced graph
def test_a_traced_model_resumes_from_a_checkpoint_bitwise(stash):
    """Stash modes, compensation and checkpoints work on the traced blocks: a run stopped
    after four clocks and resumed from its checkpoint (in-flight work, random streams and
    all) ends with the uninterrupted run's weights and buffers."""
    data = [(inputs(8, seed=s), torch.arange(8) % 4) for s in range(7)]

    def pipe():
        return ddgpipe.DDG(skipnet(), 3, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                           sample_input=inputs(), split=[2, 4], stash=stash,
                           compensation="lwp", executor="reference")

    uninterrupted, first = pipe(), pipe()
    torch.manual_seed(4)  # stage 0 draws from the caller's stream
    for x, y in data:
        uninterrupted.step(x, y, F.cross_entropy)
    uninterrupted.drain()
    torch.manual_seed(4)
    for x, y in data[:4]:
        first.step(x, y, F.cross_entropy)
    saved = io.BytesIO()
    torch.save(first.checkpoint_state(), saved)
    resumed = pipe()
    resumed.load_checkpoint_state(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for x, y in data[4:]:
        resumed.step(x, y, F.cross_entropy)
    resumed.drain()
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert not torch.equal(expected["stem.weight"], skipnet().stem.weight)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: no single graph
            return self.a(x)
        return self.b(x)


def test_a_model_that_cannot_be_traced_is_refused_with_the_fix():
    with pytest.raises(UsageError, match=r"torch.export cannot trace Branchy .*split_points"
                                         r".*nn.Sequential"):
        as_pipeline_blocks(Branchy(), inputs())


def test_bad_split_points_and_examples_are_refused():
    with pytest.raises(UsageError, match=r"'layers.9' is not a submodule of SkipNet"):
        as_pipeline_blocks(skipnet(), inputs(), split_points=["layers.9"])
    with pytest.raises(UsageError, match=r"a list of submodule names"):
        as_pipeline_blocks(skipnet(), inputs(), split_points="head")
    with pytest.raises(UsageError, match=r"batch of 2 or more"):
        as_pipeline_blocks(skipnet(), inputs(1))
    with pytest.raises(UsageError, match=r"tensor or a tuple of tensors"):
        as_pipeline_blocks(skipnet(), [inputs()])


class Tied(nn.Module):
    """An embedding whose weight is also the output projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.out(h)


def test_a_tied_weight_stays_one_parameter_and_is_reported():
    model = Tied()
    blocks = as_pipeline_blocks(model, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    shared = shared_tensors(blocks)
    assert [s.blocks for s in shared] == [(0, 3)]
    assert all(blocks[i].get_parameter(n) is model.embed.weight for i, n in shared[0].uses)
    assert "parameter block 0 'stage.embed.weight'" in str(shared[0])


def test_moving_the_blocks_moves_the_tensors_their_graphs_create():
    """torch.export writes the tracing device into ``arange`` and ``.to``; a block makes
    them where its input is (the meta device stands for a GPU)."""

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            x = x + torch.arange(x.shape[1], device=x.device).to(torch.device("cpu"))
            for layer in self.layers:
                x = layer(x)
            return x

    blocks = as_pipeline_blocks(Positional(), torch.randn(2, 4)).to("meta")
    out = blocks(torch.randn(3, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 4)


class TorchEncoder(nn.Module):
    """torch's own nn.TransformerEncoder (its evaluation mode without gradients takes a fused
    path), embedding and a head tied to it: a user's model nobody here wrote."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def test_torchs_transformer_encoder_is_cut_and_trains_with_its_tie():
    torch.manual_seed(0)
    model = TorchEncoder()
    tokens = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(2))
    loss = lambda out, y: F.cross_entropy(out.reshape(-1, 32), y.reshape(-1))  # noqa: E731
    with ddgpipe.DDG(model, 2, lambda ps: torch.optim.AdamW(ps, lr=1e-2), sample_input=tokens,
                     microbatches=2, executor="reference") as pipe:
        losses = [pipe.step(tokens, tokens, loss).item() for _ in range(6)]
        pipe.drain()
    assert len(pipe.stages) == 2 and losses[-1] < losses[0], losses
    assert model.head.weight is model.emb.weight
