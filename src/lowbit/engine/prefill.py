"""Prefill: one prompt into its KV-cache slot, in chunks of at most `chunk` tokens; returns the logits of its
last position. `padded_prefill` is the same for a prompt padded to a fixed length (what a CUDA graph replays).

A forward over T tokens holds activations in proportion to T (gate/up's output alone is [T, 2 x
intermediate]: 113 MB for a 2047-token LLaMA-13B prompt in float16), so chunking bounds a long prompt's
memory at the cost of more, smaller forwards. The first chunk takes the model's fresh path (positions 0..T-1,
causal among themselves: flash attention on CUDA); each later chunk writes its keys at its positions and
attends to the cached prefix through the cache path (`input_pos`, not fresh), as a decode step does with
one token. With dynamic (NTK) RoPE a chunk's frequencies follow its own last position, as they would if the
prompt had arrived in pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lowbit.model.llama import Cache, Transformer


def prefill(model: Transformer, cache: Cache, prompt_ids: Sequence[int], slot: int, chunk: int | None,
            device: torch.device) -> Tensor:
    """Write the prompt's keys/values at positions 0..len-1 of cache slot `slot` -> logits [vocab] of the last
    position. chunk None or 0: the whole prompt in one forward."""
    tokens = torch.tensor([list(prompt_ids)], device=device)
    rows = torch.tensor([slot], device=device)
    n = tokens.shape[1]
    size = chunk or n
    logits = model(tokens[:, :size], None, cache, rows, last_only=True)
    for start in range(size, n, size):
        end = min(start + size, n)
        pos = torch.arange(start, end, device=device)[None]
        logits = model(tokens[:, start:end], pos, cache, rows, last_only=True)
    return logits[0, -1]


def padded_prefill(model: Transformer, cache: Cache, tokens: Tensor, rows: Tensor, last: Tensor) -> Tensor:
    """A prompt of last + 1 tokens, padded to T = tokens.shape[1] (tokens int64 [1, T]), into cache slot rows[0]
    -> logits [vocab] of position last (int64 [1]) (as `prefill` without chunks).

    The padding's keys/values land at positions last+1..T-1 of the slot, past the prompt: decode writes each
    position before it attends to it, so they are never read, and the causal mask keeps the padding out of the
    prompt's own positions. Shapes depend on T only, so one captured graph serves every prompt padded to T."""
    return model(tokens, None, cache, rows, last_only=last)[0, -1]
