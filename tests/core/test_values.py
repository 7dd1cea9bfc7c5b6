"""What a block may take and return: tensors or tuples of tensors, and one clear message naming
the block, what it gave and the rule when it breaks that."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddgpipe
from ddgpipe.core.values import CONTRACT, Blocks, handed_on, leaves
from ddgpipe.errors import UsageError
from tests import helpers


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x), None


class ReturnsDict(nn.Module):
    def forward(self, x):
        return {"h": x}


class NeedsMask(nn.Module):
    def forward(self, x, mask):
        return x * mask


sgd = helpers.sgd(lr=0.1, momentum=0.0, weight_decay=0.0)


def model_with(block, index=1):
    torch.manual_seed(0)
    blocks = [nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)]
    blocks[index] = block
    return nn.Sequential(*blocks)


@pytest.mark.parametrize("executor", ["reference", "threads"])
@pytest.mark.parametrize("block,says", [
    (ReturnsNone(), r"block 1 \(ReturnsNone\) returned a tuple of a tensor of shape \(5, 4\) "
                    r"\(torch.float32\), a NoneType"),
    (ReturnsDict(), r"block 1 \(ReturnsDict\) returned a dict"),
    (NeedsMask(), r"block 1 \(NeedsMask\) cannot take a tensor of shape \(5, 4\) "
                  r"\(torch.float32\) \(missing a required argument: 'mask'\)"),
])
def test_a_block_that_breaks_the_contract_is_named(executor, block, says):
    pipe = ddgpipe.DDG(model_with(block), 2, sgd, executor=executor, split=[1], threads=1,
                       peer_timeout_s=30)
    with pytest.raises(UsageError, match=says) as caught:
        pipe.step(torch.randn(5, 4), torch.randint(0, 2, (5,)), F.cross_entropy)
    assert CONTRACT in str(caught.value)
    pipe.close()


def test_an_input_that_is_not_tensors_is_refused_naming_the_rule():
    pipe = ddgpipe.DDG(model_with(nn.Linear(4, 4)), 2, sgd, executor="reference")
    with pytest.raises(UsageError, match=r"x must be a tensor or a tuple of tensors \(got a "
                                         r"dict\)"):
        pipe.step({"ids": torch.randn(5, 4)}, torch.randint(0, 2, (5,)), F.cross_entropy)


def test_a_tuple_is_passed_between_blocks_as_positional_arguments():
    class Split(nn.Module):
        def forward(self, x):
            return x, torch.ones_like(x)

    blocks = Blocks(OrderedDict([("0", Split()), ("1", NeedsMask())]))
    x = torch.randn(3, 2)
    assert torch.equal(blocks(x), x)
    one_tuple = Blocks(OrderedDict([("0", nn.Identity())]))
    assert one_tuple(x) is x


def test_marks_say_which_tensors_carry_gradients_back():
    w = torch.randn(3, requires_grad=True)
    ids = torch.tensor([1, 2, 3])
    out = (w * 2, ids, torch.ones(3))
    sent = handed_on(out)
    assert [t.requires_grad for t in sent] == [True, False, False]
    assert all(t.grad_fn is None for t in sent)  # detached from the sender's graph
    assert [t.requires_grad for t in handed_on(out, floating=True)] == [True, False, True]
    received = leaves(sent, grad=True)
    assert [t.requires_grad for t in received] == [True, False, False]
    assert not any(t.requires_grad for t in leaves(sent, grad=False))
