"""The process runtime's messages: what travels between two ranks, and how it is framed.

An activation goes k -> k+1 as a small header (shape, dtype, fp16 overflow report) then the
payload; a gradient goes k+1 -> k with the activation's shape, so it needs no header (under
fp16 a one-number message with the loss scale follows it). Each kind of traffic has its tag.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TAGS", "MAX_DIMS", "HEADER_LEN", "END_OF_STREAM", "DTYPES", "make_header",
           "read_header"]

TAGS = {"act_header": 1, "act": 2, "grad": 3, "eval_header": 4, "eval": 5, "scale": 6}
MAX_DIMS = 7
HEADER_LEN = MAX_DIMS + 3  # ndim, up to 7 sizes, dtype code, overflow report
END_OF_STREAM = -1  # a header with this ndim says no more forwards will come
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_header(out: Tensor | None, overflow: bool = False) -> Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    if out is None:
        header[0] = END_OF_STREAM
        return header
    if out.dim() > MAX_DIMS:
        raise ValueError(f"activations of {out.dim()} dimensions are not supported "
                         f"(at most {MAX_DIMS})")
    if out.dtype not in DTYPES:
        raise ValueError(f"activations of dtype {out.dtype} are not supported; a stage "
                         f"must output one of {', '.join(map(str, DTYPES))}")
    header[0] = out.dim()
    header[1: 1 + out.dim()] = torch.tensor(out.shape)
    header[MAX_DIMS + 1] = DTYPES.index(out.dtype)
    header[MAX_DIMS + 2] = int(overflow)
    return header

def read_header(header: Tensor) -> tuple[int, tuple[int, ...], torch.dtype, bool]:
    values = header.tolist()
    ndim = values[0]
    return ndim, tuple(values[1: 1 + max(ndim, 0)]), DTYPES[values[MAX_DIMS + 1]], \
        bool(values[MAX_DIMS + 2])
