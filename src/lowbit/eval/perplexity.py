"""Perplexity of a model on one token stream, by the GPTQ paper's protocol, from `model.forward` alone.

Owns cutting the stream into non-overlapping windows and the float32 negative log-likelihood over them,
computed a slice of positions at a time so that memory stays bounded for large vocabularies. Leaves
reading and tokenizing text to `lowbit.data`, and loading the model to `lowbit.api`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

LOSS_CHUNK = 512  # positions per float32 log-softmax: 512 x 128k vocab x 4 bytes = 256 MB


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    windows: int  # windows of `seqlen` tokens evaluated
    tokens: int  # tokens predicted: windows x (seqlen - 1)


@torch.inference_mode()
def perplexity(model: nn.Module, tokens: Tensor, seqlen: int = 2048, batch_size: int = 1, progress: bool = False,
               max_windows: int | None = None) -> PerplexityResult:
    """Perplexity of `model` on tokens [1, N]: mean NLL over non-overlapping windows of `seqlen` tokens.

    Each window predicts its tokens 1..seqlen-1 from its own context; the tail shorter than a window is
    dropped. `seqlen` is capped at the model's max_position_embeddings; `max_windows` keeps the first ones.
    """
    windows = _windows(model, tokens, seqlen, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress) as bar:
        for batch in windows.split(max(1, batch_size)):
            batch = batch.to(device)
            logits = model(batch)  # [B, T, V]
            for row, row_logits in zip(batch, logits):
                total += window_nll(row_logits, row)
                count += len(row) - 1
            bar.update(len(batch))
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, windows=len(windows), tokens=count)


def window_nll(logits: Tensor, tokens: Tensor) -> float:
    """Summed NLL of tokens[1:] under logits[:-1] ([T, V], [T]), in float32, LOSS_CHUNK positions at a time."""
    total = 0.0
    for start in range(0, len(tokens) - 1, LOSS_CHUNK):
        stop = min(start + LOSS_CHUNK, len(tokens) - 1)
        loss = F.cross_entropy(logits[start:stop].float(), tokens[start + 1 : stop + 1], reduction="sum")
        total += loss.item()
    return total


def _windows(model: nn.Module, tokens: Tensor, seqlen: int, max_windows: int | None) -> Tensor:
    """[W, seqlen] non-overlapping windows of tokens [1, N] (or [N]), with seqlen capped to the model's."""
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise LowbitError(f"perplexity takes one token stream [1, N], got shape {list(tokens.shape)}")
    limit = model.config.max_position_embeddings
    if seqlen > limit:
        log.info("seqlen %d capped at the model's max_position_embeddings %d", seqlen, limit)
        seqlen = limit
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2 to predict a token, got {seqlen}")
    count = len(tokens) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise LowbitError(f"{len(tokens)} tokens make no window of seqlen {seqlen}; give more text or a shorter seqlen")
    return tokens[: count * seqlen].reshape(count, seqlen)
