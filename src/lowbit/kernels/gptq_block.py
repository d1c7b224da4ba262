"""GPTQ's inner loop over one block of columns: a Triton kernel and the torch reference it is tested against.

Within a block of B columns (GPTQ's lazy batch, B = 128), column i is rounded onto its group's grid and its
error is fed forward to the columns after it through row i of the inverse Hessian's Cholesky factor. The
columns depend on each other, the rows do not, so one Triton program owns a tile of rows and keeps its
[BLOCK_N, B] slice of the block in registers for the whole sweep: one launch per block instead of ~10
launches per column. Tensors in, tensors out; the algorithm around it is `lowbit.quant.gptq`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

BLOCK_N = 16  # rows per program (tuned on an H100, benchmarks/quantize_speed.py)
NUM_WARPS = 4


def gptq_block(W1: Tensor, Hinv1: Tensor, scales: Tensor, zeros: Tensor, col_group: Tensor, maxq: int,
               codes: Tensor, err: Tensor) -> None:
    """Quantize the columns of one block in order, writing codes and scaled errors (Triton on CUDA).

    W1      float32 [N, B]  the block's columns (any strides; read only)
    Hinv1   float32 [B, B]  the block's diagonal block of the upper Cholesky factor of H^-1 (any strides)
    scales  float32 [G, N]  fp16-exact scales; zeros float32 [G, N] integer-valued zero points
    col_group int32 [B]     group of each column of the block
    codes   uint8   [B, N]  out: clamp(round(w / s) + z, 0, maxq), w the error-updated column
    err     float32 [B, N]  out: (w - q) / Hinv1[i, i], the error the next columns absorb
    """
    if W1.is_cuda and _have_triton():
        gptq_block_triton(W1, Hinv1, scales, zeros, col_group, maxq, codes, err)
    else:
        gptq_block_reference(W1, Hinv1, scales, zeros, col_group, maxq, codes, err)


def gptq_block_reference(W1: Tensor, Hinv1: Tensor, scales: Tensor, zeros: Tensor, col_group: Tensor,
                         maxq: int, codes: Tensor, err: Tensor) -> None:
    """The IST-DASLab column loop, in torch (shapes as `gptq_block`)."""
    W1 = W1.clone()
    groups = col_group.tolist()
    for i in range(W1.shape[1]):
        s, z = scales[groups[i]], zeros[groups[i]]
        w = W1[:, i]
        c = torch.clamp(torch.round(w / s) + z, 0, maxq)
        e = (w - (c - z) * s) / Hinv1[i, i]
        W1[:, i:].addr_(e, Hinv1[i, i:], alpha=-1)
        codes[i] = c.to(torch.uint8)
        err[i] = e


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def gptq_block_triton(W1: Tensor, Hinv1: Tensor, scales: Tensor, zeros: Tensor, col_group: Tensor, maxq: int,
                      codes: Tensor, err: Tensor, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS) -> None:
    """`gptq_block` as one Triton launch (also on CPU, when TRITON_INTERPRET=1 was set before triton's import).

    Triton is imported here, not at module import, so that CPU-only runs never need it.
    """
    import triton

    from lowbit.kernels.gptq_block_kernel import gptq_block_kernel

    n, b = W1.shape
    for name, t in (("scales", scales), ("zeros", zeros), ("col_group", col_group), ("codes", codes), ("err", err)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    gptq_block_kernel[(triton.cdiv(n, block_n),)](
        W1, W1.stride(0), W1.stride(1), Hinv1, Hinv1.stride(0), Hinv1.stride(1),
        scales, zeros, col_group, codes, err, n, b, float(maxq),
        BLOCK_N=block_n, BLOCK_B=max(16, triton.next_power_of_2(b)), num_warps=num_warps,
    )
