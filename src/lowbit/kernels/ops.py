"""The model's small ops, each run by its Triton kernel on CUDA and by its torch reference elsewhere.

The model calls these (like `F.scaled_dot_product_attention`, which also picks a kernel by device); the
Triton modules are imported only when a CUDA tensor arrives, so a CPU-only install never needs Triton.
References: `lowbit.kernels.reference`; kernels: `lowbit.kernels.norm_rope`.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from lowbit.kernels import reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _fused(x: Tensor):
    """The Triton kernel module when x lives on a CUDA device and Triton is installed, else None."""
    if x.is_cuda and _HAS_TRITON:
        from lowbit.kernels import norm_rope

        return norm_rope
    return None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    k = _fused(x)
    return k.rms_norm(x, weight, eps) if k else reference.rms_norm_reference(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual), x + residual) in one pass."""
    k = _fused(x)
    if k:
        return k.rms_norm(x, weight, eps, residual)
    h = x + residual
    return reference.rms_norm_reference(h, weight, eps), h


def rope(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int) -> Tensor:
    """x [B, T, heads, D] with heads [0, n_rot) rotated. On CUDA x is rotated in place (callers own x)."""
    k = _fused(x)
    return k.rope_(x, cos, sin, n_rot) if k else reference.rope_reference(x, cos, sin, n_rot)


def silu_mul(x: Tensor) -> Tensor:
    k = _fused(x)
    return k.silu_mul(x) if k else reference.silu_mul_reference(x)
