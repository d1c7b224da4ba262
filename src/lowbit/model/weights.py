"""Checkpoint translation: HF tensor names to ours as a table, fusing q/k/v and gate/up, float or GPTQ.

`load_model(path)` reads config.json and any quantization config, decides per linear whether it is float or
GPTQ-packed, builds the Transformer on the meta device with the right linear class, then streams tensors
one at a time from memory-mapped shards to the target device (peak host memory: one tensor, not the model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.config import ModelConfig, QuantConfig
from lowbit.errors import FormatError, LowbitError
from lowbit.model.linear import (
    ConcatLinear,
    FloatLinear,
    QuantLinear,
    canonical,
    fuse_gptq,
    pick_backend,
)
from lowbit.model.llama import Block, Transformer
from lowbit.model.source import TensorFiles, read_json, weight_files
from lowbit.quant import pack

log = logging.getLogger(__name__)

# Ours -> the HF modules whose outputs it concatenates, in order.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "mlp.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.w2": ("mlp.down_proj",),
}
LAYER_TENSORS = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
GLOBAL_TENSORS = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
LM_HEAD = "lm_head.weight"
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """What a folder holds, before any tensor is read."""

    folder: Path
    config: ModelConfig
    quant: QuantConfig | None
    tensors: TensorFiles
    prefix: str  # "model." in HF checkpoints; "" for bare LlamaModel dumps

    def hf_name(self, layer: int, module: str) -> str:
        return f"{self.prefix}layers.{layer}.{module}"


def open_checkpoint(folder: Path, allow_pickle: bool = False) -> Checkpoint:
    if folder.is_file():
        raise LowbitError(f"{folder}: expected a model folder (config.json + weights); got a file")
    raw = read_json(folder / "config.json")
    config = ModelConfig.from_hf(raw)
    tensors = TensorFiles(weight_files(folder, allow_pickle))
    prefix = "model." if f"model.{GLOBAL_TENSORS['tok_embeddings.weight']}" in tensors else ""
    return Checkpoint(folder, config, read_quant_config(folder, raw), tensors, prefix)


def read_quant_config(folder: Path, config_json: dict) -> QuantConfig | None:
    for name in QUANT_CONFIG_FILES:
        if (folder / name).exists():
            return QuantConfig.from_dict(read_json(folder / name))
    if "quantization_config" in config_json:
        return QuantConfig.from_dict(config_json["quantization_config"])
    return None


def load_model(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               allow_pickle: bool = False, progress: bool = False, backend: str = "auto"
               ) -> tuple[Transformer, Checkpoint]:
    """Build the Transformer for a checkpoint folder with its weights on `device`.

    `backend` picks how GPTQ linears compute (see QuantLinear); "auto" takes the first backend whose
    declared support covers the layer (`lowbit.model.linear.pick_backend`): the Triton kernels on CUDA,
    dequantized weights on a CPU when they take under a quarter of the machine's memory, else the reference.
    """
    ckpt = open_checkpoint(folder, allow_pickle)
    quantized = {name for name in _linear_names(ckpt.config) if _is_quantized(ckpt, name)}
    if quantized and ckpt.quant is None:
        raise FormatError(f"{folder}: weights are GPTQ-packed but no quantize_config.json / quantization_config")
    fused = {name: _gptq_parts(ckpt, name) for name in quantized}
    fused = {name: (fuse_gptq(parts, ckpt.quant.bits) or [canonical(p, ckpt.quant.bits) for p in parts])
             for name, parts in fused.items()}

    def make_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if name not in quantized:
            return FloatLinear(in_features, out_features, bias=bias)
        t = fused[name]
        if isinstance(t, list):  # parts disagree on g_idx: keep them apart
            return ConcatLinear([QuantLinear(in_features, p.scales.shape[1], p.bias is not None, ckpt.quant) for p in t])
        return QuantLinear(in_features, out_features, t.bias is not None, ckpt.quant)

    with torch.device("meta"):
        model = Transformer(ckpt.config, make_linear)
    shapes = {name: t.shape for name, t in model.state_dict(keep_vars=True).items() if t is not None}
    tied = ckpt.config.tie_word_embeddings
    state = {}
    for name in tqdm([n for n in shapes if not (tied and n == "output.weight")], desc="loading", unit="tensor",
                     disable=not progress):
        state[name] = _place(_our_tensor(ckpt, name, fused), shapes[name], name, device, dtype)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.rotary.to(device)
    _choose_backend(model, torch.device(device), dtype, backend)
    return model.eval(), ckpt


def _choose_backend(model: Transformer, device: torch.device, dtype: torch.dtype, backend: str) -> None:
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not linears:
        return
    if backend == "auto":
        dense_bytes = sum(m.in_features * m.out_features for m in linears) * torch.finfo(dtype).bits // 8
        fits = dense_bytes < _memory_bytes() / 4
        backend = pick_backend(linears[0].quant, device, dtype, fits)
    for m in linears:
        m.use_backend(backend, dtype)
    log.info("GPTQ linears use the %s backend", backend)


def _memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_float_block(ckpt: Checkpoint, layer: int, device, dtype: torch.dtype) -> Block:
    """One decoder layer of a float checkpoint, alone on `device` (the quantizer streams layers this way)."""
    with torch.device("meta"):
        block = Block(ckpt.config, layer, lambda name, i, o, bias: nn.Linear(i, o, bias=bias))
    state = {}
    for name, t in block.state_dict(keep_vars=True).items():
        full = f"layers.{layer}.{name}"
        state[name] = _place(_our_tensor(ckpt, full, {}), t.shape, full, device, dtype)
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval().requires_grad_(False)


def hf_part_names(ckpt: Checkpoint, layer: int, ours: str) -> list[str]:
    """The HF module names (with prefix) fused into our linear `ours` ("attention.wqkv", ...)."""
    return [ckpt.hf_name(layer, hf) for hf in FUSED_LINEARS[ours]]


def global_tensor_names(ckpt: Checkpoint) -> list[str]:
    """The checkpoint names of everything outside the decoder layers (embeddings, final norm, lm_head)."""
    names = [ckpt.prefix + hf for hf in GLOBAL_TENSORS.values()]
    return names + ([LM_HEAD] if LM_HEAD in ckpt.tensors else [])


def _linear_names(config: ModelConfig) -> list[str]:
    return [f"layers.{i}.{ours}" for i in range(config.num_layers) for ours in FUSED_LINEARS]


def _split(name: str) -> tuple[int, str]:
    _, layer, module = name.split(".", 2)
    return int(layer), module


def _is_quantized(ckpt: Checkpoint, name: str) -> bool:
    layer, ours = _split(name)
    flags = [f"{ckpt.hf_name(layer, hf)}.qweight" in ckpt.tensors for hf in FUSED_LINEARS[ours]]
    if any(flags) and not all(flags):
        raise FormatError(f"{name}: some of {', '.join(FUSED_LINEARS[ours])} are GPTQ-packed and some are not")
    return all(flags)


def _gptq_parts(ckpt: Checkpoint, name: str) -> list[pack.GPTQTensors]:
    layer, ours = _split(name)
    q, parts = ckpt.quant, []
    for hf in FUSED_LINEARS[ours]:
        base = ckpt.hf_name(layer, hf)
        qweight, qzeros, scales = (ckpt.tensors.get(f"{base}.{t}") for t in GPTQ_TENSORS[:3])
        in_features = qweight.shape[0] * 32 // q.bits
        g_idx = ckpt.tensors.get(f"{base}.g_idx") if f"{base}.g_idx" in ckpt.tensors else None
        if g_idx is not None:
            in_features = g_idx.numel()
        else:
            g_idx = pack.default_g_idx(in_features, q.group_size)
        bias = ckpt.tensors.get(f"{base}.bias") if f"{base}.bias" in ckpt.tensors else None
        t = pack.GPTQTensors(qweight, qzeros, scales, g_idx.to(torch.int32), bias)
        try:
            pack.validate(t, q.bits, q.group_size, in_features, scales.shape[-1])
        except FormatError as e:
            raise FormatError(f"{base}: {e}") from None
        parts.append(t)
    return parts


def _our_tensor(ckpt: Checkpoint, name: str, fused: dict) -> Tensor:
    """The checkpoint tensor(s) behind one of our state-dict names."""
    if name in GLOBAL_TENSORS:
        return ckpt.tensors.get(ckpt.prefix + GLOBAL_TENSORS[name])
    if name == "output.weight":
        return ckpt.tensors.get(LM_HEAD)
    layer, rest = _split(name)
    if rest in LAYER_TENSORS:
        return ckpt.tensors.get(ckpt.hf_name(layer, LAYER_TENSORS[rest]))
    module, _, kind = rest.rpartition(".")
    if f"layers.{layer}.{module}" in fused or ".parts." in module:
        return _gptq_tensor(fused, layer, module, kind)
    hf = [ckpt.hf_name(layer, m) for m in FUSED_LINEARS[module]]
    return torch.cat([ckpt.tensors.get(f"{h}.{kind}") for h in hf], dim=0)


def _gptq_tensor(fused: dict, layer: int, module: str, kind: str) -> Tensor:
    module, _, part = module.partition(".parts.")
    t = fused[f"layers.{layer}.{module}"]
    if part:
        t = t[int(part)]
    return getattr(t, kind)


def _place(t: Tensor, expected: torch.Size, name: str, device, dtype: torch.dtype) -> Tensor:
    """Check the shape against the meta model, then move to the device (floats cast to `dtype`, scales kept)."""
    if tuple(t.shape) != tuple(expected):
        raise FormatError(f"{name}: checkpoint tensor has shape {tuple(t.shape)}, config needs {tuple(expected)}")
    if t.is_floating_point() and not name.endswith(".scales"):
        t = t.to(dtype)
    return t.to(device)
