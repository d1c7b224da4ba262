"""Linear layers for GPTQ-packed weights: `QuantLinear` and the rules for fusing several into one.

QuantLinear keeps the checkpoint's tensors (qweight/qzeros/scales/g_idx) as buffers and declares what it
supports, so faster kernels can be chosen from those declarations. Its forward is the torch reference:
dequantize group-wise, then matmul; it runs on any device. The format itself lives in `lowbit.quant.pack`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.config import QuantConfig
from lowbit.quant import pack


BACKENDS = ("reference", "dense")


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + b for one GPTQ-packed weight.

    Backends: "reference" dequantizes on every call (least memory, any device); "dense" keeps the
    dequantized weight in the compute dtype (CPU speed at float memory cost). The checkpoint's tensors
    stay the source of truth either way.
    """

    SUPPORTS_BITS = pack.SUPPORTED_BITS
    SUPPORTS_FORMATS = pack.FORMATS
    SUPPORTS_DESC_ACT = True
    SUPPORTS_ASYM = True
    SUPPORTS_DEVICES = ("cpu", "cuda")

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        bits, groups = quant.bits, pack.num_groups(in_features, quant.group_size)
        self.register_buffer("qweight", torch.empty(pack.packed_words(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, pack.packed_words(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)
        self.backend = "reference"
        self.dense_weight: Tensor | None = None

    def use_backend(self, backend: str, dtype: torch.dtype) -> None:
        """Switch how forward computes; called once after the weights are loaded."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown QuantLinear backend {backend!r}")
        self.dense_weight = self.dequantize(dtype) if backend == "dense" else None
        self.backend = backend

    @property
    def tensors(self) -> pack.GPTQTensors:
        return pack.GPTQTensors(self.qweight, self.qzeros, self.scales, self.g_idx, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Float weight [out_features, in_features], computed in `dtype` (default: the scales' dtype)."""
        return pack.dequantize(self.tensors, self.quant.bits, self.quant.checkpoint_format, self.in_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dense_weight if self.dense_weight is not None else self.dequantize(x.dtype)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        q = self.quant
        return (f"in={self.in_features}, out={self.out_features}, bits={q.bits}, group_size={q.group_size}, "
                f"desc_act={q.desc_act}, sym={q.sym}, format={q.checkpoint_format}, backend={self.backend}")


class ConcatLinear(nn.Module):
    """Several linears over the same input whose outputs are concatenated.

    Used for q/k/v or gate/up when the parts cannot share one packed tensor (different g_idx).
    """

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def canonical(t: pack.GPTQTensors, bits: int) -> pack.GPTQTensors:
    """Re-pack words whose count differs from ours (writers pad odd widths differently); values unchanged."""
    k, n = t.g_idx.numel(), t.scales.shape[1]
    qweight, qzeros = t.qweight, t.qzeros
    if qweight.shape[0] != pack.packed_words(k, bits):
        qweight = pack.pack_rows(pack.unpack_rows(qweight, bits, k), bits)
    if qzeros.shape[1] != pack.packed_words(n, bits):
        qzeros = pack.pack_cols(pack.unpack_cols(qzeros, bits, n), bits)
    return pack.GPTQTensors(qweight, qzeros, t.scales, t.g_idx, t.bias)


def fuse_gptq(parts: Sequence[pack.GPTQTensors], bits: int) -> pack.GPTQTensors | None:
    """Concatenate GPTQ tensors along the output axis, or None when the parts disagree on g_idx."""
    first = parts[0]
    if any(not torch.equal(p.g_idx, first.g_idx) for p in parts[1:]):
        return None
    if len(parts) == 1:
        return canonical(first, bits)
    zeros = [pack.unpack_cols(p.qzeros, bits, p.scales.shape[1]) for p in parts]
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(p.scales.shape[1], dtype=p.scales.dtype)
                          for b, p in zip(biases, parts)])
    return pack.GPTQTensors(
        qweight=torch.cat([canonical(p, bits).qweight for p in parts], dim=1),
        qzeros=pack.pack_cols(torch.cat(zeros, dim=1), bits),
        scales=torch.cat([p.scales for p in parts], dim=1),
        g_idx=first.g_idx,
        bias=bias,
    )
