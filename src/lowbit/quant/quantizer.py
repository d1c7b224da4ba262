"""Uniform integer quantization of weight groups: scale/zero search, fake-quantization and round-to-nearest.

Owns the min-max search of GPTQ-for-LLaMa / AutoGPTQ `Quantizer.find_params` (per row of a group of
columns; symmetric or asymmetric; optional MSE shrink search), the code <-> value maps, the `QuantResult`
every quantizer returns, and `rtn`, the Hessian-free baseline. GPTQ itself lives in `quant/gptq.py` and the
bit packing in `quant/pack.py`.

Scales are rounded to float16 as soon as they are found, because that is what a GPTQ checkpoint stores:
codes are chosen against the scale the file will hold, so scale * (code - zero) computed in float32 equals
the checkpoint's dequantized weight bit for bit. (The references keep float32 scales and let the packer
re-round the weight against the fp16 scale afterwards.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_FP16_MIN = 2.0 ** -24  # smallest positive (subnormal) float16; smaller scales would be stored as 0
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantResult:
    """One quantized linear layer, ready for `pack.pack(codes, zeros, scales, g_idx, bits, fmt)`.

    codes  uint8   [K, N]  on-disk orientation (transposed nn.Linear weight), in [0, 2^bits)
    zeros  int32   [G, N]  true zero points (sym: 2^(bits-1))
    scales float16 [G, N]
    g_idx  int32   [K]     group of each input column
    loss   float           the quantizer's error (GPTQ: sum of ((w - q) / Hinv_kk)^2 / 2, as the references
                           report it; RTN: sum of (w - q)^2)
    damp_used float        relative dampening that made H invertible (fraction of mean(diag H)); 0 for RTN
    W_q    float32 [N, K]  dequantized weight, equal to the checkpoint's dequantized weight in float32
    """

    codes: Tensor
    zeros: Tensor
    scales: Tensor
    g_idx: Tensor
    loss: float
    damp_used: float
    W_q: Tensor


def to_storage_scale(scale: Tensor) -> Tensor:
    """Round float32 scales to the nearest float16 value (kept in float32), never to 0 or inf."""
    return scale.clamp(_FP16_MIN, _FP16_MAX).to(torch.float16).to(scale.dtype)


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes clamp(round(x / scale) + zero, 0, maxq) as float values; scale and zero broadcast against x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """x rounded onto the grid scale * (code - zero): the value the checkpoint will dequantize to."""
    return scale * (quantize_codes(x, scale, zero, maxq) - zero)


def _minmax(x: Tensor, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row range [xmin, xmax] that always contains 0; all-zero rows get [-1, 1] as in the references.

    sym: [-max|x|, max|x|] for every row. (The references leave xmin = 0 for a row with no negative
    entry, which halves its scale and clips its upper half; we do not reproduce that.)
    """
    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1).values, zero)
    xmax = torch.maximum(x.max(1).values, zero)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    return xmin.masked_fill(empty, -1.0), xmax.masked_fill(empty, 1.0)


def _params(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    scale = to_storage_scale((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def find_params(x: Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100,
                maxshrink: float = 0.8, norm: float = 2.4) -> tuple[Tensor, Tensor]:
    """x float [R, C] (R rows of weights, C columns of one group) -> (scale [R], zero [R]), float32.

    scale is float16-exact and zero integer-valued. sym: zero = 2^(bits-1), scale = 2 max|x| / maxq;
    asym: scale = (xmax - xmin) / maxq over a range stretched to contain 0, zero = round(-xmin / scale).
    mse: also try the range shrunk by p = 1, 0.99, ..., 1 - (grid*maxshrink - 1)/grid and keep, per row,
    the first p with the least sum |fake_quantize(x) - x|^norm (AutoGPTQ's grid search).
    """
    x = x.float()
    maxq = (1 << bits) - 1
    xmin, xmax = _minmax(x, sym)
    scale, zero = _params(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale1, zero1 = _params(p * xmin, p * xmax, maxq, sym)
        err = (fake_quantize(x, scale1[:, None], zero1[:, None], maxq) - x).abs_().pow_(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1, scale)
        zero = torch.where(better, zero1, zero)
    return scale, zero


def rtn(W: Tensor, bits: int, group_size: int, sym: bool, mse: bool = False) -> QuantResult:
    """Round-to-nearest: W [N, K] quantized group by group along K, no Hessian, no error feedback."""
    k = W.shape[1]
    step = k if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    W = W.float()
    scales, zeros, codes = [], [], []
    for g0 in range(0, k, step):
        group = W[:, g0:g0 + step]
        scale, zero = find_params(group, bits, sym, mse)
        scales.append(scale)
        zeros.append(zero)
        codes.append(quantize_codes(group, scale[:, None], zero[:, None], maxq))
    S, Z, C = torch.stack(scales), torch.stack(zeros), torch.cat(codes, 1)
    g_idx = torch.arange(k, device=W.device) // step
    W_q = (C - Z.t()[:, g_idx]) * S.t()[:, g_idx]
    return QuantResult(
        codes=C.t().to(torch.uint8).contiguous(),
        zeros=Z.to(torch.int32),
        scales=S.to(torch.float16),
        g_idx=g_idx.to(torch.int32),
        loss=float(((W - W_q) ** 2).sum()),
        damp_used=0.0,
        W_q=W_q,
    )
