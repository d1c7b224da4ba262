"""The model's small ops, each run by its Triton kernel on CUDA and by its torch reference elsewhere.

The model calls these (like `F.scaled_dot_product_attention`, which also picks a kernel by device); the
Triton modules are imported only when a CUDA tensor arrives, so a CPU-only install never needs Triton.
References: `lowbit.kernels.reference`; kernels: `lowbit.kernels.norm_rope`, `lowbit.kernels.argmax`.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowbit.kernels import reference
from lowbit.kernels.layout import place_channels

if TYPE_CHECKING:
    from lowbit.kernels.qmatmul import ChannelOrder

HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: callers ask every step


def _fused(x: Tensor):
    """The Triton kernel module when x lives on a CUDA device and Triton is installed, else None."""
    if x.is_cuda and HAS_TRITON:
        from lowbit.kernels import norm_rope

        return norm_rope
    return None


def _sources(order: ChannelOrder | None) -> Tensor | None:
    return None if order is None else order.sources


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1) (greedy decoding's pick): ties to the smallest index; on CUDA a NaN counts as +inf."""
    if x.is_cuda and HAS_TRITON:
        from lowbit.kernels.argmax import argmax as fused_argmax

        return fused_argmax(x)
    return x.argmax(-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float, order: ChannelOrder | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm(x), its channels in `order` when given (the order an act-order linear reads them in); dtype: the
    norm's dtype and rounding point (a float32 residual stream normalized for float16 linears)."""
    k = _fused(x)
    if k:
        return k.rms_norm(x, weight, eps, sources=_sources(order), dtype=dtype)
    return place_channels(reference.rms_norm_reference(x, weight, eps, dtype), order)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 order: ChannelOrder | None = None) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual) in `order` as `rms_norm`, x + residual) in one pass."""
    k = _fused(x)
    if k:
        return k.rms_norm(x, weight, eps, residual, _sources(order))
    h = x + residual
    return place_channels(reference.rms_norm_reference(h, weight, eps), order), h


def rope(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int) -> Tensor:
    """x [B, T, heads, D] with heads [0, n_rot) rotated. On CUDA x is rotated in place (callers own x)."""
    k = _fused(x)
    return k.rope_(x, cos, sin, n_rot) if k else reference.rope_reference(x, cos, sin, n_rot)


def silu_mul(x: Tensor, order: ChannelOrder | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """silu(gate) * up of [..., 2I] (gate first), its channels in `order` when given; in `dtype` (x rounded to
    it first, as x.to(dtype) would, in the same launch)."""
    k = _fused(x)
    if k:
        return k.silu_mul(x, _sources(order), dtype)
    return place_channels(reference.silu_mul_reference(x.to(dtype or x.dtype)), order)
