"""RMSNorm applied by the linear that reads it, with its 1/rms factored out to the kernel after.

In one-row decode a norm is its own launch: about 1.5-2.2 us of a 7B layer's 59 (two a layer; H100,
`benchmarks/trace_step.py`), for 8 KB of work. Since rms(h) is one number a row, W (w * h / rms(h)) =
(W (w * h)) / rms(h): the linear after the norm (q/k/v, gate/up) reads x = w * h in float16 as it loads its own
rows of h (`lowbit.kernels.mma`'s XNM; this module holds its contract and torch reference), one of its programs
writes 1/rms(h) (`rstd`), and whoever reads the linear's float32 sums multiplies them by it (decode attention its
q/k/v, down_proj's SwiGLU its gate/up) before rounding them. So no program waits for the whole row's sum, and the
norm's launch goes. The model takes this path with LOWBIT_NORM_LOAD=1 (`llama.Block.reads_norms`): it is built
for sm_90 and tested through Triton's interpreter, not yet run on a GPU.

Rounding differs from `reference.rms_norm_reference` (w * h rounded to float16 once, not h / rms(h) and then
its product with w): both round x once to float16, so the linear's result differs from the separate norm's by
float16 rounding. w * h must fit float16 (|w * h| < 65504), and models with massive activations come within a
few times of that: SmolLM2-135M-Instruct's largest |w * h| at a layer's norm is 14897 (|h| up to 25545; 2048 tokens
of the Python tutorial, 2026-12-07). Scaling x by the previous norm's 1/rms (the reader then multiplying by the
ratio) would keep it near the normalized range, if a model needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NormInput:
    """One row's RMSNorm for the linear after it: h (float32 [1, K], the residual stream), weight [K], eps, and
    rstd (float32, one value), where the linear's kernel writes 1/rms(h). sources (int32 [K]; an act-order
    linear's `layout.ChannelOrder.sources`): the linear reads channel sources[j] at column j, gathered as it loads."""

    h: Tensor
    weight: Tensor
    eps: float
    rstd: Tensor
    sources: Tensor | None = None

    def check(self, k: int) -> None:
        """Raises unless h is one contiguous float32 row of k channels with a weight of k and one rstd."""
        h, w, r = self.h, self.weight, self.rstd
        if h.dtype != torch.float32 or h.numel() != k or not h.is_contiguous():
            raise ValueError(f"a norm input takes one contiguous float32 row of {k} channels")
        if w.shape != (k,) or r.dtype != torch.float32 or r.numel() != 1 or not w.device == h.device == r.device:
            raise ValueError(f"a norm input needs a weight of {k} and one float32 rstd, on h's device")
        src = self.sources
        if src is not None and (src.dtype != torch.int32 or src.shape != (k,) or src.device != h.device):
            raise ValueError(f"a norm input's sources are {k} int32 channels, on h's device")

    def scaled(self) -> Tensor:
        """The torch reference of what the linear reads: float16 w * h [1, K], in `sources` order (also writes
        rstd)."""
        self.rstd.copy_(torch.rsqrt(self.h.pow(2).mean() + self.eps).view(self.rstd.shape))
        x = (self.weight.float() * self.h.view(1, -1)).to(torch.float16)
        return x if self.sources is None else x.index_select(1, self.sources)
