"""Uniform integer quantization of weight groups: scale/zero search, fake-quantization and round-to-nearest.

Owns the min-max search of GPTQ-for-LLaMa / AutoGPTQ `Quantizer.find_params` (per row of a group of
columns; symmetric or asymmetric; optional MSE shrink search), the code <-> value maps, the `QuantResult`
every quantizer returns, and `rtn`, the Hessian-free baseline. GPTQ itself lives in `quant/gptq.py` and the
bit packing in `quant/pack.py`.

Asymmetric zero points can be held to [zero_min, maxq]: the v1 "gptq" format stores z - 1 and cannot hold
z = 0, which min-max gives a group with no (noticeably) negative weight. With zero_min = 1 such a row gets
z = 1 and the scale xmax / (maxq - 1), a grid [-s, (maxq - 1) s] that still spans its range.

Scales are rounded to float16 as soon as they are found, because that is what a GPTQ checkpoint stores:
codes are chosen against the scale the file will hold, so scale * (code - zero) computed in float32 equals
the checkpoint's dequantized weight bit for bit. (The references keep float32 scales and let the packer
re-round the weight against the fp16 scale afterwards.)
"""

from __future__ import annotations

import dataclasses
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

    `W_q` (float32 [N, K], the dequantized weight, equal to the checkpoint's dequantized weight in float32)
    is computed on each access rather than stored: a 65B layer's would hold 3 GB of device memory.
    """

    codes: Tensor
    zeros: Tensor
    scales: Tensor
    g_idx: Tensor
    loss: float
    damp_used: float

    @property
    def W_q(self) -> Tensor:
        return dequantize_codes(self.codes, self.scales, self.zeros, self.g_idx)


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, chunk: int = 1024) -> Tensor:
    """codes [K, N], scales/zeros [G, N], g_idx [K] -> float32 [N, K] = (code - zero) * scale.

    The float32 operations of `fake_quantize`, so the values equal those the quantizers worked with; built
    `chunk` input rows at a time to bound the temporaries.
    """
    k, n = codes.shape
    W_q = torch.empty(n, k, dtype=torch.float32, device=codes.device)
    scales, zeros = scales.float(), zeros.float()
    for r in range(0, k, chunk):
        g = g_idx[r:r + chunk].long()
        W_q[:, r:r + chunk] = ((codes[r:r + chunk].float() - zeros[g]) * scales[g]).t()
    return W_q


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


def _params(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool, zero_min: int = 0) -> tuple[Tensor, Tensor]:
    scale = to_storage_scale((xmax - xmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    low = zero < zero_min  # see the module docstring; xmin > -scale/2 here, inside the new grid
    if zero_min and bool(low.any()):
        scale = torch.where(low, to_storage_scale(xmax / (maxq - zero_min)), scale)
        zero = zero.clamp(min=zero_min)
    return scale, zero


def find_params(x: Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100,
                maxshrink: float = 0.8, norm: float = 2.4, zero_min: int = 0) -> tuple[Tensor, Tensor]:
    """x float [R, C] (R rows of weights, C columns of one group) -> (scale [R], zero [R]), float32.

    scale is float16-exact and zero integer-valued. sym: zero = 2^(bits-1), scale = 2 max|x| / maxq;
    asym: scale = (xmax - xmin) / maxq over a range stretched to contain 0, zero = round(-xmin / scale)
    held to >= zero_min (module docstring). mse: also try the range shrunk by p = 1, 0.99, ...,
    1 - (grid*maxshrink - 1)/grid and keep, per row, the first p with the least sum |fake_quantize(x) - x|^norm
    (AutoGPTQ's grid search).
    """
    x = x.float()
    maxq = (1 << bits) - 1
    xmin, xmax = _minmax(x, sym)
    scale, zero = _params(xmin, xmax, maxq, sym, zero_min)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale1, zero1 = _params(p * xmin, p * xmax, maxq, sym, zero_min)
        err = (fake_quantize(x, scale1[:, None], zero1[:, None], maxq) - x).abs_().pow_(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1, scale)
        zero = torch.where(better, zero1, zero)
    return scale, zero


def group_params(W: Tensor, group_size: int, bits: int, sym: bool, mse: bool = False, zero_min: int = 0
                 ) -> tuple[Tensor, Tensor]:
    """find_params for every group of columns of W [N, K] at once -> (scales, zeros) float32 [G, N].

    The whole groups are one [N*G, group_size] batch of rows (the MSE search then costs one pass over W per
    grid point instead of one per group and grid point); a partial last group is searched on its own.
    """
    n, k = W.shape
    gs = k if group_size == -1 else group_size
    full = k // gs
    scales, zeros = [], []
    if full:
        rows = W[:, :full * gs].reshape(n * full, gs)
        s, z = find_params(rows, bits, sym, mse, zero_min=zero_min)
        scales.append(s.view(n, full).t())
        zeros.append(z.view(n, full).t())
    if k > full * gs:
        s, z = find_params(W[:, full * gs:], bits, sym, mse, zero_min=zero_min)
        scales.append(s[None])
        zeros.append(z[None])
    return torch.cat(scales).contiguous(), torch.cat(zeros).contiguous()


def rtn(W: Tensor, bits: int, group_size: int, sym: bool, mse: bool = False, zero_min: int = 0) -> QuantResult:
    """Round-to-nearest: W [N, K] quantized group by group along K, no Hessian, no error feedback."""
    k = W.shape[1]
    maxq = (1 << bits) - 1
    W = W.float()
    step = k if group_size == -1 else group_size
    S, Z = group_params(W, group_size, bits, sym, mse, zero_min)
    C = torch.empty_like(W)
    for g, g0 in enumerate(range(0, k, step)):
        C[:, g0:g0 + step] = quantize_codes(W[:, g0:g0 + step], S[g][:, None], Z[g][:, None], maxq)
    g_idx = torch.arange(k, device=W.device) // step
    result = QuantResult(
        codes=C.t().to(torch.uint8).contiguous(),
        zeros=Z.to(torch.int32),
        scales=S.to(torch.float16),
        g_idx=g_idx.to(torch.int32),
        loss=0.0,
        damp_used=0.0,
    )
    return dataclasses.replace(result, loss=float(((W - result.W_q) ** 2).sum()))
