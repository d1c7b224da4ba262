"""A down_proj's input computed as its kernel loads it: silu(gate) * up of a fused w13's float32 sums, rounded as
`lowbit.kernels.norm_rope.silu_mul` (and torch's cast, silu, mul) round it.

Shared by the kernels that take one-row decode's down_proj (`lowbit.kernels.qmatmul`'s GEMV,
`lowbit.kernels.mma`), so that the SwiGLU between gate/up and down_proj needs no launch of its own.
"""

import torch
import triton
import triton.language as tl

ROUNDING = {None: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}  # codes: the dtype rounded to


@triton.jit
def round_to(v, R: tl.constexpr):
    """float32 v rounded to float16 (R 1), bfloat16 (2) or left as is (3): `ROUNDING`'s codes."""
    if R == 1:
        return v.to(tl.float16).to(tl.float32)
    elif R == 2:
        return v.to(tl.bfloat16).to(tl.float32)
    else:
        return v


@triton.jit
def swiglu_at(x_ptr, src, ok, K, R: tl.constexpr):
    """silu(gate[src]) * up[src] in float32 (ok False: 0), x holding float32 gate sums then up sums [2K], each
    rounded where torch rounds silu-then-mul in `ROUNDING` code R's dtype."""
    g = round_to(tl.load(x_ptr + src, mask=ok, other=0.0), R)
    u = round_to(tl.load(x_ptr + K + src, mask=ok, other=0.0), R)
    return round_to(round_to(g / (1.0 + tl.exp(-g)), R) * u, R)
