"""`lowbit info`: what a checkpoint is, read from its config and tensor headers (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

from lowbit.model.weights import open_checkpoint

GIB = 1024**3


def describe(folder: Path, allow_pickle: bool = False) -> str:
    ckpt = open_checkpoint(folder, allow_pickle)
    c, q = ckpt.config, ckpt.quant
    weight_bytes = ckpt.tensors.nbytes()
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2  # fp16 keys + values
    context = min(c.max_position_embeddings, 2048)
    lines = [
        f"folder:        {folder}",
        f"architecture:  {c.architecture} ({c.num_layers} layers, hidden {c.hidden_size}, "
        f"intermediate {c.intermediate_size})",
        f"attention:     {c.num_heads} heads, {c.num_kv_heads} kv heads, head_dim {c.head_dim}, "
        f"rope {c.rope.kind} theta={c.rope.theta:g}" + (f" factor={c.rope.factor:g}" if c.rope.kind != "default" else ""),
        f"vocabulary:    {c.vocab_size}" + (" (tied embeddings)" if c.tie_word_embeddings else ""),
        f"context:       {c.max_position_embeddings}",
        f"parameters:    {c.num_params / 1e9:.3f} B",
        "quantization:  " + ("none (float)" if q is None else
                             f"GPTQ {q.bits}-bit, group {q.group_size}, desc_act={q.desc_act}, sym={q.sym}, "
                             f"static_groups={q.static_groups}, format={q.checkpoint_format}"),
        f"weight files:  {len(ckpt.tensors.files)} ({weight_bytes / GIB:.2f} GiB)",
        f"memory:        ~{(weight_bytes + kv_per_token * context) / GIB:.2f} GiB for weights + fp16 KV cache "
        f"at {context} tokens ({kv_per_token * context / GIB:.2f} GiB of it cache)",
    ]
    return "\n".join(lines)
