"""The one-row GEMV for weights in the "slots" layout: y = x @ W on CUDA cores, split over K to fill the GPU.

Decode's workhorse: at M=1 a linear streams its weight once and does two flops a weight, so what counts is
instructions a weight and bytes in flight. Modes for decode's fusions: SwiGLU in the split-K finish, adding into
a float32 residual with atomics, and SwiGLU of gate/up sums computed as x loads. Dispatch: `lowbit.kernels.qmatmul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import SLOT, fields_per_word
from lowbit.kernels.slots import field, launch_args, pow2, sub_term
from lowbit.kernels.splitk import finish_tile, sm_count, split_k
from lowbit.kernels.swiglu_load import ROUNDING, swiglu_at
from lowbit.kernels.sync import interpreting, pdl_launch, release_next, wait_previous



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
        return (s * pow2(38))[None, :], (s * z)[None, :]
    return (s * F)[None, :], (s * (OFF * F + z))[None, :]  # part = sum x u, u = OFF + q/F


@triton.jit
def _gemv_term(words, hi, xj, j: tl.constexpr, BITS: tl.constexpr, SUB: tl.constexpr):
    if SUB:
        t = sub_term(words, hi, xj, j, BITS, False)
        if BITS == 3:
            t += sub_term(words, hi, xj, j, BITS, True)
        return t
    return xj * field(words, hi, j, BITS)


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


def gemv(x2, w, bias, y, BN=64, split=None, num_warps=4, num_stages=1, denorm=True, waves=8, unroll=1,
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
    splits, per = split_k(num_blocks, tiles, waves * sm_count(x2.device), unroll) if split is None else (
        split, -(-num_blocks // split))
    qh, perm, b, fence = launch_args(w, x2, bias)
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
