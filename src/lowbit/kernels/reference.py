"""Torch references for the kernels in this package: slow, obvious, and run on any device.

Owns `unpack_layout` / `dequant_reference` / `qmatmul_reference` for both `QWeight` layouts of
`lowbit.kernels.layout` (read through its fields and decoded here independently of the packing code), and the model's small
ops (RMSNorm, RoPE, SiLU-and-multiply, attention) that `lowbit.kernels.ops` runs off CUDA. Tests compare every
kernel with these, and these with the GPTQ on-disk dequantization of `lowbit.quant.pack`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from lowbit.kernels.layout import QWeight

SLOT = 16


def _unpack_fields(words: Tensor, width: int, fields: int) -> Tensor:
    """int words [Kp/fields, N] -> codes int64 [Kp, N]: field j of word (b, w) is row 16*fields*b + 16j + w."""
    n = words.shape[1]
    w = words.to(torch.int64).view(-1, 1, SLOT, n)
    shifts = (torch.arange(fields, device=words.device) * width).view(1, fields, 1, 1)
    return ((w >> shifts) & ((1 << width) - 1)).view(-1, n)


def _unpack_mma(words: Tensor, kp: int, n: int) -> Tensor:
    """"mma" words [N/16, 2Kp] -> codes int64 [Kp, N]: word (ct, slab s, lane 4g + t, p) holds rows
    64s + 16t + 4p + h of columns 16ct + g (ab = 0) and 16ct + 8 + g (ab = 1) at nibble ab + 2*(h//2) + 4*(h%2)."""
    w = words.to(torch.int64).view(n // 16, kp // 64, 8, 4, 4)  # ct, slab, g, t, p
    codes = torch.empty(n // 16, kp // 64, 8, 4, 4, 4, 2, dtype=torch.int64, device=words.device)
    for h in range(4):
        for ab in range(2):
            codes[..., h, ab] = (w >> (4 * (ab + 2 * (h // 2) + 4 * (h % 2)))) & 15
    return codes.permute(1, 3, 4, 5, 0, 6, 2).reshape(kp, n)  # (slab, t, p, h) rows, (ct, ab, g) columns


def _natural_columns(t: Tensor) -> Tensor:
    """"mma" scales/zeros [R, N] (position 2g + ab of each 16-tile holds column 8ab + g) -> column order."""
    r, n = t.shape
    return t.reshape(r, n // 16, 8, 2).transpose(2, 3).reshape(r, n)


def unpack_layout(w: QWeight) -> tuple[Tensor, Tensor]:
    """-> (codes int64 [Kp, N] in packed row order, the scales/zeros row (run) of each packed row [Kp])."""
    if w.layout == "mma":
        codes = _unpack_mma(w.qweight, w.padded_rows, w.out_features)
    elif w.bits == 3:
        codes = _unpack_fields(w.qweight, 2, 16) | (_unpack_fields(w.qhigh, 1, 16) << 2)
    else:
        codes = _unpack_fields(w.qweight, w.bits, 32 // w.bits)
    return codes, torch.arange(codes.shape[0], device=codes.device) // (SLOT * w.group_slots)


def dequant_reference(w: QWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [K, N] in input-channel order: W[k, n] = (q - z[g]) * s[g], computed in float32, rounded once."""
    codes, group = unpack_layout(w)
    scales, zeros = (w.scales, w.zeros) if w.layout != "mma" else map(_natural_columns, (w.scales, w.zeros))
    s = scales.float()[group]
    z = zeros.float()[group]
    rows = (codes.float() - z) * s
    k = w.in_features
    src = torch.arange(rows.shape[0], device=rows.device) if w.perm is None else w.perm.long()
    keep = (src >= 0) & (src < k)
    out = torch.zeros(k, rows.shape[1], dtype=torch.float32, device=rows.device)
    out[src[keep]] = rows[keep]
    return out.to(dtype)


def qmatmul_reference(x: Tensor, w: QWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> x @ W + bias [..., N], accumulated in float64 from W in x's dtype, returned in x's dtype."""
    W = dequant_reference(w, x.dtype).double()
    y = x.double() @ W
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- the model's small ops


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype | None = None) -> Tensor:
    """weight * x / rms(x), the mean taken in float32 and the normalized x rounded to x's dtype first (HF);
    dtype: rounded to that instead, and the result in it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if dtype is None:
        return weight * xf.to(x.dtype)
    return (weight * xf.to(dtype)).to(dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int) -> Tensor:
    """x [B, T, heads, D]; cos/sin [B, T, D] (half-split layout): heads [0, n_rot) rotated, the rest kept."""
    rot = x[:, :, :n_rot]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return torch.cat((out, x[:, :, n_rot:]), dim=2)


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """[..., 2I] -> silu(gate) * up [..., I] (gate first, as the fused w13 stores them)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def sdpa_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q [B, H, T, D], k/v [B, KV, S, D] (KV divides H) -> [B, H, T, D]; mask [B, 1, T, S] bool, None = causal."""
    if k.shape[1] != q.shape[1]:  # GQA: each kv head serves H / KV query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
