"""The tile kernel for 4-bit weights in the "mma" layout (`lowbit.kernels.layout`): y = x @ W for tens to a few
hundred rows of x, through Triton's `tl.dot` (wgmma on Hopper).

Why a second kernel for the layout: `lowbit.kernels.mma` keeps x in registers, loaded by every lane for each
8-row tile, which pays at a few rows (decode) but not at 64 (one LLaMA-7B block of linears on an H100: 263 us,
against 167 for the "slots" layout's tile kernel). Here x^T comes in through shared memory and the unpacked
weight is the dot's first operand, which wgmma reads from registers (the "swap" of `lowbit.kernels.dot`).

Unpacking needs no permutation: a program loads [8 * CT, 16] words (row 8 ct + g: the lane group g of column
tile ct; element c = 4t + p), and nibble `layout.mma_nibble(h, ab)` of each word holds row 4c + h of the slab
for column 16 ct + 8 ab + g. So each (h, ab) is a [8 * CT, 16] tile of one half's columns, dotted with the rows
4c + h of x^T; the halves are interleaved back into column order at the end. Codes become exact float16 subnormals
(q - z) * 2^-24, the run's dots are summed in float32 and scaled once a run (as `dot`'s SUB path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.layout import QWeight
from lowbit.kernels.splitk import finish_tile, grouped_tile, sm_count, split_k
from lowbit.kernels.sync import interpreting, pdl_launch, release_next, wait_previous


@triton.jit
def _quarters(t):
    """[A, 64] -> its four [A, 16] column sets 4c + h, h = 0..3."""
    A: tl.constexpr = t.shape[0]
    e, o = tl.split(tl.reshape(t, (A, 32, 2)))  # h even / odd
    e0, e2 = tl.split(tl.reshape(e, (A, 16, 2)))
    o1, o3 = tl.split(tl.reshape(o, (A, 16, 2)))
    return e0, o1, e2, o3


@triton.jit
def _nibble_tile(words, zs, h: tl.constexpr, AB: tl.constexpr):
    """[8 * CT, 16] words -> the [8 * CT, 16] float16 tile (q - z) * 2^-24 of rows 4c + h, half AB."""
    q = (words >> (4 * (AB + 2 * (h // 2) + 4 * (h % 2)))) & 15
    return q.to(tl.int16).to(tl.float16, bitcast=True) - zs[:, None]


@triton.jit
def _slab_dots(words, xt, za, zb, part_a, part_b, FIRST: tl.constexpr):
    """The slab's dots added to part_a/part_b (FIRST: started afresh): four K=16 dots a half, on rows 4c + h of
    the word tile as it is loaded, x^T split into the matching rows. (One K=64 dot a half on the tile reshaped
    sent the unpacked tile through shared memory and lost at every M: 166 against 118 us a 7B block at 16 rows,
    237 against 206 at 64; benchmarks/results/gpu.md.)"""
    xs = _quarters(tl.trans(xt))
    for h in tl.static_range(4):
        x_h = tl.trans(xs[h])
        if FIRST and h == 0:
            part_a = tl.dot(_nibble_tile(words, za, h, 0), x_h)
            part_b = tl.dot(_nibble_tile(words, zb, h, 1), x_h)
        else:
            part_a = tl.dot(_nibble_tile(words, za, h, 0), x_h, part_a)
            part_b = tl.dot(_nibble_tile(words, zb, h, 1), x_h, part_b)
    return part_a, part_b


@triton.jit
def _mma_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr,
                    M, N, stride_xm, slabs, steps_per_split,
                    CT: tl.constexpr, SPR: tl.constexpr, BM: tl.constexpr, GROUP_M: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, PDL: tl.constexpr):
    """y = x W for [BM rows, 16 * CT columns] tiles, the K loop (runs of SPR slabs sharing scales) optionally
    split over grid axis 1 (then M <= BM)."""
    R: tl.constexpr = 8 * CT
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BM), N // (16 * CT), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    r = tl.arange(0, R)
    tile, g = pid_n * CT + r // 8, r % 8
    w_off = (tile * slabs).to(tl.int64)[:, None] * 128 + (g * 16)[:, None] + tl.arange(0, 16)[None, :]
    pair = tile * 8 + g  # scales/zeros in pair order: column 16 ct + 8 ab + g at 2 pair + ab, read as one pair
    kk = tl.arange(0, 64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    acc_a = tl.zeros((R, BM), tl.float32)
    acc_b = tl.zeros((R, BM), tl.float32)
    release_next(PDL)
    wait_previous(PDL)
    steps = slabs // SPR
    s_begin = pid_k * steps_per_split
    for step in range(s_begin, tl.minimum(s_begin + steps_per_split, steps)):
        zz = tl.load(z_ptr + step * (N // 2) + pair).to(tl.int32)  # both uint8 true zeros (< 64) of a pair
        za = (zz & 255).to(tl.int16).to(tl.float16, bitcast=True)
        zb = ((zz >> 8) & 255).to(tl.int16).to(tl.float16, bitcast=True)
        part_a = acc_a  # (any [R, BM] float32: the first slab's dots start afresh)
        part_b = acc_b
        for i in tl.static_range(SPR):
            slab = step * SPR + i
            words = tl.load(qw_ptr + w_off + slab * 128)
            xt = tl.trans(tl.load(x_rows + slab * 64, mask=m_ok[:, None], other=0.0))
            part_a, part_b = _slab_dots(words, xt, za, zb, part_a, part_b, i == 0)
        ss = tl.load(s_ptr + step * (N // 2) + pair)  # both float16 scales of a pair
        sa = (ss & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16777216.0
        sb = ((ss >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16777216.0
        acc_a += part_a * sa[:, None]
        acc_b += part_b * sb[:, None]
    # [R, BM] halves -> [BM, 16 * CT] in column order: tile ct, half ab, lane group g
    out = tl.reshape(tl.permute(tl.join(tl.reshape(acc_a, (CT, 8, BM)), tl.reshape(acc_b, (CT, 8, BM))),
                                (2, 0, 3, 1)), (BM, 16 * CT))
    offs_n = pid_n * (16 * CT) + tl.arange(0, 16 * CT)
    finish_tile(out, offs_m, offs_n, offs_n < N, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, pid_k,
                tl.num_programs(1), HAS_BIAS, SP, FENCE, False, b_ptr, False)


def supports(x2: Tensor, w: QWeight) -> bool:
    """Whether `mma_dot` takes this x: an "mma"-layout weight without perm, float16 x (the codes are float16
    subnormals) with its features contiguous."""
    return w.layout == "mma" and w.perm is None and x2.dtype == torch.float16 and x2.stride(1) == 1


def mma_dot(x2: Tensor, w: QWeight, bias: Tensor | None, y: Tensor, BM: int | None = None, CT: int = 8,
            split: int | None = None, waves: int = 2, num_warps: int = 4, num_stages: int = 3) -> None:
    """y [M, N] = x2 [M, K] @ W + bias: tiles of BM rows (default 16/32/64/128 by M) and 16 * CT columns (CT
    halved until it divides the weight's 16-column tiles; 8: each half a 64-row wgmma operand), K split while
    the output tiles alone would leave SMs short of `waves` programs each (one M tile only)."""
    if not supports(x2, w) or x2.shape[1] != w.in_features or y.shape != (x2.shape[0], w.out_features):
        raise ValueError("mma_dot needs an mma-layout weight without perm, contiguous float16 x [M, K] and y [M, N]")
    m, n = x2.shape[0], w.out_features
    BM = BM or max(16, min(128, triton.next_power_of_2(m)))
    while (n // 16) % CT:
        CT //= 2
    spr = w.slabs_per_run
    steps = w.in_features // 64 // spr
    tiles = triton.cdiv(m, BM) * (n // (16 * CT))
    if split is None:
        split = 1 if m > BM else split_k(steps, tiles, waves * sm_count(x2.device))[0]
    if split > 1 and m > BM:
        raise ValueError(f"split-K needs M <= BM, got M={m}, BM={BM}")
    per = -(-steps // split)
    splits = -(-steps // per)
    ws = torch.empty(splits * m * n if splits > 1 else 1, dtype=torch.float32, device=x2.device)
    _mma_dot_kernel[(tiles, splits)](
        x2, w.qweight, w.scales.view(torch.int32), w.zeros.view(torch.int16), x2 if bias is None else bias, ws,
        w.locks, y, m, n, x2.stride(0), w.in_features // 64, per,
        CT=CT, SPR=spr, BM=BM, GROUP_M=8, HAS_BIAS=bias is not None, SP=triton.next_power_of_2(splits),
        FENCE=x2.is_cuda and not interpreting(), num_warps=num_warps, num_stages=num_stages,
        **pdl_launch(x2))
