"""`dense_gemv_add`: out += x @ W.T + b for a float weight (an nn.Linear's [N, K]) and one row of x, on CUDA
cores, each K split adding its float32 sums with atomics.

The float model's counterpart of `qmatmul`'s adding GEMV: with it, one-row decode of an unquantized model can
add every linear into a float32 buffer (`Block.forward_into`: the residual add and the split-K finish fall
away) and launch under PDL, where cuBLAS does neither. The torch reference is `x.float() @ W.float().T`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.splitk import sm_count
from lowbit.kernels.sync import pdl_launch, release_next, wait_previous


@triton.jit
def _tile(w_ptr, rows, r_ok, cols, k_end, stride_wn, EVEN: tl.constexpr):
    """W[rows, cols] as loaded ([BN, BK], zeros outside N x [.., k_end))."""
    ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=r_ok[:, None] & (cols < k_end)[None, :], other=0.0)


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, chunks_per_split,
                       BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                       PDL: tl.constexpr):
    """y[rows] += sum over this program's K range of W[rows, k] x[k]; grid (row tiles, K splits). Each step
    loads the next step's [BN, BK] tile before its own math (a warp reads whole 16-byte vectors along a row),
    and the first tile is loaded before waiting for the kernel before (weights are nobody's output). EVEN: N
    and K are whole tiles and splits, no masks."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    r_ok = rows < N
    kk = tl.max_contiguous(tl.multiple_of(tl.arange(0, BK), BK), BK)
    k_start = pid_k * chunks_per_split * BK
    k_end = tl.minimum(k_start + chunks_per_split * BK, K)
    w = _tile(w_ptr, rows, r_ok, k_start + kk, k_end, stride_wn, EVEN)
    release_next(PDL)
    wait_previous(PDL)
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(k_start, k_end, BK):
        cols = k0 + kk
        if EVEN:  # the last step re-reads its own tile (unused) rather than past the split
            nxt = _tile(w_ptr, rows, r_ok, tl.minimum(k0 + BK, k_end - BK) + kk, k_end, stride_wn, EVEN)
            x = tl.load(x_ptr + cols).to(tl.float32)
        else:  # past the split: all masked
            nxt = _tile(w_ptr, rows, r_ok, k0 + BK + kk, k_end, stride_wn, EVEN)
            x = tl.load(x_ptr + cols, mask=cols < k_end, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = nxt
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:  # added once, by the first K split
        out += tl.where(pid_k == 0, tl.load(b_ptr + rows, mask=r_ok, other=0.0).to(tl.float32), 0.0)
    tl.atomic_add(y_ptr + rows, out, mask=r_ok, sem="relaxed")


def dense_gemv_add(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, BN: int = 4, BK: int = 512,
                   num_warps: int = 4, waves: int = 8, split: int | None = None) -> Tensor:
    """out (float32, contiguous, N values) += x (one row of K values) @ weight.T + bias; -> out.

    weight: [N, K] with unit stride along K (an nn.Linear's); any float dtype, as x. waves: about this many
    programs per SM (K splits are added while the row tiles leave SMs short); split: that many K splits.
    The default tile had the lowest sum over a 7B block's four fp16 launches in benchmarks/dense_sweep.py
    (H200, 2026-12-06: 102.4 µs against 108.3 for BN 16, BK 256, 4 waves, and 128.2 for cuBLAS and its add)."""
    n, k = weight.shape
    if x.numel() != k or out.numel() != n or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"dense_gemv_add: x needs {k} values (got {x.numel()}) and out {n} contiguous float32 "
                         f"values (got {out.numel()} {out.dtype})")
    if weight.stride(1) != 1:
        raise ValueError("dense_gemv_add: the weight needs unit stride along K")
    x = x.reshape(k)
    x = x if x.is_contiguous() else x.contiguous()
    tiles, chunks = triton.cdiv(n, BN), triton.cdiv(k, BK)
    if split is None:
        split = max(1, min(chunks, round(waves * sm_count(x.device) / tiles)))
    per = triton.cdiv(chunks, split)
    splits = triton.cdiv(chunks, per)
    even = n % BN == 0 and k % (per * BK) == 0
    _dense_gemv_kernel[(tiles, splits)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0), per,
        BN=BN, BK=BK, HAS_BIAS=bias is not None, EVEN=even, num_warps=num_warps, **pdl_launch(x))
    return out
