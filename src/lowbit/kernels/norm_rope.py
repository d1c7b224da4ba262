"""Triton kernels for the model's small ops: RMSNorm (optionally fused with the residual add), RoPE, SiLU*up.

Each replaces several torch launches with one, which is what a CUDA-graph decode step pays for (one launch
costs about a microsecond on an H100 whatever its size). Same rounding points as the torch references in
`lowbit.kernels.reference` (they are the spec); `lowbit.kernels.ops` picks between the two by device.
Tensors in, tensors out; rows are the leading dims flattened, the feature dim is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.swiglu_load import ROUNDING, swiglu_at
from lowbit.kernels.sync import pdl_launch, release_next, trace, wait_previous


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, src_ptr, D, eps,
                     HAS_RES: tl.constexpr, HAS_SRC: tl.constexpr, ROUND_TO_Y: tl.constexpr, BLOCK: tl.constexpr,
                     SLICE: tl.constexpr, PDL: tl.constexpr):
    """y = w * (h / rms(h)) with h = x (+ r, written to h_ptr), h / rms(h) rounded to x's dtype (ROUND_TO_Y:
    y's); HAS_SRC: column j of y holds channel src[j] (the next linear's act-order). Program (row, s) sums the
    whole row and writes its slice s of SLICE columns: a decode step has a row or a few, and one program a row
    left its work to a single SM."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * SLICE + tl.arange(0, SLICE)
    mine = cols < D
    src = tl.load(src_ptr + cols, mask=mine, other=0) if HAS_SRC else cols  # constants: before the wait
    w = tl.load(w_ptr + src, mask=mine, other=0.0).to(tl.float32)
    release_next(PDL)
    wait_previous(PDL)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0)
    if HAS_RES:
        x = x + tl.load(r_ptr + row * D + offs, mask=ok, other=0.0)  # rounded to x's dtype, as torch's add
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    if HAS_RES:  # this program's slice of h, in channel order
        hs = tl.load(x_ptr + row * D + cols, mask=mine, other=0.0) + tl.load(r_ptr + row * D + cols, mask=mine,
                                                                              other=0.0)
        tl.store(h_ptr + row * D + cols, hs, mask=mine)
    xs = tl.load(x_ptr + row * D + src, mask=mine, other=0.0)  # the slice's channels again (cache hits)
    if HAS_RES:
        xs = xs + tl.load(r_ptr + row * D + src, mask=mine, other=0.0)
    if ROUND_TO_Y:
        n = (xs.to(tl.float32) * inv).to(y_ptr.dtype.element_ty).to(tl.float32)
    else:
        n = (xs.to(tl.float32) * inv).to(xs.dtype).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mine)
    trace(2)


NORM_PROGRAMS = 256  # split rows into slices while there are fewer programs than this (about 2 per SM)
MIN_SLICE = 256


def norm_slices(rows: int, d: int) -> int:
    """Slices per row (a power of two, each >= MIN_SLICE channels, none empty) so a few rows fill the GPU."""
    slices, block = 1, triton.next_power_of_2(d)
    while (rows * slices < NORM_PROGRAMS and block // (2 * slices) >= MIN_SLICE
           and triton.cdiv(d, block // (2 * slices)) == 2 * slices):
        slices *= 2
    return slices


def _check_sources(sources: Tensor | None, d: int) -> None:
    if sources is not None and (sources.shape != (d,) or sources.dtype != torch.int32):
        raise ValueError(f"sources must be int32 [{d}], got {sources.dtype} {tuple(sources.shape)}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
             sources: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """x [..., D] -> RMSNorm(x); with `residual`: (RMSNorm(x + residual), x + residual). sources (int32 [D], a
    permutation): column j of the norm holds channel sources[j] (`ChannelOrder.sources`). dtype: the norm's
    dtype and rounding point (default: x's, the weight's if wider), as a float32 residual stream needs."""
    _check_sources(sources, x.shape[-1])
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=dtype or torch.promote_types(weight.dtype, x.dtype), device=x.device)
    h = torch.empty_like(x) if residual is not None else y
    r = residual.reshape(-1, d).contiguous() if residual is not None else x2
    block = triton.next_power_of_2(d)
    if rows:
        slices = norm_slices(rows, d)
        src = sources if sources is not None else weight
        _rms_norm_kernel[(rows, slices)](x2, r, weight, y, h, src, d, eps,
                                         HAS_RES=residual is not None, HAS_SRC=sources is not None,
                                         ROUND_TO_Y=dtype is not None, BLOCK=block, SLICE=block // slices,
                                         num_warps=8 if block >= 4096 else 4, **pdl_launch(x))
    return y if residual is None else (y, h)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, T, n_rot, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                 HALF, BH: tl.constexpr, BHALF: tl.constexpr, PDL: tl.constexpr):
    """Rotate heads [0, n_rot) of row (b, t) in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    release_next(PDL)
    wait_previous(PDL)
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    i = tl.arange(0, BHALF)
    ok = (heads < n_rot)[:, None] & (i < HALF)[None, :]
    cs = b.to(tl.int64) * stride_cb + t * stride_ct + i
    c = tl.load(cos_ptr + cs, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + cs, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + b.to(tl.int64) * stride_xb + t * stride_xt + heads[:, None] * stride_xh + i[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    a, z = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (a * c - z * s).to(x1.dtype), mask=ok)
    tl.store(base + HALF, (z * c + a * s).to(x1.dtype), mask=ok)


def rope_(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int) -> Tensor:
    """x [B, T, heads, D] (D contiguous), cos/sin [B, T, D]: rotate heads [0, n_rot) in place; returns x."""
    B, T, _, D = x.shape
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rope_ needs the head dim contiguous and cos/sin of one layout")
    bh = min(16, triton.next_power_of_2(n_rot))
    if B * T and n_rot:
        _rope_kernel[(B * T, triton.cdiv(n_rot, bh))](
            x, cos, sin, T, n_rot, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
            D // 2, BH=bh, BHALF=triton.next_power_of_2(D // 2), num_warps=4, **pdl_launch(x))
    return x


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, src_ptr, I, R: tl.constexpr, HAS_SRC: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    """y[r] = silu(x[r, :I]) * x[r, I:] in y's dtype (`swiglu_at` with its ROUNDING code R: x rounded to it first,
    silu rounded before the product, as torch's x.to(dtype), silu, then mul); HAS_SRC: column j holds channel
    src[j]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    src = tl.load(src_ptr + offs, mask=ok, other=0) if HAS_SRC else offs  # constants: before the wait
    release_next(PDL)
    wait_previous(PDL)
    y = swiglu_at(x_ptr + row * 2 * I, src, ok, I, R)
    tl.store(y_ptr + row * I + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(x: Tensor, sources: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """[..., 2I] -> silu(x[..., :I]) * x[..., I:]; sources (int32 [I]): column j holds channel sources[j].
    dtype: the output's, x rounded to it first (float32 gate/up sums in, float16 out: no cast launch)."""
    i = x.shape[-1] // 2
    _check_sources(sources, i)
    x2 = x.reshape(-1, 2 * i).contiguous()
    y = torch.empty(*x.shape[:-1], i, dtype=dtype or x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(i))
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(i, block))](
            x2, y, sources if sources is not None else x2, i, R=ROUNDING[y.dtype], HAS_SRC=sources is not None,
            BLOCK=block, num_warps=4, **pdl_launch(x))
    return y
