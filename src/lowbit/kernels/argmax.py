"""Greedy decoding's argmax over the vocabulary, one program a row.

Why: torch's argmax over one row of 32000 logits is a single 10.7 us reduce in a 7B decode step on an H100
(0.6 % of the step); here a row's chunks stream through one program with their loads pipelined. Ties go to
the smallest index, as torch's; a NaN counts as +inf (torch picks the NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096  # logits a loop step


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, V, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int32)
    for start in tl.range(0, V, BLOCK, num_stages=3):
        v = tl.load(x_ptr + row.to(tl.int64) * stride_x + start + offs, mask=start + offs < V,
                    other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)
        m = tl.max(v, axis=0)
        i = tl.argmax(v, axis=0, tie_break_left=True)
        take = m > best  # strictly: an earlier chunk keeps a tie
        best_i = tl.where(take, start + i, best_i)
        best = tl.where(take, m, best)
    tl.store(out_ptr + row, best_i.to(tl.int64))


def argmax(x: Tensor) -> Tensor:
    """x [..., V] (any float dtype, last dim contiguous) -> int64 [...]: the index of each row's largest value."""
    if x.shape[-1] == 0:
        raise ValueError("argmax of an empty last dimension")
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.int64, device=x.device)
    if rows.shape[0]:
        _argmax_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), BLOCK=BLOCK, num_warps=8)
    return out.view(x.shape[:-1])
