"""Tensor-core kernels for 4-bit GPTQ weights in the "mma" layout (`lowbit.kernels.layout`): y = x @ W for a
few rows of x (decode; `lowbit.kernels.dequant` gives W itself, for cuBLAS at large M).

Why: at decode sizes a linear moves its 4-bit weight once and does almost no arithmetic, so the kernel must
stream the weight at memory speed; on CUDA cores the unpacking and multiply-adds cost ~4 instructions a weight,
which caps an H100 near 2 TB/s. Here each int32 word is one thread's A operand of an mma.m16n8k16 (M = 16
output columns, K = 16 rows): two LOP3s make half2 pairs 1024 + q and 1024 + 16q, one HSUB2 each takes the
zero point off exactly (q - z and 16(q - z)), and the tensor core does the multiply-adds in float32, about
1.3 instructions a weight. B holds x: its 8 columns are 8 rows of x (at M = 1 all of them row 0). Scales are
applied per slab in float32 (the 16 of the second column of each pair folded in).

Triton has no explicit register layouts, so the kernel relies on the one it gives a [R, 8, 16] int32 tile read
with 16-byte loads: lane 4g + t of a warp holds elements [r, g, 4t : 4t + 4], which the layout stores as that
lane's four words (`lowbit.kernels.layout`). The mma runs in inline PTX over those four elements; x, scales
and zeros come in through inline loads (Triton's own loads would pick other layouts and shuffle through shared
memory). The GPU tests check the whole kernel against the reference; Triton's CPU interpreter runs no PTX, so
there `_emulate` does the same arithmetic with tensor ops, which keeps the layout's index math under CI.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.layout import QWeight
from lowbit.kernels.partials import AttentionPartials
from lowbit.kernels.splitk import finish_tile
from lowbit.kernels.swiglu_load import ROUNDING, swiglu_at
from lowbit.kernels.sync import interpreting, pdl_launch, release_next, trace, wait_previous

ROWS_PER_TILE = 8  # rows of x one mma's B holds
MAX_TILES = 4  # x row tiles a launch carries (M <= 32); more rows take several launches


def mma_asm(tiles: int) -> tuple[str, str]:
    """The PTX of one step over a lane's four words (one slab of one 16-column tile) for `tiles` B tiles, and its
    constraints. Operands: out acc[tiles][4]; in words[4], acc[tiles][4], b0[tiles][4], b1[tiles][4], zeros[4],
    scales[4] (only the first of each zeros/scales pack is read)."""
    n_out = 4 * tiles
    W, A = n_out, n_out + 4
    B0, B1 = A + n_out, A + 2 * n_out
    Z = B1 + n_out
    S = Z + 4
    lines = ["{", ".reg .b32 q0, q1, q2, q3, t, za, zb;", f".reg .f32 d<{n_out}>, sa, sb;", ".reg .b16 slo, shi;",
             f"and.b32 t, ${Z}, 255;", "or.b32 za, t, 0x6400;", "prmt.b32 za, za, za, 0x1010;",  # 1024 + z_a, twice
             f"shr.b32 t, ${Z}, 4;", "and.b32 t, t, 0xff0;", "or.b32 zb, t, 0x6400;",  # 1024 + 16 z_b, twice
             "prmt.b32 zb, zb, zb, 0x1010;"]
    lines += [f"mov.f32 d{e}, 0f00000000;" for e in range(n_out)]
    for p in range(4):
        w = f"${W + p}"
        lines += [f"lop3.b32 q0, {w}, 0x000f000f, 0x64006400, 0xea;",  # (w & mask) | magic
                  f"lop3.b32 q1, {w}, 0x00f000f0, 0x64006400, 0xea;",
                  f"shr.b32 t, {w}, 8;",
                  "lop3.b32 q2, t, 0x000f000f, 0x64006400, 0xea;",
                  "lop3.b32 q3, t, 0x00f000f0, 0x64006400, 0xea;",
                  "sub.f16x2 q0, q0, za;", "sub.f16x2 q1, q1, zb;", "sub.f16x2 q2, q2, za;", "sub.f16x2 q3, q3, zb;"]
        for i in range(tiles):
            d = ", ".join(f"d{4 * i + e}" for e in range(4))
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d}}}, {{q0, q1, q2, q3}}, "
                         f"{{${B0 + 4 * i + p}, ${B1 + 4 * i + p}}}, {{{d}}};")
    lines += [f"mov.b32 {{slo, shi}}, ${S};", "cvt.f32.f16 sa, slo;", "cvt.f32.f16 sb, shi;",
              "mul.f32 sb, sb, 0f3D800000;"]  # the second column's values came out 16x
    lines += [f"fma.rn.f32 ${4 * i + e}, d{4 * i + e}, {'sa' if e < 2 else 'sb'}, ${A + 4 * i + e};"
              for i in range(tiles) for e in range(4)]
    lines.append("}")
    constraints = ",".join(["=f"] * n_out + ["r"] * 4 + ["f"] * n_out + ["r"] * (2 * n_out) + ["r"] * 8)
    return "\n".join(lines), constraints


_X_ASM = tl.constexpr("ld.global.v4.b32 {$0, $4, $1, $5}, [$8];\n\t"
          "ld.global.v4.b32 {$2, $6, $3, $7}, [$8+16];")
_META_ASM = tl.constexpr("{\n\t.reg .b16 z;\n\t"
             "ld.global.nc.b32 $0, [$8];\n\tmov.b32 $1, $0;\n\tmov.b32 $2, $0;\n\tmov.b32 $3, $0;\n\t"
             "ld.global.nc.b16 z, [$12];\n\tcvt.u32.u16 $4, z;\n\tmov.b32 $5, $4;\n\tmov.b32 $6, $4;\n\t"
             "mov.b32 $7, $4;\n\t}")


@triton.jit
def _x_frags(x_ptr, off, EMULATE: tl.constexpr):
    """(b0, b1): the x pairs of element [r, g, 4t + p] at int32 offset `off` and off + 1 (rows k0, k0+1 and
    k0+2, k0+3). The inline load reads a lane's 32 bytes from the first element's offset."""
    if EMULATE:
        return tl.load(x_ptr + off), tl.load(x_ptr + off + 1)
    return tl.inline_asm_elementwise(_X_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l,l,l,l", [x_ptr + off],
                                     dtype=(tl.int32, tl.int32), is_pure=True, pack=4)


@triton.jit
def _x_rows(x_ptr, xrow, step, g, M, row, SPR: tl.constexpr, NT: tl.constexpr, EMULATE: tl.constexpr):
    """The x fragments of a step for each of the NT 8-row tiles of x (rows past M repeat the last row; unused
    tiles repeat the first)."""
    x0 = _x_frags(x_ptr, xrow + step * (SPR * 32), EMULATE)
    x1, x2, x3 = x0, x0, x0
    if NT > 1:
        x1 = _x_frags(x_ptr, xrow + tl.minimum(8, M - 1 - g) * row + step * (SPR * 32), EMULATE)
    if NT > 2:
        x2 = _x_frags(x_ptr, xrow + tl.minimum(16, M - 1 - g) * row + step * (SPR * 32), EMULATE)
        x3 = _x_frags(x_ptr, xrow + tl.minimum(24, M - 1 - g) * row + step * (SPR * 32), EMULATE)
    return x0, x1, x2, x3


@triton.jit
def _meta(s_ptr, z_ptr, off, EMULATE: tl.constexpr):
    """(scale pair int32, zero pair int32) of each element's lane: the two columns' fp16 scales and uint8 zeros."""
    if EMULATE:
        return tl.load(s_ptr + off), tl.load(z_ptr + off).to(tl.int32) & 0xFFFF
    return tl.inline_asm_elementwise(_META_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l,l,l,l,l,l,l,l",
                                     [(s_ptr + off).to(tl.int64), (z_ptr + off).to(tl.int64)],
                                     dtype=(tl.int32, tl.int32), is_pure=True, pack=4)


@triton.jit
def _zero_after_wait(EMULATE: tl.constexpr):
    """A 0 that the compiler cannot know before this point: offsets that add it keep their (pure, so movable)
    inline loads after `wait_previous`, which must come first for data an earlier kernel wrote (x)."""
    if EMULATE:
        return 0
    return tl.inline_asm_elementwise("mov.b32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _half(v, HIGH: tl.constexpr):
    """The fp16 in the low (or high) half of int32 v, as float32."""
    bits = (v >> 16) if HIGH else v
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _emulate(words, acc, b0, b1, zz, sc):
    """What the PTX step computes, in tensor ops (for the interpreter): acc[8r + g, 4t + p] += the mma output
    register p of lane 4g + t, scaled. Register p holds C[row, col] with row = g (p < 2) or g + 8 (the pair's
    second column), col = 2t + p % 2 (a row of x); C sums over the 16 rows of each of the lane group's 4 words."""
    R: tl.constexpr = words.shape[0] // 8
    words, acc = tl.reshape(words, (R, 8, 16)), tl.reshape(acc, (R, 8, 16))
    b0, b1 = tl.reshape(b0, (R, 8, 16)), tl.reshape(b1, (R, 8, 16))
    zz, sc = tl.reshape(zz, (R, 8, 16)), tl.reshape(sc, (R, 8, 16))
    h = tl.arange(0, 4)[None, None, None, :]
    nib_a = 2 * (h // 2) + 4 * (h % 2)  # the nibble of row k0 + h of the pair's first column (layout.mma_nibble)
    q_a = ((words[:, :, :, None] >> (4 * nib_a)) & 15).to(tl.float32)
    q_b = ((words[:, :, :, None] >> (4 * nib_a + 4)) & 15).to(tl.float32)
    w_a = q_a - (zz & 255).to(tl.float32)[:, :, :, None]
    w_b = q_b - ((zz >> 8) & 255).to(tl.float32)[:, :, :, None]
    x = tl.where(h == 0, _half(b0, False)[:, :, :, None], tl.where(h == 1, _half(b0, True)[:, :, :, None],
                 tl.where(h == 2, _half(b1, False)[:, :, :, None], _half(b1, True)[:, :, :, None])))
    w_a, w_b, x = tl.reshape(w_a, (R, 8, 64)), tl.reshape(w_b, (R, 8, 64)), tl.reshape(x, (R, 8, 64))
    c_a = tl.sum(w_a[:, :, None, :] * x[:, None, :, :], axis=3)  # [R, g, col]: col c takes x from lanes g = c
    c_b = tl.sum(w_b[:, :, None, :] * x[:, None, :, :], axis=3)
    j = tl.arange(0, 16)[None, None, :, None]
    col = 2 * (j // 4) + j % 2
    cols = tl.arange(0, 8)[None, None, None, :]
    pick_a = tl.sum(tl.where(cols == col, c_a[:, :, None, :], 0.0), axis=3)
    pick_b = tl.sum(tl.where(cols == col, c_b[:, :, None, :], 0.0), axis=3)
    second = (tl.arange(0, 16) % 4 >= 2)[None, None, :]
    out = acc + tl.where(second, pick_b * _half(sc, True), pick_a * _half(sc, False))
    return tl.reshape(out, (R * 8, 16))


@triton.jit
def _step(words, acc, b0, b1, zz, sc, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE:
        return _emulate(words, acc, b0, b1, zz, sc)
    return tl.inline_asm_elementwise(ASM, CONSTRAINTS, [words, acc, b0, b1, zz, sc], dtype=tl.float32,
                                     is_pure=True, pack=4)


@triton.jit
def _step2(words, a0, a1, x0, x1, zz, sc, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, EMULATE: tl.constexpr):
    """_step for two B tiles (x rows 0-7 and 8-15): the words are unpacked once for both."""
    if EMULATE:
        return _emulate(words, a0, x0[0], x0[1], zz, sc), _emulate(words, a1, x1[0], x1[1], zz, sc)
    return tl.inline_asm_elementwise(ASM, CONSTRAINTS, [words, a0, a1, x0[0], x1[0], x0[1], x1[1], zz, sc],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _step4(words, a0, a1, a2, a3, x0, x1, x2, x3, zz, sc, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
           EMULATE: tl.constexpr):
    if EMULATE:
        return (_emulate(words, a0, x0[0], x0[1], zz, sc), _emulate(words, a1, x1[0], x1[1], zz, sc),
                _emulate(words, a2, x2[0], x2[1], zz, sc), _emulate(words, a3, x3[0], x3[1], zz, sc))
    return tl.inline_asm_elementwise(ASM, CONSTRAINTS, [words, a0, a1, a2, a3, x0[0], x1[0], x2[0], x3[0],
                                                        x0[1], x1[1], x2[1], x3[1], zz, sc],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines at `ptrs` without waiting (weights, while the previous kernel drains)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.b32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _to_rows(acc, CT: tl.constexpr, SPR: tl.constexpr):
    """[CT * SPR * 8, 16] accumulators -> [8, 16 * CT] outputs: x row 2t + p % 2, column 16 ct + 8 (p // 2) + g."""
    a = tl.sum(tl.reshape(acc, (CT, SPR, 8, 16)), axis=1)
    a = tl.permute(tl.reshape(a, (CT, 8, 4, 2, 2)), (2, 4, 0, 3, 1))
    return tl.reshape(a, (8, 16 * CT))


@triton.jit
def _placed(col, pos_ptr, ok, N, HAS_POS: tl.constexpr):
    """Where column `col` of a fused w13 is added (HAS_POS: gate column c at pos[c], up column N/2 + c at
    N/2 + pos[c], the order an act-order down_proj reads; else at col)."""
    if HAS_POS:
        up = col >= N // 2
        return tl.load(pos_ptr + tl.where(up, col - N // 2, col), mask=ok, other=0) + tl.where(up, N // 2, 0)
    return col


@triton.jit
def _swiglu_rows(xf_ptr, xh_ptr, k, ok, K, XSW: tl.constexpr):
    """Rows k (where ok) of the input from a fused w13's float32 gate/up sums (XSW: their `swiglu_load.ROUNDING`
    code)."""
    tl.store(xh_ptr + k, swiglu_at(xf_ptr, k, ok, K, XSW).to(tl.float16), mask=ok)


@triton.jit
def _merged_rows(ws_ptr, src_ptr, xh_ptr, k, ok, head_dim: tl.constexpr, stride: tl.constexpr, n: tl.constexpr,
                 SPLITS: tl.constexpr, PLACED: tl.constexpr):
    """Rows k (where ok; channel k: head k // head_dim) of one-row attention's output, merged from its SPLITS
    partials (`partials.AttentionPartials` at ws: m [n], l [n], acc [n, stride]); a split at a time, in split
    order. PLACED: row k is channel src[k], its acc at ws[2n + s * C + k] (C = n // SPLITS * head_dim)."""
    if PLACED:  # m and l gathered (a few hundred bytes, in L1)
        first = (tl.load(src_ptr + k, mask=ok, other=0) // head_dim) * SPLITS
    else:
        first = (k // head_dim) * SPLITS
    m_max = tl.load(ws_ptr + first, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        m_max = tl.maximum(m_max, tl.load(ws_ptr + first + s, mask=ok, other=0.0))
    total = tl.zeros(k.shape, tl.float32)
    o = tl.zeros(k.shape, tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.exp2(tl.load(ws_ptr + first + s, mask=ok, other=0.0) - m_max)
        total += w * tl.load(ws_ptr + n + first + s, mask=ok, other=1.0)
        if PLACED:
            o += w * tl.load(ws_ptr + 2 * n + s * (n // SPLITS * head_dim) + k, mask=ok, other=0.0)
        else:
            o += w * tl.load(ws_ptr + 2 * n + (first + s) * stride + k % head_dim, mask=ok, other=0.0)
    tl.store(xh_ptr + k, (o / total).to(tl.float16), mask=ok)


@triton.jit
def _mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr, pos_ptr, xf_ptr, xh_ptr, src_ptr,
                M, N, stride_xm, slabs, steps_per_split,
                CT: tl.constexpr, SPR: tl.constexpr, NT: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
                HAS_BIAS: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, SWIGLU: tl.constexpr,
                HAS_POS: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr, EMULATE: tl.constexpr,
                ADD: tl.constexpr, AHEAD: tl.constexpr, XSW: tl.constexpr, XMG: tl.constexpr, XMG_DIM: tl.constexpr,
                XMG_STRIDE: tl.constexpr, XMG_N: tl.constexpr, XMG_PLACED: tl.constexpr, XSTEPS: tl.constexpr,
                SPLIT_FAST: tl.constexpr, PDL: tl.constexpr):
    """y = x W for up to 8 * NT rows of x; grid (groups of CT column tiles, K splits). A step is one run (SPR slabs
    sharing scales) of the program's CT tiles: a [CT * SPR, 8, 16] word tile streamed through shared memory
    (STAGES deep), x and the run's scales/zeros loaded a step ahead. x_ptr, s_ptr, z_ptr are int32, int32, int16
    views (x pairs, scale pairs, zero pairs). SWIGLU (M = 1): the first CT/2 tiles are gate columns, the last CT/2
    the up columns N/2 further, and the finish writes silu(gate) * up. ADD: y is float32 and each K split adds
    its sums to it with atomics (no split-K finish), as the slots GEMV does in one-row decode: ADD 1 (M = 1) adds
    row 0's sums; ADD 2 (M = 1) has each lane add its own registers, one atomic a column and slab, instead of
    gathering the columns through shared memory first (all x rows are row 0, so the four lanes of a column group
    hold the same sums); ADD 3 adds every row's sums (M rows of y, N apart). AHEAD
    (1-4; with STAGES 1): words come through registers, loaded AHEAD steps before their math (the first ones
    before waiting for the previous kernel), instead of through Triton's shared-memory pipeline. XSW (M = 1; a
    `swiglu_load.ROUNDING` code): xf holds a fused w13's float32 gate/up sums and the input is their SwiGLU; each
    program first writes it for its own rows into the float16 scratch row xh (which x_ptr views), then reads
    that as its x. XMG (M = 1; the split count): likewise, x is one-row decode attention's output, merged from
    its XMG splits' partials at xf (`partials.AttentionPartials`: head dim XMG_DIM, acc stride XMG_STRIDE, XMG_N
    entries; constants of a model and cache, so no arguments the other modes would carry; XMG_PLACED: acc placed
    in this weight's row order, row k holding channel src[k]). XSW and XMG compute the rows of XSTEPS steps at a
    time (their loads then wait on L2 together). SPLIT_FAST: the grid is one axis with the K split varying
    fastest, so that (with a split count dividing the SM count, and the programs of a launch dealt round the SMs
    in order) the programs an SM runs share their K split, and so their rows of x, in its L1."""
    steps = slabs // SPR
    if SPLIT_FAST:  # one grid axis, the K split varying fastest
        n_splits = tl.cdiv(steps, steps_per_split)
        pid_n, pid_k = tl.program_id(0) // n_splits, tl.program_id(0) % n_splits
    else:
        pid_n, pid_k, n_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    R: tl.constexpr = CT * SPR
    # 2-D tiles [R * 8, 16]: row 8 r + g, element 4 t + p, so Triton's 16-byte-vector layout gives lane 4 g + t
    # elements [row, 4 t : 4 t + 4] (a 3-D [R, 8, 16] tile got threads spread over r instead of g)
    q = tl.arange(0, R * 8)[:, None]
    j = tl.arange(0, 16)[None, :]
    r, g = q // 8, q % 8
    ct, ss = r // SPR, r % SPR
    if SWIGLU:
        HALF: tl.constexpr = CT // 2
        tile = pid_n * HALF + tl.where(ct < HALF, ct, ct - HALF + N // 32)
    else:
        tile = pid_n * CT + ct
    s_begin = pid_k * steps_per_split
    s_end = tl.minimum(s_begin + steps_per_split, steps)
    w_off = (tile * slabs + ss).to(tl.int64) * 128 + g * 16 + j  # + step * SPR * 128
    m_off = tile * 8 + g + 0 * j  # + step * N / 2: the lane's scale/zero pair
    x_off = ss * 32 + (j // 4) * 8 + (j % 4) * 2  # + step * SPR * 32 + x row * stride / 2
    xrow = tl.minimum(g, M - 1).to(tl.int64) * (stride_xm // 2) + x_off
    if not EMULATE:
        lines = (tile * slabs + ss).to(tl.int64) * 128 + (j % 4) * 32  # 4 lines of 128 bytes a row (x4 copies)
        for i in tl.static_range(PREFETCH):
            _prefetch_l2(qw_ptr + lines + tl.minimum(s_begin + i, s_end - 1) * (SPR * 128))
    if AHEAD:  # the first steps' words (weights: no earlier kernel writes them) load under the previous kernel
        ahead0 = tl.load(qw_ptr + w_off + s_begin * (SPR * 128))
        ahead1, ahead2, ahead3 = ahead0, ahead0, ahead0  # (unused past AHEAD)
        if AHEAD >= 2:
            ahead1 = tl.load(qw_ptr + w_off + tl.minimum(s_begin + 1, s_end - 1) * (SPR * 128))
        if AHEAD >= 3:
            ahead2 = tl.load(qw_ptr + w_off + tl.minimum(s_begin + 2, s_end - 1) * (SPR * 128))
        if AHEAD >= 4:
            ahead3 = tl.load(qw_ptr + w_off + tl.minimum(s_begin + 3, s_end - 1) * (SPR * 128))
    sc, zz = _meta(s_ptr, z_ptr, m_off + s_begin * (N // 2), EMULATE)  # the first step's scales/zeros: weights too
    release_next(PDL)
    wait_previous(PDL)
    xrow += _zero_after_wait(EMULATE)
    if XSW or XMG:
        rows = tl.arange(0, XSTEPS * SPR * 64)
        for chunk in range(s_begin, s_end, XSTEPS):
            k = chunk * (SPR * 64) + rows
            ok = k < s_end * (SPR * 64)
            if XSW:
                _swiglu_rows(xf_ptr, xh_ptr, k, ok, slabs * 64, XSW)
            else:
                _merged_rows(xf_ptr, src_ptr, xh_ptr, k, ok, XMG_DIM, XMG_STRIDE, XMG_N, XMG, XMG_PLACED)
        tl.debug_barrier()
        xrow += _zero_after_wait(EMULATE)  # keeps the (pure, so movable) x loads after the barrier
    acc0 = tl.zeros((R * 8, 16), tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    x0, x1, x2, x3 = _x_rows(x_ptr, xrow, s_begin, g, M, stride_xm // 2, SPR, NT, EMULATE)
    for step in tl.range(s_begin, s_end, num_stages=STAGES):
        nxt = tl.minimum(step + 1, s_end - 1)  # the last step reloads its own: harmless
        if AHEAD == 0:
            words = tl.load(qw_ptr + w_off + step * (SPR * 128))
        else:  # words loaded AHEAD steps earlier into registers; this step asks for those AHEAD steps on
            words = ahead0
            later = qw_ptr + w_off + tl.minimum(step + AHEAD, s_end - 1) * (SPR * 128)
            if AHEAD == 1:
                ahead0 = tl.load(later)
            elif AHEAD == 2:
                ahead0, ahead1 = ahead1, tl.load(later)
            elif AHEAD == 3:
                ahead0, ahead1, ahead2 = ahead1, ahead2, tl.load(later)
            else:
                ahead0, ahead1, ahead2, ahead3 = ahead1, ahead2, ahead3, tl.load(later)
        y0, y1, y2, y3 = _x_rows(x_ptr, xrow, nxt, g, M, stride_xm // 2, SPR, NT, EMULATE)
        sc2, zz2 = _meta(s_ptr, z_ptr, m_off + nxt * (N // 2), EMULATE)
        if NT == 1:
            acc0 = _step(words, acc0, x0[0], x0[1], zz, sc, ASM, CONSTRAINTS, EMULATE)
        elif NT == 2:
            acc0, acc1 = _step2(words, acc0, acc1, x0, x1, zz, sc, ASM, CONSTRAINTS, EMULATE)
        else:
            acc0, acc1, acc2, acc3 = _step4(words, acc0, acc1, acc2, acc3, x0, x1, x2, x3, zz, sc, ASM, CONSTRAINTS,
                                            EMULATE)
        x0, x1, x2, x3, sc, zz = y0, y1, y2, y3, sc2, zz2
    if ADD == 2:  # straight from the registers: lane t = 0's elements p = 0 and 2 hold its columns ca and cb
        col = tile * 16 + g + 8 * ((j % 4) // 2)
        mine = (j // 4 == 0) & (j % 2 == 0) & (col < N)
        if HAS_BIAS:  # once a column: by the first K split's first slab
            first = mine & (ss + pid_k == 0)
            acc0 += tl.load(b_ptr + col, mask=first, other=0.0).to(tl.float32)
        tl.atomic_add(y_ptr + _placed(col, pos_ptr, mine, N, HAS_POS), acc0, mask=mine, sem="relaxed")
        trace(2)
        return
    out = _to_rows(acc0, CT, SPR)
    if NT > 1:
        out = tl.reshape(tl.permute(tl.join(out, _to_rows(acc1, CT, SPR)), (2, 0, 1)), (16, 16 * CT))
    if NT > 2:
        hi = tl.reshape(tl.permute(tl.join(_to_rows(acc2, CT, SPR), _to_rows(acc3, CT, SPR)), (2, 0, 1)),
                        (16, 16 * CT))
        out = tl.reshape(tl.permute(tl.join(out, hi), (2, 0, 1)), (32, 16 * CT))
    cols = tl.arange(0, 16 * CT)
    if ADD:
        offs_n = pid_n * (16 * CT) + cols
        ok = offs_n < N
        if ADD == 3:  # each row's sums (and the bias, once a row)
            if HAS_BIAS:
                out += tl.where(pid_k == 0, tl.load(b_ptr + offs_n, mask=ok, other=0.0).to(tl.float32), 0.0)[None, :]
            offs_m = tl.arange(0, 8 * NT)
            dst = offs_m[:, None].to(tl.int64) * N + _placed(offs_n, pos_ptr, ok, N, HAS_POS)[None, :]
            tl.atomic_add(y_ptr + dst, out, mask=(offs_m < M)[:, None] & ok[None, :], sem="relaxed")
        else:  # (not after a return: the compiler still builds what follows one, the interpreter does not)
            # every x row of the tile is row 0: add row 0's sums (and the bias, once)
            row0 = tl.sum(tl.where(tl.arange(0, 8)[:, None] == 0, out, 0.0), axis=0)
            if HAS_BIAS:
                row0 += tl.where(pid_k == 0, tl.load(b_ptr + offs_n, mask=ok, other=0.0).to(tl.float32), 0.0)
            tl.atomic_add(y_ptr + _placed(offs_n, pos_ptr, ok, N, HAS_POS), row0, mask=ok, sem="relaxed")
        trace(2)
        return
    if SWIGLU:
        offs_n = pid_n * (8 * CT) + tl.where(cols < 8 * CT, cols, cols - 8 * CT + N // 2)
        out = tl.sum(tl.where(tl.arange(0, 8 * NT)[:, None] == 0, out, 0.0), axis=0)[None, :]
        offs_m = tl.arange(0, 1)
    else:
        offs_n = pid_n * (16 * CT) + cols
        offs_m = tl.arange(0, 8 * NT)
    finish_tile(out, offs_m, offs_n, offs_n < N, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, pid_k,
                n_splits, HAS_BIAS, SP, FENCE, SWIGLU, pos_ptr, HAS_POS)
    trace(2)


@functools.lru_cache(maxsize=None)
def _asm(tiles: int) -> tuple[str, str]:
    return mma_asm(tiles)


def supports(x2: Tensor, w: QWeight) -> bool:
    """Whether `mma_matmul` takes this x (the weight must be in the "mma" layout, x read as it is)."""
    return (w.layout == "mma" and w.perm is None and x2.dtype == torch.float16 and x2.stride(1) == 1
            and x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0)


def _column_tiles(tiles: int, want: int) -> int:
    """The largest power of two <= want that divides `tiles` (programs then never straddle the end)."""
    ct = want
    while tiles % ct:
        ct //= 2
    return ct


def mma_matmul(x2: Tensor | None, w: QWeight, bias: Tensor | None, y: Tensor, sms: int, CT: int = 4, waves: int = 4,
               num_warps: int = 4, stages: int = 3, prefetch: int = 2, split: int | None = None,
               swiglu: bool = False, positions: Tensor | None = None, add: bool = False, ahead: int = 0,
               lanes: bool = False, x_swiglu: torch.dtype | None = None,
               x_merge: AttentionPartials | None = None, x_steps: int = 1, split_fast: bool = False) -> None:
    """y [M, N] (or [M, N/2] with swiglu) = x2 [M, K] @ W + bias, in launches of up to 8 * MAX_TILES rows.

    CT column tiles of 16 a program (halved until it divides the weight's tiles), about waves * sms programs
    through K splits, `stages`-deep shared-memory pipeline, `prefetch` steps of words asked of L2 before waiting
    for the previous kernel (PDL). add: y is float32 and gets x2 @ W + bias added (atomics; the sum's order, and
    so its last bits, may vary between runs; positions: a fused w13's gate and up halves each in that order, as
    the slots GEMV places them). ahead (1-4): words through registers, loaded that many steps early
    (`_mma_kernel`'s AHEAD), in place of the shared-memory pipeline. lanes (with add, one row): each lane adds
    its registers itself (ADD 2). x_swiglu (torch.float16; one row): x2 [1, 2K] holds a fused w13's float32
    gate and up sums and the input is silu(gate) * up in float16, computed as the kernel loads x (XSW).
    x_merge (one row; x2 None): the input is one-row decode attention's output in float16, merged from these
    unmerged partials as the kernel loads x (XMG; partials placed in an act-order order need this weight sorted
    to read x in it: `QWeight.for_sorted_input`). x_steps (a power of two; x_swiglu, x_merge): the steps whose x
    rows a program computes at once, before its loop. split_fast: a one-axis grid, the K split fastest, with a
    split count that divides `sms` (`_mma_kernel`'s SPLIT_FAST: x rows shared in an SM's L1)."""
    n, k = w.out_features, w.in_features
    xf, sources = None, None if x_merge is None else x_merge.sources
    if x_merge is not None:
        p = x_merge
        if x2 is not None or x_swiglu is not None or p.rows != 1 or p.heads * p.head_dim != k:
            raise ValueError(f"x_merge (in place of x2): one row of attention partials, {k} channels")
        xf, x2 = p.ws, torch.empty(1, k, dtype=torch.float16, device=p.ws.device)  # x2: the scratch the kernel fills
    m = x2.shape[0]
    if x_swiglu is not None:
        if x_swiglu != torch.float16 or x2.shape != (1, 2 * k) or x2.dtype != torch.float32 or x2.stride(1) != 1:
            raise ValueError(f"x_swiglu: one row of float32 gate/up sums [1, {2 * k}], the input in float16")
        xf, x2 = x2, torch.empty(1, k, dtype=torch.float16, device=x2.device)  # x2: the scratch the kernel fills
    if not supports(x2, w) or x2.shape[1] != k:
        raise ValueError("mma_matmul needs an mma-layout weight without perm and contiguous, aligned fp16 x")
    if swiglu and m != 1:
        raise ValueError("the fused SwiGLU finish takes one row")
    if ahead not in range(5):
        raise ValueError(f"ahead is 0 to 4 steps, got {ahead}")
    if x_steps < 1 or x_steps & (x_steps - 1):
        raise ValueError(f"x_steps is a power of two, got {x_steps}")
    if add and (swiglu or y.dtype != torch.float32 or not y.is_contiguous() or y.shape != (m, n)):
        raise ValueError(f"add takes a contiguous float32 y [{m}, {n}], without swiglu")
    emulate = interpreting() or not x2.is_cuda
    tiles = n // 16
    if swiglu:
        CT = 2 * _column_tiles(tiles // 2, max(1, CT // 2))
    else:
        CT = _column_tiles(tiles, CT)
    spr, slabs = w.slabs_per_run, k // 64
    steps = slabs // spr
    groups = tiles // CT
    splits = max(1, min(steps, round(waves * sms / groups))) if split is None else split
    if split_fast and split is None:  # the divisor of sms nearest the count asked for
        splits = min((d for d in range(1, steps + 1) if sms % d == 0), key=lambda d: (abs(d - splits), d))
    per = -(-steps // splits)
    splits = -(-steps // per)
    num_warps = min(num_warps, CT * spr)  # at least 8 tile rows a warp, or Triton spreads lanes otherwise
    b = bias if bias is not None else w.scales
    xs = x2.view(torch.int32)
    for r0 in range(0, m, ROWS_PER_TILE * MAX_TILES):
        rows = min(m - r0, ROWS_PER_TILE * MAX_TILES)
        nt = 1 if rows <= 8 else 2 if rows <= 16 else 4
        ws = torch.empty(splits * rows * n if splits > 1 and not add else 1, dtype=torch.float32, device=x2.device)
        asm, constraints = _asm(nt)
        out = y[r0:r0 + rows]
        _mma_kernel[(groups * splits, 1) if split_fast else (groups, splits)](
            xs[r0:], w.qweight, w.scales.view(torch.int32), w.zeros.view(torch.int16), b, ws, w.locks, out,
            positions if positions is not None else w.locks, xf if xf is not None else b, x2,
            sources if sources is not None else w.locks, rows, n, x2.stride(0),
            slabs, per,
            CT=CT, SPR=spr, NT=nt, ASM=asm, CONSTRAINTS=constraints, HAS_BIAS=bias is not None,
            SP=triton.next_power_of_2(splits), FENCE=not emulate, SWIGLU=swiglu, HAS_POS=positions is not None,
            STAGES=1 if ahead else stages, PREFETCH=0 if emulate else prefetch, EMULATE=emulate,
            ADD=(3 if m > 1 else 2 if lanes else 1) if add else 0, AHEAD=ahead, XSW=ROUNDING[x_swiglu],
            XMG=x_merge.splits if x_merge else 0, XMG_DIM=x_merge.head_dim if x_merge else 0,
            XMG_STRIDE=x_merge.stride if x_merge else 0, XMG_N=x_merge.entries if x_merge else 0,
            XMG_PLACED=sources is not None, XSTEPS=x_steps, SPLIT_FAST=split_fast,
            num_warps=num_warps, **pdl_launch(x2))

