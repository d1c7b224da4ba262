"""The decode step captured whole in CUDA graphs: embedding, every layer, the final norm, lm_head and the
greedy argmax, one graph per batch bucket (powers of two), replayed with the step's inputs copied into
static buffers. A replay is one launch instead of hundreds, so decode runs at the kernels' speed rather
than the host's.

Owns capture (lazily, the first time a bucket is needed), padding a batch to its bucket (padded rows repeat
row 0, so they write the same key/value to the same cache position and their outputs are dropped) and the
staging of inputs through pinned memory. The model, cache and kernels know nothing of graphs; the engine
calls `DecodeGraphs.run` in place of the model for decode-only steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.engine.kv_cache import KVCache
from lowbit.model.llama import Transformer

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # int64 [3, bucket]: tokens, positions, slots
    logits: Tensor  # [bucket, vocab]
    greedy: Tensor  # int64 [bucket]: argmax of logits


def supported(model: Transformer, device: torch.device) -> bool:
    """Graphs need CUDA and a step with no host sync (dynamic NTK RoPE reads the longest position)."""
    return device.type == "cuda" and model.config.rope.kind != "dynamic"


def greedy_only(params) -> bool:
    """Whether the graph's argmax is these rows' sample: greedy with no penalty to apply first."""
    return all(p.greedy and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
               for p in params)


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, max_batch: int):
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.max_bucket = 1 << max(0, max_batch - 1).bit_length()
        self.graphs: dict[int, _Graph] = {}
        self.pool = None
        self._staging = torch.zeros(3, self.max_bucket, dtype=torch.int64).pin_memory()
        self._staged = torch.cuda.Event()

    def bucket(self, n: int) -> int:
        return 1 << max(0, n - 1).bit_length()

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> tuple[Tensor, Tensor]:
        """One decode step for n rows -> (logits [n, vocab], greedy tokens [n]), views of static outputs
        that the next replay overwrites."""
        n = len(tokens)
        b = self.bucket(n)
        g = self.graphs.get(b) or self._capture(b)
        self._staged.synchronize()  # the previous step's copy has left the pinned buffer
        host = self._staging[:, :b]
        for i, values in enumerate((tokens, positions, slots)):
            host[i, :n] = torch.tensor(values, dtype=torch.int64)
            host[i, n:] = values[0]
        g.inputs.copy_(host, non_blocking=True)
        self._staged.record()
        g.graph.replay()
        return g.logits[:n], g.greedy[:n]

    def _forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        tokens, positions, slots = inputs[0, :, None], inputs[1, :, None], inputs[2]
        logits = self.model(tokens, positions, self.cache, slots)[:, -1]
        return logits, logits.argmax(-1)

    def _capture(self, b: int) -> _Graph:
        """Warm up (compiles the kernels for this batch size) and capture the step for bucket b.

        The warm-up writes keys at the cache's last position of slot 0: no sequence reads a position before
        writing it, so that is harmless."""
        log.info("capturing the decode step for batch %d", b)
        inputs = torch.zeros(3, b, dtype=torch.int64, device=self.device)
        inputs[1] = self.cache.max_seq_len - 1
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, greedy = self._forward(inputs)
        self.pool = graph.pool()
        self.graphs[b] = _Graph(graph, inputs, logits, greedy)
        return self.graphs[b]
