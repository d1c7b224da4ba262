"""Token embeddings kept in pinned host memory and gathered by the GPU (llama.cpp keeps tok_embd on the CPU too).

A step reads one embedding row per token, so the table (vocab x hidden: 0.33 GB for LLaMA-13B in float16)
need not take GPU memory. `embeddings_to_host` swaps the model's `tok_embeddings` for a `HostEmbedding`
whose table lives in pinned host memory; the GPU reads the rows it needs over PCIe
(`lowbit.kernels.embedding`), with no host work per step, so a decode step still captures in a CUDA graph.
Tied embeddings are lm_head's weight too, which the GPU reads whole every step: they stay where they are.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.model.llama import Transformer

log = logging.getLogger(__name__)


class HostEmbedding(nn.Module):
    """nn.Embedding's forward over a table that may live elsewhere than the tokens (pinned host memory).

    The table is a buffer (in the state dict as `weight`, no parameter), so the model's device is still
    that of its parameters."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.device == self.weight.device:
            return F.embedding(tokens, self.weight)
        from lowbit.kernels.embedding import gather_rows

        return gather_rows(self.weight, tokens)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on {self.weight.device}"


def embeddings_to_host(model: Transformer) -> bool:
    """Move the model's untied token-embedding table from the GPU to pinned host memory, freeing its GPU copy.

    True when the model now gathers its embeddings from host memory; False (with a log line saying why) for
    tied embeddings and for models that do not run on a GPU. Calling it again is harmless.
    """
    emb = model.tok_embeddings
    if isinstance(emb, HostEmbedding):
        return True
    if model.config.tie_word_embeddings:
        log.warning("embeddings on host: ignored, this model ties its token embeddings to lm_head, "
                    "which the GPU reads whole every step; they stay on the %s", emb.weight.device)
        return False
    if emb.weight.device.type != "cuda":
        log.info("embeddings on host: nothing to do, the model runs on the %s", emb.weight.device)
        return False
    table = torch.empty(emb.weight.shape, dtype=emb.weight.dtype, pin_memory=True)
    table.copy_(emb.weight.detach())
    model.tok_embeddings = HostEmbedding(table)
    log.info("embeddings on host: %.2f GB table moved to pinned host memory",
             table.numel() * table.element_size() / 1e9)
    return True
