"""Float weights back from either kernel layout, and large-M matmuls through them: W [K, N] in input-channel
order (y = x @ W), a column slice at a time so a prefill never holds a whole float copy of a large weight.
Beyond a few hundred rows cuBLAS on a float W beats every in-register dequantizing kernel here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.layout import QWeight, fields_per_word


@triton.jit
def _rows_dequant(qw_ptr, qh_ptr, s_ptr, z_ptr, rows, offs_n, n_ok, N, BITS: tl.constexpr,
                  FIELDS: tl.constexpr, GROUP_SLOTS: tl.constexpr):
    """W[rows, offs_n] in float32, for any packed rows (each word is read once per field it holds)."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    within = rows % (16 * FIELDS)
    field = within // 16
    wptr = ((rows // (16 * FIELDS)) * 16 + within % 16)[:, None] * N + offs_n[None, :]
    q = (tl.load(qw_ptr + wptr, mask=n_ok[None, :], other=0) >> (field * LO)[:, None]) & ((1 << LO) - 1)
    if BITS == 3:
        h = tl.load(qh_ptr + wptr, mask=n_ok[None, :], other=0).to(tl.int32)
        q |= ((h >> field[:, None]) & 1) << 2
    sz = (rows // (16 * GROUP_SLOTS))[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptr + sz, mask=n_ok[None, :], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=n_ok[None, :], other=0.0).to(tl.float32)
    f = (q | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
    return (f - (z + 8388608.0)) * s


@triton.jit
def _dequant_kernel(qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, K, n0, n1,
                    BITS: tl.constexpr, FIELDS: tl.constexpr, GROUP_SLOTS: tl.constexpr, HAS_PERM: tl.constexpr,
                    BK: tl.constexpr, BN: tl.constexpr):
    """W[:, n0:n1] [K, n1 - n0] in input-channel order (rows scattered back through perm)."""
    rows = tl.program_id(0) * BK + tl.arange(0, BK)
    offs_n = n0 + tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < n1
    w = _rows_dequant(qw_ptr, qh_ptr, s_ptr, z_ptr, rows, offs_n, n_ok, N, BITS, FIELDS, GROUP_SLOTS)
    dst = tl.load(perm_ptr + rows) if HAS_PERM else rows
    mask = ((dst >= 0) & (dst < K))[:, None] & n_ok[None, :]
    out = dst[:, None] * (n1 - n0) + (offs_n - n0)[None, :]
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma_dequant_kernel(qw_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, slabs, n0, n1, SPR: tl.constexpr,
                        HAS_PERM: tl.constexpr, CTB: tl.constexpr):
    """W[:, n0:n1] in input-channel order from the "mma" layout (n0, n1 multiples of 16). Program (slab, block)
    reads the words of CTB column tiles of one 64-row slab as they are stored (coalesced, each once), unpacks
    their 8 codes in registers (word [g, 4t + p] holds rows 16t + 4p + h, columns 8ab + g at nibble
    ab + 2(h // 2) + 4(h % 2)), and writes a [64, 16 CTB] tile of W whose rows are contiguous. A 7B gate/up
    weight on an H100: 83.8 us (2.7 TB/s moved) against 191.9 with one gathered load a value (2026-12-07,
    benchmarks/dequant_speed.py)."""
    slab = tl.program_id(0)
    ct = n0 // 16 + tl.program_id(1) * CTB + tl.arange(0, CTB)[:, None, None]
    g = tl.arange(0, 8)[None, :, None]
    tp = tl.arange(0, 16)[None, None, :]
    ok = ct < n1 // 16
    words = tl.load(qw_ptr + (ct * slabs + slab).to(tl.int64) * 128 + g * 16 + tp, mask=ok, other=0)
    h = tl.arange(0, 4)[None, None, None, :, None]
    ab = tl.arange(0, 2)[None, None, None, None, :]
    q = (words[:, :, :, None, None] >> (4 * (ab + 2 * (h // 2) + 4 * (h % 2)))) & 15  # [CTB, 8, 16, 4, 2]
    meta = (slab // SPR) * N + ct[:, :, :, None, None] * 16 + 2 * g[:, :, :, None, None] + ab
    ok5 = ok[:, :, :, None, None]
    s = tl.load(s_ptr + meta, mask=ok5, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + meta, mask=ok5, other=0).to(tl.float32)
    v = ((q.to(tl.float32) - z) * s).to(w_ptr.dtype.element_ty)
    v = tl.reshape(tl.permute(v, (2, 3, 0, 4, 1)), (64, CTB * 16))  # [16t + 4p + h, 16 ct + 8 ab + g]
    k = slab * 64 + tl.arange(0, 64)[:, None]
    n = n0 + tl.program_id(1) * (CTB * 16) + tl.arange(0, CTB * 16)[None, :]
    dst = tl.load(perm_ptr + k) if HAS_PERM else k
    tl.store(w_ptr + dst * (n1 - n0) + (n - n0), v, mask=n < n1)


def dequantize(w: QWeight, dtype: torch.dtype = torch.float16, cols: tuple[int, int] | None = None,
               BK: int = 64, BN: int | None = None) -> Tensor:
    """-> W [K, N] (or its columns cols = (n0, n1)) in `dtype`, rows in input-channel order: y = x @ W."""
    n, k = w.out_features, w.in_features
    n0, n1 = cols or (0, n)
    out = torch.empty(k, n1 - n0, dtype=dtype, device=w.qweight.device)
    if w.layout == "mma":  # a 64-row slab by BN columns a program
        BN = BN or 128
        grid = (k // 64, triton.cdiv(n1 - n0, BN))
        _mma_dequant_kernel[grid](w.qweight, w.scales, w.zeros, w.perm if w.perm is not None else w.locks, out, n,
                                  k // 64, n0, n1, SPR=w.slabs_per_run, HAS_PERM=w.perm is not None, CTB=BN // 16,
                                  num_warps=4)
        return out
    BN = BN or 128
    perm = w.perm if w.perm is not None else w.slot_group
    qh = w.qhigh if w.qhigh is not None else w.qweight
    grid = (triton.cdiv(w.padded_rows, BK), triton.cdiv(n1 - n0, BN))
    _dequant_kernel[grid](w.qweight, qh, w.scales, w.zeros, perm, out, n, k, n0, n1,
                          BITS=w.bits, FIELDS=fields_per_word(w.bits), GROUP_SLOTS=w.group_slots,
                          HAS_PERM=w.perm is not None, BK=BK, BN=BN, num_warps=4)
    return out


DEQUANT_WORKSPACE = 64 << 20  # bytes of float weight the large-M path holds at once (it goes slice by slice)


def dequant_matmul(x2: Tensor, w: QWeight, bias: Tensor | None, y: Tensor, workspace: int = DEQUANT_WORKSPACE,
                   **config) -> None:
    """y = x2 @ W + bias through cuBLAS, dequantizing W a column slice at a time: a prefill's transient memory
    stays ~64 MB instead of a whole float copy of the largest weight (283 MB for 13B's fused gate/up)."""
    k, n = w.in_features, w.out_features
    step = max(128, workspace // (k * x2.element_size()) // 128 * 128)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        W = dequantize(w, x2.dtype, cols=(n0, n1), **config)
        if bias is None:
            torch.matmul(x2, W, out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1].to(x2.dtype), x2, W, out=y[:, n0:n1])
