"""The split-K tensor-core kernel for weights in the "slots" layout: y = x @ W for a few to a few hundred rows of x.

Words are unpacked in registers into float16 B tiles (exact subnormals for float16 x), the K loop optionally
split over programs while the output tiles alone leave SMs idle. Dispatch: `lowbit.kernels.qmatmul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import SLOT, fields_per_word
from lowbit.kernels.slots import field_int, launch_args
from lowbit.kernels.splitk import finish_tile, grouped_tile, sm_count, split_k
from lowbit.kernels.sync import pdl_launch, release_next, wait_previous


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _x_tile(x_ptr, offs_m, m_ok, stride_xm, row, perm_ptr, K, HAS_PERM: tl.constexpr):
    """x[offs_m, rows] [BM, len(row)] in x's dtype for packed rows `row` (gathered through perm)."""
    if HAS_PERM:
        src = tl.load(perm_ptr + row)
        ok = src >= 0
    else:
        src = row
        ok = row < K
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=m_ok[:, None] & ok[None, :], other=0.0)


@triton.jit
def _dot_kernel(x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr,
                M, N, K, stride_xm, num_blocks, blocks_per_split,
                BITS: tl.constexpr, FIELDS: tl.constexpr, GROUP_SLOTS: tl.constexpr,
                HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                GROUP_M: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, IEEE: tl.constexpr,
                SUB: tl.constexpr, PER_SLOT: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr):
    """y = x W on tensor cores, the K loop optionally split over grid axis 1 (split > 1 needs M <= BM).

    SUB (fp16 x): B is the exact fp16 subnormal (q - z) * 2^-24 and the scale is applied per group to
    the fp32 dot. PER_SLOT: one K=16 dot per field on the [16, BN] word tile; else one dot per group on
    the group's [GROUP_SLOTS*16, BN] rows (a 3D unpack, reshaped). SWAP (SUB or PER_SLOT): y^T = W^T x^T, the weight
    the dot's first operand, which Hopper's wgmma reads from registers (as unpacked), x^T from shared memory;
    without it the unpacked weight goes through shared memory, and a tile of 16 rows runs on mma.sync."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    RG: tl.constexpr = 16 * GROUP_SLOTS
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    wi, ji, ri = tl.arange(0, 16), tl.arange(0, GROUP_SLOTS), tl.arange(0, RG)
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), tl.float32)
    release_next(PDL)
    wait_previous(PDL)
    b_start = pid_k * blocks_per_split
    for i in range(0, blocks_per_split):
        blk = tl.minimum(b_start + i, num_blocks - 1)  # past the end: block re-read, all of x masked
        m_live = offs_m < tl.where(b_start + i < num_blocks, M, 0)
        if SWAP:  # [BN, 16] word tiles
            wptr = (blk * 16 + wi[None, :]) * N + offs_n[:, None]
            w_ok = n_ok[:, None]
        else:  # [16, BN]
            wptr = (blk * 16 + wi[:, None]) * N + offs_n[None, :]
            w_ok = n_ok[None, :]
        words = tl.load(qw_ptr + wptr, mask=w_ok, other=0)
        hi = words
        if BITS == 3:
            hi = tl.load(qh_ptr + wptr, mask=w_ok, other=0).to(tl.int32)
        for a in tl.static_range(FIELDS // GROUP_SLOTS):
            r = blk * (FIELDS // GROUP_SLOTS) + a  # this run's scales/zeros row
            s = tl.load(s_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + r * N + offs_n, mask=n_ok, other=0.0)
            base = blk * (16 * FIELDS) + a * RG  # the group's fields are consecutive packed rows
            if PER_SLOT:  # SUB: the group's dots summed in `part`, scaled once; else (q - z) * s into acc
                if SUB:
                    zc = z.to(tl.int16).to(tl.float16, bitcast=True)
                else:
                    zc = z.to(tl.float32) + 8388608.0
                zc = zc[:, None] if SWAP else zc[None, :]
                sc = s[:, None] if SWAP else s[None, :]
                for jj in tl.static_range(GROUP_SLOTS):
                    xj = _x_tile(x_ptr, offs_m, m_live, stride_xm, base + jj * 16 + wi, perm_ptr, K, HAS_PERM)
                    qj = field_int(words, hi, a * GROUP_SLOTS + jj, BITS)
                    if SUB:
                        wj = qj.to(tl.int16).to(tl.float16, bitcast=True) - zc
                    else:  # 2^23 + q exactly, less 2^23 + z: (q - z) * s rounded once to x's dtype
                        wj = (((qj | 0x4B000000).to(tl.float32, bitcast=True) - zc) * sc).to(x_ptr.dtype.element_ty)
                    if SWAP:
                        lhs, rhs = wj, tl.trans(xj)
                    else:
                        lhs, rhs = xj, wj
                    if not SUB:
                        acc = _mma(lhs, rhs, acc, IEEE)
                    elif jj == 0:
                        part = tl.dot(lhs, rhs)
                    else:
                        part = tl.dot(lhs, rhs, part)
                if SUB:
                    acc += part * (sc * 16777216.0)
            elif SWAP:  # [BN, GROUP_SLOTS, 16]: column n, row 16j+w
                xg = _x_tile(x_ptr, offs_m, m_live, stride_xm, base + ri, perm_ptr, K, HAS_PERM)
                j = (a * GROUP_SLOTS + ji)[None, :, None]
                q = (words[:, None, :] >> (j * LO)) & ((1 << LO) - 1)
                if BITS == 3:
                    q |= ((hi[:, None, :] >> j) & 1) << 2
                zs = z.to(tl.int16).to(tl.float16, bitcast=True)[:, None, None]
                w = tl.reshape(q.to(tl.int16).to(tl.float16, bitcast=True) - zs, (BN, RG))
                acc += tl.dot(w, tl.trans(xg)) * (s * 16777216.0)[:, None]
            else:
                xg = _x_tile(x_ptr, offs_m, m_live, stride_xm, base + ri, perm_ptr, K, HAS_PERM)
                j = (a * GROUP_SLOTS + ji)[:, None, None]
                q = (words[None, :, :] >> (j * LO)) & ((1 << LO) - 1)  # [GROUP_SLOTS, 16, BN]: row 16j+w
                if BITS == 3:
                    q |= ((hi[None, :, :] >> j) & 1) << 2
                if SUB:
                    zs = z.to(tl.int16).to(tl.float16, bitcast=True)[None, None, :]
                    w = tl.reshape(q.to(tl.int16).to(tl.float16, bitcast=True) - zs, (RG, BN))
                    acc += tl.dot(xg, w) * (s * 16777216.0)[None, :]
                else:
                    f = (q | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q, exact
                    w = (f - (z.to(tl.float32) + 8388608.0)[None, None, :]) * s[None, None, :]
                    acc = _mma(xg, tl.reshape(w.to(x_ptr.dtype.element_ty), (RG, BN)), acc, IEEE)
    if SWAP:
        acc = tl.trans(acc)
    finish_tile(acc, offs_m, offs_n, n_ok, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, pid_k, tl.num_programs(1),
            HAS_BIAS, SP, FENCE, False, b_ptr, False)


def dot(x2, w, bias, y, BM=None, BN=None, split=None, num_warps=None, num_stages=None, denorm=True,
        per_slot=None, waves=2, swap=False):
    """Launch the tensor-core kernel: y [M, N] = x2 [M, K] @ W + bias (keywords: `_dot_kernel`'s tiles; waves:
    programs per SM that split-K aims for; per_slot: PER_SLOT, by default for float16 x and BM <= 64; swap:
    SWAP, with float16 x or per_slot)."""
    m, n, fields = x2.shape[0], w.out_features, fields_per_word(w.bits)
    num_blocks = w.padded_rows // (SLOT * fields)
    BM = BM or (16 if m <= 16 else 64 if m <= 64 else 128)
    BN = BN or (64 if BM == 64 else 128)
    num_warps = num_warps or (2 if BM <= 64 else 8)
    num_stages = num_stages or (2 if BM <= 16 or (BM >= 128 and fields == 16) else 3)  # 2/3-bit: smem
    tiles = triton.cdiv(m, BM) * triton.cdiv(n, BN)
    if split is None:  # split K only while the output tiles leave SMs idle, and only for one M tile
        split = 1 if m > BM else split_k(num_blocks, tiles, waves * sm_count(x2.device))[0]
    if split > 1 and m > BM:
        raise ValueError(f"split-K needs M <= BM, got M={m}, BM={BM}")
    splits, per = (split, -(-num_blocks // split))
    qh, perm, b, fence = launch_args(w, x2, bias)
    sub = x2.dtype == torch.float16 and denorm
    per_slot = sub and BM <= 64 if per_slot is None else per_slot
    if swap and not (sub or per_slot):
        raise ValueError("swap with other than float16 x (or with denorm=False) needs per_slot")
    ws = torch.empty(splits * m * n if splits > 1 else 1, dtype=torch.float32, device=x2.device)
    _dot_kernel[(tiles, splits)](
        x2, w.qweight, qh, w.scales, w.zeros, perm, b, ws, w.locks, y,
        m, n, w.in_features, x2.stride(0), num_blocks, per,
        BITS=w.bits, FIELDS=fields, GROUP_SLOTS=w.group_slots, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, BM=BM, BN=BN, GROUP_M=8, SP=triton.next_power_of_2(splits), FENCE=fence,
        IEEE=x2.dtype == torch.float32, SUB=sub, PER_SLOT=per_slot, SWAP=swap,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(x2))
