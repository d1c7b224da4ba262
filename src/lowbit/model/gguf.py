"""GGUF import: a llama.cpp GGUF file -> an HF-layout float checkpoint folder with its tokenizer.

Tensors are read and dequantized one at a time with the `gguf` package (any llama.cpp quant type it knows),
renamed through one table, and llama.cpp's q/k row permutation for RoPE is undone. The tokenizer and its
chat template are rebuilt by transformers' GGUF support. Writing shards is `lowbit.model.checkpoint`'s job.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.errors import FormatError, LowbitError
from lowbit.model.checkpoint import write_folder

log = logging.getLogger(__name__)

# GGUF tensor name -> HF name; {i} is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Metadata key (after "llama.") -> config.json field.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                 progress: bool = False) -> Path:
    """Write an HF-layout checkpoint (config.json, safetensors, tokenizer) for a LLaMA-architecture GGUF."""
    reader = _open(gguf_path)
    meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LowbitError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; lowbit imports 'llama'")
    config = hf_config(meta, reader)
    tensors = _tensors(reader, config, dtype, progress)
    tokenizer = _tokenizer(gguf_path)
    return write_folder(out_dir, tensors, config=config, tokenizer=tokenizer, overwrite=overwrite,
                        extra_files={"generation_config.json": _generation_config(reader)})


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise LowbitError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the gguf package raises ValueError/IndexError/struct errors alike
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from None


def _value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a metadata value we don't need may use a type the reader can't decode
        return None


def hf_config(meta: dict[str, Any], reader) -> dict[str, Any]:
    config: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
    for key, hf in CONFIG_KEYS.items():
        if meta.get(f"llama.{key}") is not None:
            config[hf] = meta[f"llama.{key}"]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    token_embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config["vocab_size"] = int(token_embd.shape[-1])
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    if meta.get("llama.rope.scaling.type") in ("linear",):
        config["rope_scaling"] = {"rope_type": "linear", "factor": meta["llama.rope.scaling.factor"]}
    for name in ("bos_token_id", "eos_token_id"):
        ids = _token_id(reader, name)
        if ids is not None:
            config[name] = ids
    config["torch_dtype"] = "float32"
    return config


def _token_id(reader, name: str) -> int | None:
    field = reader.fields.get(f"tokenizer.ggml.{name}")
    return int(field.contents()) if field is not None else None


def _generation_config(reader) -> str:
    ids = {n: _token_id(reader, n) for n in ("bos_token_id", "eos_token_id")}
    return json.dumps({k: v for k, v in ids.items() if v is not None}, indent=2)


def _tensors(reader, config: dict, dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress):
        name = hf_name(t.name)
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(
            tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, kv_heads)
        yield name, w.to(dtype)


def hf_name(gguf_name: str) -> str:
    m = _LAYER.match(gguf_name)
    key = f"blk.{{i}}.{m.group(2)}" if m else gguf_name
    if key not in TENSOR_NAMES:
        raise FormatError(f"unknown GGUF tensor {gguf_name!r} for a llama model")
    return TENSOR_NAMES[key].format(i=m.group(1) if m else "")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert permutation (rows of each head interleaved for its RoPE layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{gguf_path}: cannot rebuild its tokenizer ({e})") from None
