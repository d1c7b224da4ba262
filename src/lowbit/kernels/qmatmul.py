"""`qmatmul`: y = x @ W for GPTQ weights in the kernels' layouts (`lowbit.kernels.layout`), and its kernels for
the "slots" layout.

Owns the "slots" kernels (M=1 GEMV, split-K tensor-core kernel, dequantize) and the dispatch between them and
the "mma" layout's kernels (`lowbit.kernels.mma`). Tensors in, tensors out: reading checkpoints
(`lowbit.quant.pack`) and module wiring live elsewhere; the torch reference for every kernel is
`lowbit.kernels.reference`. Dequantization needs no integer-to-float conversion: a field moved to the top of a
float32 mantissa and or-ed with 1.0 is u = OFF + q/F exactly, and w = (q - z)*s = u*(F*s) - (OFF*F + z)*s is
one exact FMA.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels import mma
from lowbit.kernels.layout import SLOT, ChannelOrder, QWeight, fields_per_word, place_halves, repack  # noqa: F401
from lowbit.kernels.splitk import finish_tile
from lowbit.kernels.swiglu_load import ROUNDING, swiglu_at
from lowbit.kernels.sync import (
    interpreting,
    pdl_launch,
    release_next,
    wait_previous,
)

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _field(words, hi, j: tl.constexpr, BITS: tl.constexpr):
    """Field j of int32 `words` (and bit j of `hi` for 3-bit) -> float32 u = OFF + q/F, exactly."""
    if BITS == 3:
        if 2 * j <= 21:
            t = words << (21 - 2 * j)
        else:
            t = words >> (2 * j - 21)
        lo = ((t & 0x00600000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + lo/4
        h = (((hi << (22 - j)) & 0x00400000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + hi/2
        return lo + 2.0 * h
    else:
        if 23 - BITS - BITS * j >= 0:
            t = words << (23 - BITS - BITS * j)
        else:
            t = words >> (BITS * j + BITS - 23)
        return ((t & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _field_int(words, hi, j: tl.constexpr, BITS: tl.constexpr):
    """Field j as an int32 holding q in bits 0..BITS-1 and nothing else (one or two ALU ops)."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    if LO * (j + 1) == 32:
        q = words.to(tl.uint32, bitcast=True) >> (32 - LO)  # top field: a logical shift isolates it
        q = q.to(tl.int32, bitcast=True)
    elif j == 0:
        q = words & ((1 << LO) - 1)
    else:
        q = (words >> (LO * j)) & ((1 << LO) - 1)
    if BITS == 3:
        if j == 2:
            q |= hi & 4
        elif j < 2:
            q |= (hi << (2 - j)) & 4
        else:
            q |= (hi >> (j - 2)) & 4
    return q


@triton.jit
def _pow2(e: tl.constexpr):
    """2.0**e as a float32 constant (|e| < 127)."""
    return tl.full((), (e + 127) << 23, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _sub_term(words, hi, xj, j: tl.constexpr, BITS: tl.constexpr, HIGH: tl.constexpr):
    """2^-38 * x * q for field j (HIGH: 3-bit's high bit j, counted as 4 * bit): the code is read as the
    float32 subnormal q * 2^(p - 149), left in place where it fits (one AND), and x is pre-scaled by
    2^(111 - p). Exact for float16 x, whose range keeps every product normal."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    if HIGH:
        v = hi & (1 << j)
        xs = xj * _pow2(113 - j)
    elif LO * (j + 1) <= 23:
        v = words & (((1 << LO) - 1) << (LO * j))
        xs = xj * _pow2(111 - LO * j)
    elif LO * (j + 1) == 32:
        v = (words.to(tl.uint32, bitcast=True) >> (32 - LO)).to(tl.int32, bitcast=True)
        xs = xj * _pow2(111)
    else:
        v = (words >> 12) & (((1 << LO) - 1) << (LO * j - 12))
        xs = xj * _pow2(123 - LO * j)
    return xs * v.to(tl.float32, bitcast=True)


@triton.jit
def _x_at(x_ptr, src, ok, K, XSW: tl.constexpr):
    """x[src] in float32 (ok False: 0). XSW (0: off): x holds float32 gate sums then up sums, [2K], and the input
    is their SwiGLU (`swiglu_load.swiglu_at`, rounded as `ROUNDING` code XSW's dtype)."""
    if XSW:
        return swiglu_at(x_ptr, src, ok, K, XSW)
    return tl.load(x_ptr + src, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _load_x(x_ptr, row, ok, perm_ptr, K, HAS_PERM: tl.constexpr, XSW: tl.constexpr):
    """x values (float32) of packed rows `row` (any shape); 0 for padding rows (XSW: see `_x_at`)."""
    if HAS_PERM:
        src = tl.load(perm_ptr + row, mask=ok, other=-1)
        return _x_at(x_ptr, src, ok & (src >= 0), K, XSW)
    else:
        return _x_at(x_ptr, row, ok & (row < K), K, XSW)


@triton.jit
def _chunk_words(qw_ptr, qh_ptr, blk, wi, cols, n_ok, N, BITS: tl.constexpr, EVEN_N: tl.constexpr):
    """The [16, BN] words (and 3-bit high bits) of block `blk` for columns `cols`."""
    wptr = (blk * 16 + wi[:, None]) * N + cols[None, :]
    if EVEN_N:
        words = tl.load(qw_ptr + wptr)
        hi = tl.load(qh_ptr + wptr).to(tl.int32) if BITS == 3 else words
    else:
        words = tl.load(qw_ptr + wptr, mask=n_ok[None, :], other=0)
        hi = tl.load(qh_ptr + wptr, mask=n_ok[None, :], other=0).to(tl.int32) if BITS == 3 else words
    return words, hi


@triton.jit
def _chunk_scales(s_ptr, z_ptr, run, cols, n_ok, N, SUB: tl.constexpr, EVEN_N: tl.constexpr, F: tl.constexpr,
                  OFF: tl.constexpr):
    """[1, BN] factors (a, b) of run `run` with sum_k x W = a * part - b * sum_k x for the kernel's `part`."""
    if EVEN_N:
        s = tl.load(s_ptr + run * N + cols).to(tl.float32)
        z = tl.load(z_ptr + run * N + cols).to(tl.float32)
    else:
        s = tl.load(s_ptr + run * N + cols, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + run * N + cols, mask=n_ok, other=0.0).to(tl.float32)
    if SUB:  # part = 2^-38 sum x q
        return (s * _pow2(38))[None, :], (s * z)[None, :]
    return (s * F)[None, :], (s * (OFF * F + z))[None, :]  # part = sum x u, u = OFF + q/F


@triton.jit
def _gemv_term(words, hi, xj, j: tl.constexpr, BITS: tl.constexpr, SUB: tl.constexpr):
    if SUB:
        t = _sub_term(words, hi, xj, j, BITS, False)
        if BITS == 3:
            t += _sub_term(words, hi, xj, j, BITS, True)
        return t
    return xj * _field(words, hi, j, BITS)


@triton.jit
def _gemv_block(x_ptr, perm_ptr, w0, h0, w1, h1, s_ptr, z_ptr, blk, live, c0, c1, ok0, ok1, wi, N, K, num_blocks,
                acc0, acc1, BITS: tl.constexpr, FIELDS: tl.constexpr, GROUP_SLOTS: tl.constexpr,
                HAS_PERM: tl.constexpr, SUB: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                MAYBE_DEAD: tl.constexpr, XSW: tl.constexpr, xs_ptr, XONCE: tl.constexpr):
    """acc += this block's contribution to the two column chunks (x rows >= `live` read as 0; MAYBE_DEAD: the
    block may be a re-read past the end, with `live` 0; XONCE: the input comes from xs, by packed row)."""
    F: tl.constexpr = 4 if BITS == 3 else 1 << BITS
    OFF: tl.constexpr = 3 if BITS == 3 else 1
    RUNS: tl.constexpr = FIELDS // GROUP_SLOTS
    for a in tl.static_range(RUNS):
        a0, b0 = _chunk_scales(s_ptr, z_ptr, blk * RUNS + a, c0, ok0, N, SUB, EVEN_N, F, OFF)
        a1, b1 = _chunk_scales(s_ptr, z_ptr, blk * RUNS + a, c1, ok1, N, SUB, EVEN_N, F, OFF)
        for jj in tl.static_range(GROUP_SLOTS):  # this run's fields, summed per word: no cross-thread work
            j = a * GROUP_SLOTS + jj
            row = blk * (16 * FIELDS) + j * 16 + wi
            if XONCE:
                xj = tl.load(xs_ptr + row, mask=row < live, other=0.0)[:, None]
            elif EVEN_K and not HAS_PERM and not MAYBE_DEAD and not XSW:
                xj = tl.load(x_ptr + row).to(tl.float32)[:, None]
            else:
                xj = _load_x(x_ptr, row, row < live, perm_ptr, K, HAS_PERM, XSW)[:, None]
            t0 = _gemv_term(w0, h0, xj, j, BITS, SUB)
            t1 = _gemv_term(w1, h1, xj, j, BITS, SUB)
            if jj == 0:
                p0, p1, xs = t0, t1, xj
            else:
                p0 += t0
                p1 += t1
                xs += xj
        acc0 += a0 * p0 - b0 * xs
        acc1 += a1 * p1 - b1 * xs
    return acc0, acc1


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr, pos_ptr, xs_ptr,
                 N, K, num_blocks, blocks_per_split,
                 BITS: tl.constexpr, FIELDS: tl.constexpr, GROUP_SLOTS: tl.constexpr, HAS_PERM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BN: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr,
                 SUB: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, UNROLL: tl.constexpr,
                 PREFETCH: tl.constexpr,
                 SWIGLU: tl.constexpr, HAS_POS: tl.constexpr, ADD: tl.constexpr, XSW: tl.constexpr,
                 XONCE: tl.constexpr, PDL: tl.constexpr):
    """y[n] = sum_k x[k] W[k, n] for one row x, on CUDA cores; grid (column pairs, K splits). ADD: y is
    float32 and each K split adds its partial sums to it (atomics: no split-K finish, nothing waits). XSW: x is
    a fused w13's float32 gate and up sums and the input SwiGLU of them (`_x_at`); XONCE: each program first
    writes the input of its rows to xs (float32, by packed row) once, then reads it as a plain x, rather than
    every lane recomputing SwiGLU for each field (the lanes of a row share its x values: 16 of them compute
    each; offline sm_90 SASS: ~2x the instructions of the plain GEMV). (RMSNorm fused in the same
    way, every program reading the whole row for the mean square, lost: 415 against 444 tok/s at b=1 on an
    H100, 2026-12-06; benchmarks/results/gpu.md.)

    Instructions, not bandwidth, limited the first GEMV (~10 a weight on an H100: each thread held one column,
    so every weight paid for its own x). Here a program owns two [16, BN] column chunks: Triton lays a chunk
    out as 4 adjacent columns a thread (one 16-byte load), and every x value a thread loads, converts and
    scales serves 8 columns. A weight then costs an AND and an FMA (SUB: the code read in place as a float32
    subnormal), ~3.6 instructions all told; per run the part is scaled once: sum x W = a*part - b*sum x.
    UNROLL=2 issues the next block's loads before this block's math (more bytes in flight a thread).
    PREFETCH: each step first issues the loads of the next step's UNROLL blocks, then does this step's math on
    words loaded a step earlier, so a program's loads overlap its own math rather than only other programs'
    (register double buffering; an Nsight profile of the default showed no eligible warp in half the cycles).
    PDL: the first blocks' words are loaded before waiting for the previous kernel (they are not its output),
    so a program's first loads overlap that kernel's tail (most programs own only 2-6 blocks)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    if SWIGLU:  # gate columns and their up columns N/2 further: the finish writes silu(gate) * up
        c0 = pid_n * BN + tl.max_contiguous(tl.multiple_of(tl.arange(0, BN), BN), BN)
        c1 = c0 + N // 2
        ok0 = c0 < N // 2
        ok1 = ok0
    else:
        c0 = pid_n * (2 * BN) + tl.max_contiguous(tl.multiple_of(tl.arange(0, BN), BN), BN)
        c1 = c0 + BN
        ok0, ok1 = c0 < N, c1 < N
    wi = tl.arange(0, 16)
    acc0 = tl.zeros((16, BN), tl.float32)
    acc1 = tl.zeros((16, BN), tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, num_blocks)
    w0, h0 = _chunk_words(qw_ptr, qh_ptr, b_start, wi, c0, ok0, N, BITS, EVEN_N)
    w1, h1 = _chunk_words(qw_ptr, qh_ptr, b_start, wi, c1, ok1, N, BITS, EVEN_N)
    if UNROLL == 2:  # the next block (re-reading this one past the end, with its x zeroed)
        nxt = tl.minimum(b_start + 1, b_end - 1)
        v0, g0 = _chunk_words(qw_ptr, qh_ptr, nxt, wi, c0, ok0, N, BITS, EVEN_N)
        v1, g1 = _chunk_words(qw_ptr, qh_ptr, nxt, wi, c1, ok1, N, BITS, EVEN_N)
    release_next(PDL)
    wait_previous(PDL)
    if XONCE:  # each of the program's input values computed by one thread, then visible to all of them
        r = tl.arange(0, 16 * FIELDS)
        for blk in range(b_start, b_end):
            rows = blk * (16 * FIELDS) + r
            x_in = _load_x(x_ptr, rows, rows < 16 * FIELDS * num_blocks, perm_ptr, K, HAS_PERM, XSW)
            tl.store(xs_ptr + rows, x_in)
        tl.debug_barrier()
    for blk in range(b_start, b_end, UNROLL):
        if PREFETCH:  # the next step's words, in flight during this step's math
            nxt = tl.minimum(blk + 1, b_end - 1)
            ahead = tl.minimum(blk + UNROLL, b_end - 1)  # past the end: unused (the loop stops)
            p0, q0 = _chunk_words(qw_ptr, qh_ptr, ahead, wi, c0, ok0, N, BITS, EVEN_N)
            p1, q1 = _chunk_words(qw_ptr, qh_ptr, ahead, wi, c1, ok1, N, BITS, EVEN_N)
            if UNROLL == 2:
                r0, s0 = _chunk_words(qw_ptr, qh_ptr, tl.minimum(blk + 3, b_end - 1), wi, c0, ok0, N, BITS, EVEN_N)
                r1, s1 = _chunk_words(qw_ptr, qh_ptr, tl.minimum(blk + 3, b_end - 1), wi, c1, ok1, N, BITS, EVEN_N)
        elif blk != b_start:  # this step's words (the first step's were loaded above)
            w0, h0 = _chunk_words(qw_ptr, qh_ptr, blk, wi, c0, ok0, N, BITS, EVEN_N)
            w1, h1 = _chunk_words(qw_ptr, qh_ptr, blk, wi, c1, ok1, N, BITS, EVEN_N)
            if UNROLL == 2:
                nxt = tl.minimum(blk + 1, b_end - 1)
                v0, g0 = _chunk_words(qw_ptr, qh_ptr, nxt, wi, c0, ok0, N, BITS, EVEN_N)
                v1, g1 = _chunk_words(qw_ptr, qh_ptr, nxt, wi, c1, ok1, N, BITS, EVEN_N)
        acc0, acc1 = _gemv_block(x_ptr, perm_ptr, w0, h0, w1, h1, s_ptr, z_ptr, blk, 16 * FIELDS * num_blocks, c0, c1,
                                 ok0, ok1, wi, N, K, num_blocks, acc0, acc1, BITS, FIELDS, GROUP_SLOTS, HAS_PERM, SUB,
                                 EVEN_N, EVEN_K, False, XSW, xs_ptr, XONCE)
        if UNROLL == 2:
            acc0, acc1 = _gemv_block(x_ptr, perm_ptr, v0, g0, v1, g1, s_ptr, z_ptr, nxt,
                                     tl.where(blk + 1 < b_end, 16 * FIELDS * num_blocks, 0), c0, c1,
                                     ok0, ok1, wi, N, K, num_blocks, acc0, acc1, BITS, FIELDS, GROUP_SLOTS,
                                     HAS_PERM, SUB, EVEN_N, EVEN_K, True, XSW, xs_ptr, XONCE)
        if PREFETCH:
            w0, h0, w1, h1 = p0, q0, p1, q1
            if UNROLL == 2:
                v0, g0, v1, g1 = r0, s0, r1, s1
    # the two chunks side by side: one split-K finish (one fence/counter round trip) for 2*BN columns
    out = _side_by_side(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0))
    if ADD:
        cols = _side_by_side(c0, c1)  # not SWIGLU: 2*BN consecutive columns
        ok = cols < N
        if HAS_BIAS:  # added once, by the first K split
            out += tl.where(pid_k == 0, tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32), 0.0)
        dst = cols
        if HAS_POS:  # gate column c to pos[c], up column N/2 + c to N/2 + pos[c]
            up = cols >= N // 2
            dst = tl.load(pos_ptr + tl.where(up, cols - N // 2, cols), mask=ok, other=0) + tl.where(up, N // 2, 0)
        tl.atomic_add(y_ptr + dst, out, mask=ok, sem="relaxed")
        return
    finish_tile(out[None, :], tl.arange(0, 1), _side_by_side(c0, c1), _side_by_side(ok0, ok1), 1, N, b_ptr, ws_ptr,
            lock_ptr, y_ptr, pid_n, pid_k, tl.num_programs(1), HAS_BIAS, SP, FENCE, SWIGLU, pos_ptr, HAS_POS)


@triton.jit
def _side_by_side(a, b):
    """[B], [B] -> [2B]: a then b."""
    return tl.reshape(tl.permute(tl.join(a, b), (1, 0)), (2 * a.shape[0],))


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
                SUB: tl.constexpr, PER_SLOT: tl.constexpr, PDL: tl.constexpr):
    """y = x W on tensor cores, the K loop optionally split over grid axis 1 (split > 1 needs M <= BM).

    SUB (fp16 x): B is the exact fp16 subnormal (q - z) * 2^-24 and the scale is applied per group to
    the fp32 dot. PER_SLOT: one K=16 dot per field on the [16, BN] word tile; else one dot per group on
    the group's [GROUP_SLOTS*16, BN] rows (a 3D unpack, reshaped)."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    RG: tl.constexpr = 16 * GROUP_SLOTS
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_m
    pid_n = (pid % width) // rows_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok, n_ok = offs_m < M, offs_n < N
    wi, ji, ri = tl.arange(0, 16), tl.arange(0, GROUP_SLOTS), tl.arange(0, RG)
    acc = tl.zeros((BM, BN), tl.float32)
    release_next(PDL)
    wait_previous(PDL)
    b_start = pid_k * blocks_per_split
    for i in range(0, blocks_per_split):
        blk = tl.minimum(b_start + i, num_blocks - 1)  # past the end: block re-read, all of x masked
        m_live = offs_m < tl.where(b_start + i < num_blocks, M, 0)
        wptr = (blk * 16 + wi[:, None]) * N + offs_n[None, :]
        words = tl.load(qw_ptr + wptr, mask=n_ok[None, :], other=0)
        hi = words
        if BITS == 3:
            hi = tl.load(qh_ptr + wptr, mask=n_ok[None, :], other=0).to(tl.int32)
        for a in tl.static_range(FIELDS // GROUP_SLOTS):
            r = blk * (FIELDS // GROUP_SLOTS) + a  # this run's scales/zeros row
            s = tl.load(s_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + r * N + offs_n, mask=n_ok, other=0.0)
            base = blk * (16 * FIELDS) + a * RG  # the group's fields are consecutive packed rows
            if PER_SLOT:
                zs = z.to(tl.int16).to(tl.float16, bitcast=True)[None, :]
                for jj in tl.static_range(GROUP_SLOTS):
                    xj = _x_tile(x_ptr, offs_m, m_live, stride_xm, base + jj * 16 + wi, perm_ptr, K, HAS_PERM)
                    qj = _field_int(words, hi, a * GROUP_SLOTS + jj, BITS)
                    bj = qj.to(tl.int16).to(tl.float16, bitcast=True) - zs
                    if jj == 0:
                        part = tl.dot(xj, bj)
                    else:
                        part = tl.dot(xj, bj, part)
                acc += part * (s * 16777216.0)[None, :]
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
    finish_tile(acc, offs_m, offs_n, n_ok, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, pid_k, tl.num_programs(1),
            HAS_BIAS, SP, FENCE, False, b_ptr, False)


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


# ------------------------------------------------------------------------------------------------ launch

# The kernel and tile keywords for each M on CUDA: the first row whose bound is >= M. Measured on an H100
# with benchmarks/kernels.py (4-bit g128, one LLaMA-7B block; benchmarks/results/gpu.md); large M
# dequantizes to a float weight and calls cuBLAS. Off CUDA (the interpreter) "gemv" for M=1, else "dot".
CUDA_CONFIGS: list[tuple[int, str, dict]] = [
    # swiglu_once (read only by down_proj's launch, whose input is SwiGLU of the gate/up sums): 13.9 against 15.3 us
    # alone, 442 against 436 tok/s for the whole 7B model at batch 1 (2026-12-06, benchmarks/results/gpu.md)
    (1, "gemv", {"BN": 64, "num_warps": 4, "waves": 4, "unroll": 2, "swiglu_once": True}),
    (16, "dot", {"BM": 16, "BN": 128, "num_warps": 2, "waves": 4}),
    (64, "dot", {"BM": 64, "BN": 128, "num_warps": 4, "waves": 2}),
    (256, "dot", {"BM": 128, "BN": 128, "num_warps": 8}),  # 256: a 256-token prefill chunk needs no float copy
    (1 << 62, "dequant", {}),
]
# The same for weights in the "mma" layout (4-bit; `lowbit.kernels.mma`), which only its own kernels read.
MMA_CUDA_CONFIGS: list[tuple[int, str, dict]] = [
    # M=1 (adds into float32): words two steps ahead through registers beat the shared-memory pipeline by 15-35 %
    # a launch (H100, 2026-12-07, benchmarks/results/gemv_sweep_mma.md)
    (1, "mma", {"CT": 4, "waves": 8, "num_warps": 4, "stages": 1, "prefetch": 0, "ahead": 2}),
    (16, "mma", {"CT": 4, "waves": 4, "num_warps": 4, "stages": 3}),  # M=16: 92.5 against 105.5 us (2026-12-06)
    (64, "mma", {"CT": 8, "waves": 2, "num_warps": 4, "stages": 4}),
    (1 << 62, "dequant", {}),
]
HOST_GATHER_MIN_M = 2  # act-order: from this M on, permute x's columns once (torch) instead of in-kernel


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs, but split-K still exercised


def _split(num_blocks: int, tiles: int, target: int, step: int = 1) -> tuple[int, int]:
    """(splits, blocks per split): about `target` programs over `tiles` output tiles, whole `step`s each."""
    split = max(1, min(round(target / tiles), -(-num_blocks // step)))
    per = -(-num_blocks // split)
    per = -(-per // step) * step
    return -(-num_blocks // per), per


def _common(w: QWeight, x2: Tensor, bias: Tensor | None):
    qh = w.qhigh if w.qhigh is not None else w.qweight
    perm = w.perm if w.perm is not None else w.slot_group
    b = bias if bias is not None else w.scales
    fence = x2.is_cuda and not interpreting()
    return qh, perm, b, fence


def _gemv(x2, w, bias, y, BN=64, split=None, num_warps=4, num_stages=1, denorm=True, waves=8, unroll=1,
          swiglu=False, positions=None, add=False, x_swiglu=None, maxnreg=None, prefetch=False,
          swiglu_once=False):
    """Launch the GEMV (keywords: `_gemv_kernel`'s tiles and modes; waves: programs per SM; maxnreg: a register
    cap for ptxas, which trades spills for programs resident per SM; prefetch: PREFETCH; swiglu_once: XONCE,
    with x_swiglu) -> the launched kernel (its n_regs, for benchmarks)."""
    n, fields = w.out_features, fields_per_word(w.bits)
    dtype = x_swiglu or x2.dtype  # what the input is rounded to
    num_blocks = w.padded_rows // (SLOT * fields)
    tiles = -(-n // 2 // BN) if swiglu else -(-n // (2 * BN))
    # whole unrolled steps a split: an odd count would re-read a block with its x zeroed in each program
    splits, per = _split(num_blocks, tiles, waves * sm_count(x2.device), unroll) if split is None else (
        split, -(-num_blocks // split))
    qh, perm, b, fence = _common(w, x2, bias)
    ws = torch.empty(splits * n if splits > 1 and not add else 1, dtype=torch.float32, device=x2.device)
    once = bool(x_swiglu and swiglu_once)
    xs = torch.empty(w.padded_rows, dtype=torch.float32, device=x2.device) if once else ws  # ws: unused there
    cap = {"maxnreg": maxnreg} if maxnreg and x2.is_cuda and not interpreting() else {}
    return _gemv_kernel[(tiles, splits)](
        x2, w.qweight, qh, w.scales, w.zeros, perm, b, ws, w.locks, y, positions if positions is not None else perm,
        xs, n, w.in_features, num_blocks, per,
        BITS=w.bits, FIELDS=fields, GROUP_SLOTS=w.group_slots, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, BN=BN, SP=triton.next_power_of_2(splits), FENCE=fence,
        SUB=dtype == torch.float16 and denorm, EVEN_N=(n // 2 % BN if swiglu else n % (2 * BN)) == 0,
        EVEN_K=w.in_features == w.padded_rows, UNROLL=unroll, PREFETCH=prefetch, SWIGLU=swiglu,
        HAS_POS=positions is not None, ADD=add, XSW=ROUNDING[x_swiglu], XONCE=once, num_warps=num_warps,
        num_stages=num_stages, **cap, **pdl_launch(x2))




def _dot(x2, w, bias, y, BM=None, BN=None, split=None, num_warps=None, num_stages=None, denorm=True,
         per_slot=None, waves=2):
    m, n, fields = x2.shape[0], w.out_features, fields_per_word(w.bits)
    num_blocks = w.padded_rows // (SLOT * fields)
    BM = BM or (16 if m <= 16 else 64 if m <= 64 else 128)
    BN = BN or (64 if BM == 64 else 128)
    num_warps = num_warps or (2 if BM <= 64 else 8)
    num_stages = num_stages or (2 if BM <= 16 or (BM >= 128 and fields == 16) else 3)  # 2/3-bit: smem
    tiles = triton.cdiv(m, BM) * triton.cdiv(n, BN)
    if split is None:  # split K only while the output tiles leave SMs idle, and only for one M tile
        split = 1 if m > BM else _split(num_blocks, tiles, waves * sm_count(x2.device))[0]
    if split > 1 and m > BM:
        raise ValueError(f"split-K needs M <= BM, got M={m}, BM={BM}")
    splits, per = (split, -(-num_blocks // split))
    qh, perm, b, fence = _common(w, x2, bias)
    sub = x2.dtype == torch.float16 and denorm
    ws = torch.empty(splits * m * n if splits > 1 else 1, dtype=torch.float32, device=x2.device)
    _dot_kernel[(tiles, splits)](
        x2, w.qweight, qh, w.scales, w.zeros, perm, b, ws, w.locks, y,
        m, n, w.in_features, x2.stride(0), num_blocks, per,
        BITS=w.bits, FIELDS=fields, GROUP_SLOTS=w.group_slots, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, BM=BM, BN=BN, GROUP_M=8, SP=triton.next_power_of_2(splits), FENCE=fence,
        IEEE=x2.dtype == torch.float32, SUB=sub, PER_SLOT=sub and (BM <= 64 if per_slot is None else per_slot),
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(x2))


def dequantize(w: QWeight, dtype: torch.dtype = torch.float16, BK: int = 64, BN: int = 128,
               cols: tuple[int, int] | None = None) -> Tensor:
    """-> W [K, N] (or its columns cols = (n0, n1)) in `dtype`, rows in input-channel order: y = x @ W."""
    if w.layout == "mma":
        return mma.dequantize_mma(w, dtype, cols)
    n, k = w.out_features, w.in_features
    n0, n1 = cols or (0, n)
    out = torch.empty(k, n1 - n0, dtype=dtype, device=w.qweight.device)
    perm = w.perm if w.perm is not None else w.slot_group
    qh = w.qhigh if w.qhigh is not None else w.qweight
    grid = (triton.cdiv(w.padded_rows, BK), triton.cdiv(n1 - n0, BN))
    _dequant_kernel[grid](w.qweight, qh, w.scales, w.zeros, perm, out, n, k, n0, n1,
                          BITS=w.bits, FIELDS=fields_per_word(w.bits), GROUP_SLOTS=w.group_slots,
                          HAS_PERM=w.perm is not None,
                          BK=BK, BN=BN, num_warps=4)
    return out


DEQUANT_WORKSPACE = 64 << 20  # bytes of float weight the large-M path holds at once (it goes slice by slice)


def _dequant_matmul(x2: Tensor, w: QWeight, bias: Tensor | None, y: Tensor, workspace: int = DEQUANT_WORKSPACE,
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


KERNELS = ("gemv", "dot", "dequant", "mma")
LAYOUT_KERNELS = {"slots": ("gemv", "dot", "dequant"), "mma": ("mma", "dequant")}


def pick_kernel(m: int, device: torch.device, layout: str = "slots") -> tuple[str, dict]:
    """(kernel, launcher keywords) for M rows on `device` and a weight in `layout`."""
    if device.type != "cuda":
        return ("mma" if layout == "mma" else "gemv" if m == 1 else "dot"), {}
    table = MMA_CUDA_CONFIGS if layout == "mma" else CUDA_CONFIGS
    return next((kernel, config) for bound, kernel, config in table if m <= bound)


def adds_itself(m: int, w: QWeight) -> bool:
    """Whether `qmatmul(accumulate=True)` of M rows adds into its float32 out inside the kernel (atomics, no
    split-K finish, no result tensor): the GEMV, and the mma kernel at M=1 (for an input in the weight's order)."""
    kernel = pick_kernel(m, w.qweight.device, w.layout)[0]
    return kernel == "gemv" or (kernel == "mma" and m == 1)


def sorted_input_pays(m: int, device: torch.device, layout: str = "slots") -> bool:
    """Whether the kernel for M rows gains from x arriving in an act-order weight's `input_order`. The GEMV and
    tensor-core kernels read x in packed-row order; the large-M path dequantizes W into channel order for
    cuBLAS, so there placing x's channels would only cost its producer (an H100, M=1024: SiLU*up 24 -> 143 us,
    `benchmarks/small_ops.py`)."""
    return pick_kernel(m, device, layout)[0] != "dequant"


def qmatmul(x: Tensor, w: QWeight, bias: Tensor | None = None, kernel: str | None = None,
            config: dict | None = None, out: Tensor | None = None, swiglu: bool = False,
            order: ChannelOrder | None = None, accumulate: bool = False,
            swiglu_input: torch.dtype | None = None) -> Tensor:
    """x [..., K] fp16/bf16/fp32 -> x @ W + bias [..., N] in x's dtype (written into `out` if given).

    swiglu_input (a dtype): x [..., 2K] holds a fused w13's gate then up sums (typically float32, added up by
    `accumulate`) and the input is silu(gate) * up in that dtype, rounded as `silu_mul` rounds; the result
    comes in that dtype. The GEMV computes it as it loads x (no launch of its own); other kernels run
    `silu_mul` first.

    accumulate: out (float32, contiguous, the result's shape) += x @ W + bias instead. The GEMV adds each K
    split's float32 partial sums with atomics, so it needs no split-K finish (the sum's order, and so its last
    bits, may vary between runs, unless `torch.use_deterministic_algorithms(True)`); the other kernels add
    their result in x's dtype.

    swiglu: W's columns are gate then up (a fused w13) and the result is SwiGLU's silu(gate) * up [..., N/2]:
    the GEMV computes it in its split-K finish (one launch less a layer in decode, nothing added to its loop);
    other kernels compute y first. order (swiglu only; the `input_order` of the next, act-order, linear): the
    activations come out in that order, so that linear reads them contiguously. With accumulate instead, the
    gate and up halves of out each get their columns in that order (for that linear's swiglu_input).
    `kernel` (one of KERNELS) and `config` (that launcher's tile keywords) override the dispatch by M;
    tests and benchmarks use them."""
    k, n = w.in_features, w.out_features
    if swiglu_input is not None:
        return _swiglu_input(x, w, bias, kernel, config, out, swiglu, order, accumulate, swiglu_input)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs gate and up columns of equal count, got {n} columns")
    if order is not None and (not (swiglu or accumulate) or order.positions.shape != (n // 2,)):
        raise ValueError(f"an order goes with swiglu or accumulate and places {n // 2} outputs")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if kernel is None:
        kernel, picked = pick_kernel(m, x.device, w.layout)
        if kernel == "mma" and x.dtype != torch.float16:  # its PTX multiplies fp16
            kernel, picked = "dequant", {}
        config = {**picked, **(config or {})}
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    if kernel not in LAYOUT_KERNELS[w.layout]:
        raise ValueError(f"the {kernel} kernel does not read the {w.layout} layout")
    if kernel == "gemv" and m > 1:
        raise ValueError("the gemv kernel takes one row")
    if accumulate:
        return _accumulate(x, x2, w, bias, kernel, config, out, swiglu, order)
    fused = kernel == "gemv" or (kernel == "mma" and m == 1)
    if swiglu and not fused:
        from lowbit.kernels.norm_rope import silu_mul

        act = silu_mul(qmatmul(x2, w, bias, kernel, config), None if order is None else order.sources)
        act = act if out is None else out.view(m, n // 2).copy_(act)
        return act.view(*lead, n // 2)
    if swiglu:
        config, n = {**(config or {}), "swiglu": True, "positions": None if order is None else order.positions}, n // 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out.view(m, n)
    if m == 0:
        return y.view(*lead, n)
    config = dict(config or {})
    gather = config.pop("host_gather", m >= HOST_GATHER_MIN_M)
    if kernel == "dequant":
        _dequant_matmul(x2, w, bias, y, **config)
        return y.view(*lead, n)
    # coalesced x tiles beat a gather
    if (gather or kernel == "mma") and w.tail_perm and w.perm is not None and kernel != "gemv":
        x2 = x2.index_select(1, w.perm[:k].long())
        w = w.for_sorted_input()
    elif x2.stride(1) != 1:
        x2 = x2.contiguous()
    if kernel == "mma":
        if not mma.supports(x2, w):  # a view (strided, or not 16-byte aligned): a fresh copy is both
            x2 = x2.clone(memory_format=torch.contiguous_format)
        mma.mma_matmul(x2, w, bias, y, sm_count(x2.device), **config)
        return y.view(*lead, n)
    launch = {"gemv": _gemv, "dot": _dot}[kernel]
    launch(x2, w, bias, y, **config)
    return y.view(*lead, n)


def _accumulate(x: Tensor, x2: Tensor, w: QWeight, bias: Tensor | None, kernel: str, config: dict | None,
                out: Tensor | None, swiglu: bool, order: ChannelOrder | None = None,
                x_swiglu: torch.dtype | None = None) -> Tensor:
    """qmatmul's accumulate=True: out += x @ W + bias (x_swiglu: qmatmul's swiglu_input);
    order: out's gate and up halves each get their columns in this order (what the next act-order linear
    reads with swiglu_input)."""
    shape = (*x.shape[:-1], w.out_features)
    if swiglu or out is None or out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"accumulate adds x @ W to `out`: a contiguous float32 tensor of shape {shape} "
                         "(not with swiglu)")
    if not out.numel():
        return out
    if torch.are_deterministic_algorithms_enabled() or not (kernel == "gemv" or _mma_adds(x2, w, kernel, x_swiglu)):
        return out.add_(place_halves(qmatmul(x, w, bias, kernel, config, swiglu_input=x_swiglu), order))
    config = {k: v for k, v in (config or {}).items() if k != "host_gather"}
    positions = None if order is None else order.positions
    if kernel == "mma":
        mma.mma_matmul(x2.contiguous(), w, bias, out.view(1, -1), sm_count(x2.device), **config, add=True,
                       x_swiglu=x_swiglu, positions=positions)
    else:
        _gemv(x2.contiguous(), w, bias, out.view(1, -1), **config, add=True, positions=positions, x_swiglu=x_swiglu)
    return out


def _mma_adds(x2: Tensor, w: QWeight, kernel: str, x_swiglu) -> bool:
    """Whether the mma kernel adds this one row into float32 itself (else: a result, then torch's add); with
    x_swiglu (float16 only: it multiplies float16), computing the input from float32 gate/up sums as it loads."""
    if kernel != "mma" or x2.shape[0] != 1 or w.layout != "mma" or w.perm is not None:
        return False
    if x_swiglu is not None:
        return x_swiglu == torch.float16 and x2.dtype == torch.float32
    return mma.supports(x2, w)


def _swiglu_input(x: Tensor, w: QWeight, bias: Tensor | None, kernel: str | None, config: dict | None,
                  out: Tensor | None, swiglu: bool, order: ChannelOrder | None, accumulate: bool,
                  dtype: torch.dtype) -> Tensor:
    """qmatmul with swiglu_input=dtype: x [..., 2K] is gate then up, the input silu(gate) * up in `dtype`. The
    GEMV computes the input as it loads x, other kernels get it from `silu_mul`'s launch first."""
    width = 2 * w.in_features
    if x.shape[-1] != width or dtype not in ROUNDING or dtype is None:
        raise ValueError(f"swiglu_input: x holds gate then up ({width} features, got {x.shape[-1]}) and the input "
                         f"is a float dtype (got {dtype})")
    m = x[..., 0].numel()
    picked = pick_kernel(m, x.device, w.layout)
    chosen, x2 = kernel or picked[0], x.reshape(-1, width)
    merged = {**(picked[1] if kernel is None else {}), **(config or {})}
    if accumulate and not swiglu and _mma_adds(x2, w, chosen, dtype):
        return _accumulate(x, x2, w, bias, "mma", merged, out, False, order, dtype)
    if chosen != "gemv" or swiglu or (order is not None and not accumulate):
        from lowbit.kernels import norm_rope

        return qmatmul(norm_rope.silu_mul(x, dtype=dtype), w, bias, kernel, config, out, swiglu, order, accumulate)
    config = merged
    if accumulate:
        return _accumulate(x, x2, w, bias, "gemv", config, out, False, order, dtype)
    config.pop("host_gather", None)
    y = torch.empty(m, w.out_features, dtype=dtype, device=x.device) if out is None else out.view(m, -1)
    if m:
        _gemv(x2.contiguous(), w, bias, y, **config, x_swiglu=dtype)
    return y.view(*x.shape[:-1], w.out_features)
