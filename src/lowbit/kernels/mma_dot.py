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

`x_first` turns the dot around: x is the first operand, straight from Triton's load pipeline in shared memory,
and a 128-row chunk's unpacked weight goes to shared memory as the second, in x's row order. Triton waits for
register-operand wgmma after every K=16 dot (offline sm_90 SASS: 16 waits a run at 64 rows), so the weight-first
kernel's tensor cores take turns with its own unpacking; with both operands in shared memory it waits once a
chunk. The chunk's tile is built with consecutive rows fastest in each thread's registers, which makes Triton
store it K-major with 16-byte stores (the other way round it stored it value by value).
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
    """Words ([.., 8 * CT, 16]) -> the float16 tile (q - z) * 2^-24 of rows 4c + h, half AB (zs: the half's zeros
    as subnormals, shaped to broadcast over the words)."""
    q = (words >> (4 * (AB + 2 * (h // 2) + 4 * (h % 2)))) & 15
    return q.to(tl.int16).to(tl.float16, bitcast=True) - zs


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
            part_a = tl.dot(_nibble_tile(words, za[:, None], h, 0), x_h)
            part_b = tl.dot(_nibble_tile(words, zb[:, None], h, 1), x_h)
        else:
            part_a = tl.dot(_nibble_tile(words, za[:, None], h, 0), x_h, part_a)
            part_b = tl.dot(_nibble_tile(words, zb[:, None], h, 1), x_h, part_b)
    return part_a, part_b


@triton.jit
def _tile_start(x_ptr, M, N, stride_xm, slabs, steps_per_split, CT: tl.constexpr, SPR: tl.constexpr,
                BM: tl.constexpr, GROUP_M: tl.constexpr, KX: tl.constexpr):
    """A program's tile and K range: (rows offs_m, their mask, column tile pid_n, the [8 * CT, 16] word offsets
    of its first slab, its scale/zero pairs, x's [BM, KX] row pointers at K = 0, first step, end step)."""
    R: tl.constexpr = 8 * CT
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BM), N // (16 * CT), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    r = tl.arange(0, R)
    tile, g = pid_n * CT + r // 8, r % 8
    w_off = (tile * slabs).to(tl.int64)[:, None] * 128 + (g * 16)[:, None] + tl.arange(0, 16)[None, :]
    pair = tile * 8 + g  # scales/zeros in pair order: column 16 ct + 8 ab + g at 2 pair + ab, read as one pair
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, KX)[None, :]
    s_begin = pid_k * steps_per_split
    return offs_m, offs_m < M, pid_n, w_off, pair, x_rows, s_begin, tl.minimum(s_begin + steps_per_split,
                                                                               slabs // SPR)


@triton.jit
def _run_zeros(z_ptr, step, N, pair):
    """The run's zeros of the tile rows' column pairs (one int16 holds both uint8 true zeros, < 64) -> the two
    columns' zeros as float16 subnormals z * 2^-24."""
    zz = tl.load(z_ptr + step * (N // 2) + pair).to(tl.int32)
    return (zz & 255).to(tl.int16).to(tl.float16, bitcast=True), ((zz >> 8) & 255).to(tl.int16).to(tl.float16,
                                                                                                  bitcast=True)


@triton.jit
def _run_scales(s_ptr, step, N, pair):
    """The run's scales of the tile rows' column pairs (one int32 holds both float16 scales) -> the two columns'
    scales * 2^24 in float32 (undoing the subnormal codes' 2^-24)."""
    ss = tl.load(s_ptr + step * (N // 2) + pair)
    sa = (ss & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16777216.0
    return sa, ((ss >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16777216.0


@triton.jit
def _mma_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr,
                    M, N, stride_xm, slabs, steps_per_split,
                    CT: tl.constexpr, SPR: tl.constexpr, BM: tl.constexpr, GROUP_M: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, PDL: tl.constexpr):
    """y = x W for [BM rows, 16 * CT columns] tiles, the K loop (runs of SPR slabs sharing scales) optionally
    split over grid axis 1 (then M <= BM). The weight is the dots' first operand (registers): four K=16 dots a
    slab and half (`_slab_dots`)."""
    R: tl.constexpr = 8 * CT
    offs_m, m_ok, pid_n, w_off, pair, x_rows, s_begin, s_end = _tile_start(
        x_ptr, M, N, stride_xm, slabs, steps_per_split, CT, SPR, BM, GROUP_M, 64)
    acc_a = tl.zeros((R, BM), tl.float32)
    acc_b = tl.zeros((R, BM), tl.float32)
    release_next(PDL)
    wait_previous(PDL)
    for step in range(s_begin, s_end):
        za, zb = _run_zeros(z_ptr, step, N, pair)
        part_a = acc_a  # (any [R, BM] float32: the first slab's dots start afresh)
        part_b = acc_b
        for i in tl.static_range(SPR):
            slab = step * SPR + i
            words = tl.load(qw_ptr + w_off + slab * 128)
            xt = tl.trans(tl.load(x_rows + slab * 64, mask=m_ok[:, None], other=0.0))
            part_a, part_b = _slab_dots(words, xt, za, zb, part_a, part_b, i == 0)
        sa, sb = _run_scales(s_ptr, step, N, pair)
        acc_a += part_a * sa[:, None]
        acc_b += part_b * sb[:, None]
    # [R, BM] halves -> [BM, 16 * CT] in column order: tile ct, half ab, lane group g
    out = tl.reshape(tl.permute(tl.join(tl.reshape(acc_a, (CT, 8, BM)), tl.reshape(acc_b, (CT, 8, BM))),
                                (2, 0, 3, 1)), (BM, 16 * CT))
    offs_n = pid_n * (16 * CT) + tl.arange(0, 16 * CT)
    finish_tile(out, offs_m, offs_n, offs_n < N, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, tl.program_id(1),
                tl.num_programs(1), HAS_BIAS, SP, FENCE, False, b_ptr, False)


@triton.jit
def _chunk_tile(words, za, zb):
    """A chunk's words [CH, R, 16] -> its unpacked weight [CH * 64, 2R] (float16 (q - z) * 2^-24) as the dot's
    second operand: row 64 s + 4c + h (x's order), column ab * R + r."""
    p0 = tl.join(_nibble_tile(words, za, 0, 0), _nibble_tile(words, zb, 0, 1))  # [CH, R, 16, ab]: row 4c
    p1 = tl.join(_nibble_tile(words, za, 1, 0), _nibble_tile(words, zb, 1, 1))
    p2 = tl.join(_nibble_tile(words, za, 2, 0), _nibble_tile(words, zb, 2, 1))
    p3 = tl.join(_nibble_tile(words, za, 3, 0), _nibble_tile(words, zb, 3, 1))
    t = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # [CH, R, 16, ab, i, j]: row 4c + 2i + j
    CH: tl.constexpr = words.shape[0]
    R: tl.constexpr = words.shape[1]
    return tl.reshape(tl.permute(t, (0, 2, 4, 5, 3, 1)), (CH * 64, 2 * R))


@triton.jit
def _x_first_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr,
                    M, N, stride_xm, slabs, steps_per_split,
                    CT: tl.constexpr, SPR: tl.constexpr, BM: tl.constexpr, GROUP_M: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, CH: tl.constexpr,
                    PDL: tl.constexpr):
    """`_mma_dot_kernel` with x the dot's first operand: one dot a chunk of CH slabs (K = 64 CH; CH divides
    SPR), x [BM, K] straight from Triton's load pipeline in shared memory, the chunk's unpacked weight [K, 2R]
    the second operand (`_chunk_tile`; also through shared memory: Triton then waits for wgmma once a dot, where
    register operands made it wait once a K=16 step). One loop over the program's chunks, so that Triton
    pipelines it; each adds its dot scaled by its run's scales. The weight's columns come in order (half ab,
    tile row r) and are put back at the end."""
    R: tl.constexpr = 8 * CT
    offs_m, m_ok, pid_n, w_off, pair, x_rows, s_begin, s_end = _tile_start(
        x_ptr, M, N, stride_xm, slabs, steps_per_split, CT, SPR, BM, GROUP_M, CH * 64)
    chunk_off = w_off[None, :, :] + tl.arange(0, CH)[:, None, None] * 128  # [CH, R, 16]
    acc = tl.zeros((BM, 2 * R), tl.float32)
    release_next(PDL)
    wait_previous(PDL)
    for chunk in range(s_begin * (SPR // CH), s_end * (SPR // CH)):
        run = chunk // (SPR // CH)
        za, zb = _run_zeros(z_ptr, run, N, pair)
        words = tl.load(qw_ptr + chunk_off + chunk * (CH * 128))
        x = tl.load(x_rows + chunk * (CH * 64), mask=m_ok[:, None], other=0.0)
        sa, sb = _run_scales(s_ptr, run, N, pair)
        scale = tl.reshape(tl.permute(tl.join(sa, sb), (1, 0)), (2 * R,))  # (ab, r) order
        acc += tl.dot(x, _chunk_tile(words, za[None, :, None], zb[None, :, None])) * scale[None, :]
    # columns (ab, ct, g) -> the weight's (ct, ab, g)
    out = tl.reshape(tl.permute(tl.reshape(acc, (BM, 2, CT, 8)), (0, 2, 1, 3)), (BM, 16 * CT))
    offs_n = pid_n * (16 * CT) + tl.arange(0, 16 * CT)
    finish_tile(out, offs_m, offs_n, offs_n < N, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, tl.program_id(1),
                tl.num_programs(1), HAS_BIAS, SP, FENCE, False, b_ptr, False)


def supports(x2: Tensor, w: QWeight) -> bool:
    """Whether `mma_dot` takes this x: an "mma"-layout weight without perm, float16 x (the codes are float16
    subnormals) with its features contiguous."""
    return w.layout == "mma" and w.perm is None and x2.dtype == torch.float16 and x2.stride(1) == 1


def mma_dot(x2: Tensor, w: QWeight, bias: Tensor | None, y: Tensor, BM: int | None = None, CT: int = 8,
            split: int | None = None, waves: int = 2, num_warps: int = 4, num_stages: int = 3,
            x_first: bool = False, maxnreg: int | None = None) -> None:
    """y [M, N] = x2 [M, K] @ W + bias: tiles of BM rows (default 16/32/64/128 by M) and 16 * CT columns (CT
    halved until it divides the weight's 16-column tiles; 8: each half a 64-row wgmma operand), K split while
    the output tiles alone would leave SMs short of `waves` programs each (one M tile only). x_first: x the
    dots' first operand, one dot a 128-row chunk (`_x_first_kernel`). maxnreg: registers a thread at most (so
    that more programs share an SM; the compiler spills past it)."""
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
    kernel, chunk = (_x_first_kernel, {"CH": 2 if spr % 2 == 0 else 1}) if x_first else (_mma_dot_kernel, {})
    kernel[(tiles, splits)](
        x2, w.qweight, w.scales.view(torch.int32), w.zeros.view(torch.int16), x2 if bias is None else bias, ws,
        w.locks, y, m, n, x2.stride(0), w.in_features // 64, per,
        CT=CT, SPR=spr, BM=BM, GROUP_M=8, HAS_BIAS=bias is not None, SP=triton.next_power_of_2(splits),
        FENCE=x2.is_cuda and not interpreting(), **chunk, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}), **pdl_launch(x2))
