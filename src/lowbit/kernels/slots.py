"""Reading the "slots" layout (`lowbit.kernels.layout`) inside kernels: its packed fields as exact floats, and
the launch arguments every slots kernel shares. Used by the GEMV (`lowbit.kernels.gemv`), the tensor-core kernel
(`lowbit.kernels.dot`) and dequantization (`lowbit.kernels.dequant`).

Dequantization needs no integer-to-float conversion: a field moved to the top of a float32 mantissa and or-ed
with 1.0 is u = OFF + q/F exactly, and w = (q - z)*s = u*(F*s) - (OFF*F + z)*s is one exact FMA.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.layout import QWeight
from lowbit.kernels.sync import interpreting


@triton.jit
def field(words, hi, j: tl.constexpr, BITS: tl.constexpr):
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
def field_int(words, hi, j: tl.constexpr, BITS: tl.constexpr):
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
def pow2(e: tl.constexpr):
    """2.0**e as a float32 constant (|e| < 127)."""
    return tl.full((), (e + 127) << 23, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def sub_term(words, hi, xj, j: tl.constexpr, BITS: tl.constexpr, HIGH: tl.constexpr):
    """2^-38 * x * q for field j (HIGH: 3-bit's high bit j, counted as 4 * bit): the code is read as the
    float32 subnormal q * 2^(p - 149), left in place where it fits (one AND), and x is pre-scaled by
    2^(111 - p). Exact for float16 x, whose range keeps every product normal."""
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    if HIGH:
        v = hi & (1 << j)
        xs = xj * pow2(113 - j)
    elif LO * (j + 1) <= 23:
        v = words & (((1 << LO) - 1) << (LO * j))
        xs = xj * pow2(111 - LO * j)
    elif LO * (j + 1) == 32:
        v = (words.to(tl.uint32, bitcast=True) >> (32 - LO)).to(tl.int32, bitcast=True)
        xs = xj * pow2(111)
    else:
        v = (words >> 12) & (((1 << LO) - 1) << (LO * j - 12))
        xs = xj * pow2(123 - LO * j)
    return xs * v.to(tl.float32, bitcast=True)


def launch_args(w: QWeight, x2: Tensor, bias: Tensor | None):
    """(3-bit high bits, row map, bias, fence) as a slots kernel takes them: tensors stand in for absent ones
    (never read), and the split-K fence is off in the interpreter."""
    qh = w.qhigh if w.qhigh is not None else w.qweight
    perm = w.perm if w.perm is not None else w.slot_group
    b = bias if bias is not None else w.scales
    fence = x2.is_cuda and not interpreting()
    return qh, perm, b, fence
