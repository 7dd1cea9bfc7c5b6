"""The process runtime's messages: what travels between two ranks, and how it is framed.

An activation (a tensor or a tuple of up to :data:`MAX_TENSORS` tensors) goes k -> k+1 as
one fixed-size header, then one message per tensor. The header says whether the stream
ended, whether the value is a tuple, the fp16 overflow report, and per tensor its shape,
dtype and mark (whether its gradient comes back). Gradients go k+1 -> k, one message per
marked tensor, with the shapes the header gave, so they need no header; under fp16 a
one-number message with the loss scale follows them. Each kind of traffic has its tag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ddgpipe.core.values import Value, tensors
from ddgpipe.errors import UsageError

__all__ = ["TAGS", "MAX_DIMS", "MAX_TENSORS", "HEADER_LEN", "DTYPES", "Spec", "Header",
           "make_header", "read_header", "to_wire", "from_wire"]

TAGS = {"act_header": 1, "act": 2, "grad": 3, "eval_header": 4, "eval": 5, "scale": 6}
MAX_DIMS = 7
MAX_TENSORS = 8
_PER_TENSOR = MAX_DIMS + 3  # ndim, up to 7 sizes, dtype code, mark
HEADER_LEN = 3 + MAX_TENSORS * _PER_TENSOR  # count (-1: end of stream), is tuple, overflow
END_OF_STREAM = -1
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@dataclass(frozen=True)
class Spec:
    """One tensor of an activation, as the header describes it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    marked: bool  # its gradient comes back


@dataclass(frozen=True)
class Header:
    specs: list[Spec]
    is_tuple: bool
    overflow: bool
    ended: bool = False  # no more forwards will come


def make_header(value: Value | None, overflow: bool = False) -> Tensor:
    """The header of ``value`` (None: the end of the stream)."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    if value is None:
        header[0] = END_OF_STREAM
        return header
    parts = tensors(value)
    if len(parts) > MAX_TENSORS:
        raise UsageError(f"a stage outputs {len(parts)} tensors; the process runtime carries "
                         f"at most {MAX_TENSORS} between stages: pack some of them together")
    header[0], header[1], header[2] = len(parts), int(isinstance(value, tuple)), int(overflow)
    for i, t in enumerate(parts):
        if t.dim() > MAX_DIMS:
            raise UsageError(f"a stage outputs a tensor of {t.dim()} dimensions; the process "
                             f"runtime carries at most {MAX_DIMS}: reshape it")
        if t.dtype not in DTYPES:
            raise UsageError(f"a stage outputs a tensor of dtype {t.dtype}; the process runtime "
                             f"carries {', '.join(map(str, DTYPES))}")
        at = 3 + i * _PER_TENSOR
        header[at] = t.dim()
        header[at + 1: at + 1 + t.dim()] = torch.tensor(t.shape)
        header[at + 1 + MAX_DIMS] = DTYPES.index(t.dtype)
        header[at + 2 + MAX_DIMS] = int(t.requires_grad)
    return header


def read_header(header: Tensor) -> Header:
    values = header.tolist()
    if values[0] == END_OF_STREAM:
        return Header([], False, False, ended=True)
    specs = []
    for i in range(values[0]):
        at = 3 + i * _PER_TENSOR
        ndim = values[at]
        specs.append(Spec(tuple(values[at + 1: at + 1 + ndim]), DTYPES[values[at + 1 + MAX_DIMS]],
                          bool(values[at + 2 + MAX_DIMS])))
    return Header(specs, bool(values[1]), bool(values[2]))


def to_wire(t: Tensor, wire: torch.device) -> Tensor:
    """``t`` as it is sent: on the wire's device, contiguous, bool as bytes (gloo has none)."""
    t = t.detach().to(wire).contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def from_wire(spec: Spec, wire: torch.device) -> tuple[Tensor, Tensor]:
    """A buffer to receive ``spec`` into, and the tensor it holds once received."""
    dtype = torch.uint8 if spec.dtype == torch.bool else spec.dtype
    buf = torch.empty(spec.shape, dtype=dtype, device=wire)
    return buf, buf.view(torch.bool) if spec.dtype == torch.bool else buf
