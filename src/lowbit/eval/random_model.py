"""Random-weight models of the published LLaMA shapes, built straight on the GPU, for benchmarks.

Owns the shape table (`SHAPES`), the weight variants a benchmark compares (`VARIANTS`: fp16, GPTQ at
several bit widths, torch's int4 tinygemm) and `random_model`, which fills a Transformer of that shape with
random values of the right kind: float weights, GPTQ-packed tensors run through the normal QuantLinear
backend choice, or tinygemm's packed int4. Nothing is downloaded and nothing is written to disk; the
numbers a benchmark gets are the speed of the weights' format, not of any trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.config import ModelConfig, QuantConfig
from lowbit.errors import LowbitError
from lowbit.model.linear import FloatLinear, QuantLinear, pick_backend
from lowbit.model.llama import Transformer
from lowbit.quant import pack


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, context: int) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=context, rms_norm_eps=1e-6)


SHAPES = {
    "llama-7b": _llama(4096, 11008, 32, 32, 32, 2048),
    "llama-13b": _llama(5120, 13824, 40, 40, 40, 2048),
    "llama-65b": _llama(8192, 22016, 80, 64, 64, 2048),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 4096),
}


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    quant: QuantConfig | None = None  # GPTQ-packed linears
    tinygemm: bool = False  # torch's _weight_int4pack_mm (4-bit, group 128, bfloat16 activations)


VARIANTS = {v.name: v for v in (
    Variant("fp16", torch.float16),
    Variant("gptq-4bit-g128", torch.float16, QuantConfig(bits=4, group_size=128)),
    Variant("gptq-4bit-g128-act", torch.float16, QuantConfig(bits=4, group_size=128, desc_act=True, sym=False)),
    Variant("gptq-8bit-g128", torch.float16, QuantConfig(bits=8, group_size=128)),
    Variant("gptq-3bit-g128", torch.float16, QuantConfig(bits=3, group_size=128)),
    Variant("torch-int4-tinygemm", torch.bfloat16, tinygemm=True),
)}


class TinyGemmLinear(nn.Module):
    """y = x @ W.T through `aten._weight_int4pack_mm` (gpt-fast's int4 path): a baseline, not a backend."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, group_size: int = 128):
        super().__init__()
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, device=device)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(packed, 8))
        scales = torch.rand(in_features // group_size, out_features, 1, device=device) / (8 * math.sqrt(in_features))
        zeros = torch.zeros_like(scales)
        self.register_buffer("scales_zeros", torch.cat((scales, zeros), dim=2).to(torch.bfloat16))
        self.group_size, self.out_features = group_size, out_features

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group_size,
                                               self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features)


def random_model(shape: ModelConfig, variant: Variant, device: torch.device, seed: int = 0) -> Transformer:
    """A Transformer of `shape` with random weights of `variant`'s kind, on `device`, ready to run."""
    torch.manual_seed(seed)

    def make_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if variant.quant is not None:
            return QuantLinear(in_features, out_features, bias, variant.quant)
        if variant.tinygemm:
            return _Pending(in_features, out_features)
        return FloatLinear(in_features, out_features, bias=bias)

    _check_fits(shape, variant, device)
    with torch.device("meta"):
        model = Transformer(shape, make_linear).to(variant.dtype)
    model.to_empty(device=device)  # in variant.dtype from the start: no float32 copies at load, as a real load
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
        model.rotary = type(model.rotary)(shape).to(device)  # computed in float32, not random
        for m in model.modules():
            if isinstance(m, QuantLinear):
                _fill_gptq(m)
    if variant.quant is not None:
        backend = pick_backend(variant.quant, device, variant.dtype, dense_fits=False)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.use_backend(backend, variant.dtype)
    if variant.tinygemm:
        _swap_tinygemm(model, device)
    return model.eval()


class _Pending(nn.Module):
    """Stands in for a tinygemm linear until the model is on its device."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features


def _check_fits(shape: ModelConfig, variant: Variant, device: torch.device) -> None:
    bits = 16 if variant.quant is None and not variant.tinygemm else 4 if variant.tinygemm else variant.quant.bits
    need = shape.num_params * bits / 8 + 2 * shape.vocab_size * shape.hidden_size * 2
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    if need > 0.95 * free:
        raise LowbitError(f"{variant.name} weights need {need / 1e9:.1f} GB; {free / 1e9:.1f} GB are free")


def _fill_gptq(m: QuantLinear) -> None:
    """Random codes and zero points, scales that keep activations O(1), act-order's shuffled g_idx."""
    q = m.quant
    m.qweight.random_(-(1 << 31), (1 << 31) - 1)
    m.qzeros.random_(-(1 << 31), (1 << 31) - 1)
    if q.sym:  # every zero point 2^(bits-1), as symmetric GPTQ stores it (minus one in v1)
        zeros = torch.full((m.scales.shape[0], m.out_features), 1 << (q.bits - 1), dtype=torch.int32,
                           device=m.qzeros.device)
        m.qzeros.copy_(pack.pack_cols(zeros - (1 if q.checkpoint_format == "gptq" else 0), q.bits))
    m.scales.uniform_(0.5, 1.5).mul_(2.0 / ((1 << q.bits) * math.sqrt(m.in_features)))
    g_idx = pack.default_g_idx(m.in_features, q.group_size).to(m.g_idx.device)
    if q.desc_act:
        g_idx = g_idx[torch.randperm(m.in_features, device=g_idx.device)]
    m.g_idx.copy_(g_idx)
    if m.bias is not None:
        m.bias.zero_()


def _swap_tinygemm(model: Transformer, device: torch.device) -> None:
    for block in model.layers:
        for parent in (block.attention, block.mlp):
            for attr, child in list(parent.named_children()):
                if isinstance(child, _Pending):
                    if child.in_features % 128:
                        raise LowbitError(f"tinygemm needs in_features divisible by 128, got {child.in_features}")
                    setattr(parent, attr, TinyGemmLinear(child.in_features, child.out_features, device))


def decode_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every linear's stored weight and lm_head (one embedding row)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel_weight is not None:
            w = m.kernel_weight
            total += sum(t.numel() * t.element_size() for t in (w.qweight, w.qhigh, w.scales, w.zeros) if t is not None)
        elif isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.qzeros, m.scales))
        elif isinstance(m, TinyGemmLinear):
            total += m.packed.numel() * m.packed.element_size() + m.scales_zeros.numel() * 2
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
