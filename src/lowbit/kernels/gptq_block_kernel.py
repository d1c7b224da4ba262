"""The Triton kernel behind `lowbit.kernels.gptq_block` (its launcher, torch reference and docs live there).

Kept apart so that importing the GPTQ code never imports triton: this module is imported on first launch.
"""

import triton
import triton.language as tl


@triton.jit
def gptq_block_kernel(W, stride_wn, stride_wb, Hinv, stride_hi, stride_hj, S, Z, G, C, E, N, B, maxq,
                      BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: rows [pid*BLOCK_N, +BLOCK_N) of the block, its [BLOCK_N, B] slice held in registers."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    W1 = tl.load(W + rows64[:, None] * stride_wn + cols[None, :] * stride_wb,
                 mask=rmask[:, None] & (cols[None, :] < B), other=0.0)
    for i in range(B):
        w = tl.sum(tl.where(cols[None, :] == i, W1, 0.0), axis=1)  # column i, as updated so far
        g = tl.load(G + i).to(tl.int64)
        s = tl.load(S + g * N + rows64, mask=rmask, other=1.0)
        z = tl.load(Z + g * N + rows64, mask=rmask, other=0.0)
        x = tl.math.div_rn(w, s)  # IEEE division, as torch's; Triton's `/` is approximate
        # round half to even, torch.round's rule (libdevice's rint does not run in the interpreter)
        r = tl.floor(x)
        f = x - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
        c = tl.minimum(tl.maximum(r + z, 0.0), maxq)
        e = tl.math.div_rn(w - (c - z) * s, tl.load(Hinv + i * (stride_hi + stride_hj)))
        h = tl.load(Hinv + i * stride_hi + cols * stride_hj, mask=(cols >= i) & (cols < B), other=0.0)
        W1 -= e[:, None] * h[None, :]
        tl.store(C + i * N + rows64, c.to(tl.uint8), mask=rmask)
        tl.store(E + i * N + rows64, e, mask=rmask)
