"""SwiGLU's silu(gate) * up of a fused w13's sums, rounded where torch's cast, silu and mul round it.

One definition for every kernel that computes it: `lowbit.kernels.norm_rope.silu_mul` (its own launch) and the
kernels that take one-row decode's down_proj (`lowbit.kernels.gemv`, `lowbit.kernels.mma`), which
compute it as they load x, so that it needs no launch there.
"""

import torch
import triton
import triton.language as tl

ROUNDING = {None: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}  # codes: the dtype rounded to


@triton.jit
def round_to(v, R: tl.constexpr):
    """v rounded to float16 (R 1), bfloat16 (2) or float32 (3), `ROUNDING`'s codes, and held in float32."""
    if R == 1:
        return v.to(tl.float16).to(tl.float32)
    elif R == 2:
        return v.to(tl.bfloat16).to(tl.float32)
    else:
        return v.to(tl.float32)


@triton.jit
def swiglu_at(x_ptr, src, ok, K, R: tl.constexpr):
    """silu(gate[src]) * up[src] in float32 (ok False: 0), x holding gate values then up values [2K] (any float
    dtype), each rounded where torch rounds cast, silu, then mul in `ROUNDING` code R's dtype."""
    g = round_to(tl.load(x_ptr + src, mask=ok, other=0.0), R)
    u = round_to(tl.load(x_ptr + K + src, mask=ok, other=0.0), R)
    return round_to(round_to(g / (1.0 + tl.exp(-g)), R) * u, R)
