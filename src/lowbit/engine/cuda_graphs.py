"""Decode steps run as bursts of greedy steps, and captured whole in CUDA graphs; prefills of short prompts too.

`decode_steps` is the loop: S consecutive decode steps (embedding, every layer, lm_head, argmax), step s
feeding its argmax to step s+1 at positions + s, so the host syncs once per S tokens instead of once per
token. `DecodeGraphs` captures that loop, one graph per (batch bucket, S) (buckets are powers of two), and
replays it with the step's inputs copied into static buffers: one launch instead of hundreds per token.
`EagerDecode` runs the same loop without capture (CPU tests, or where graphs cannot run). A burst's input
tokens may be host ints or a device tensor (the previous burst's last argmax, fed device to device), and
`HostCopy` brings its outputs back without waiting for work queued after them (the engine's next burst).

Owns capture (lazily, the first time a bucket is needed), padding a batch to its bucket (padded rows repeat
row 0 and follow row 0's tokens, so they write the same keys/values at the same cache positions as row 0
and their outputs are dropped) and the staging of inputs and outputs through pinned memory. The model, cache
and kernels know nothing of graphs; which steps may run as a burst, and when, is the engine's decision.

`PrefillGraphs` does the same for a prompt's prefill (`prefill.padded_prefill`): a prompt of up to a few hundred
tokens is padded to a power of two and replayed from that length's graph. Such a prefill is bound by the host's
launches, not the GPU (a 128-token prompt of a 7B model on an H100: 41-78 ms of wall time against 13 ms of
kernels, benchmarks/results/gpu.md); the graph replays them in one launch. `PaddedPrefill` runs the same padded
forward without capture (the reference, and CPU tests). Every graph of an engine captures into one `GraphPool`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.engine.kv_cache import KVCache
from lowbit.engine.prefill import padded_prefill
from lowbit.kernels import ops
from lowbit.model.llama import Transformer

log = logging.getLogger(__name__)


def supported(model: Transformer, device: torch.device) -> bool:
    """Graphs need CUDA and a step with no host sync (dynamic NTK RoPE reads the longest position)."""
    return device.type == "cuda" and model.config.rope.kind != "dynamic"


def greedy_only(params) -> bool:
    """Whether the graph's argmax is these rows' sample: greedy with no penalty to apply first."""
    return all(p.greedy and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
               for p in params)


def decode_steps(model: Transformer, cache: KVCache, inputs: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """`steps` greedy decode steps -> (greedy tokens int64 [steps, B], the last step's logits [B, vocab]).

    inputs int64 [4, B]: tokens (the last token of each row, its keys not yet cached), their positions, cache
    slots, and `lead`: the row whose argmax each row takes as its next token (itself; row 0 for padding).
    Step s writes keys/values at positions + s, so row b needs positions[b] + steps - 1 < max_seq_len."""
    tokens, positions, slots, lead = inputs
    out = []
    for s in range(steps):  # (no `positions + 0` or stack of one: each plain launch is a barrier in the graph)
        at = positions + s if s else positions
        logits = model(tokens[:, None], at[:, None], cache, slots)[:, -1]
        greedy = ops.argmax(logits)
        out.append(greedy)
        if s + 1 < steps:
            tokens = greedy[lead]
    return (torch.stack(out) if steps > 1 else out[0][None]), logits


class HostCopy:
    """A device tensor's copy to host memory, started without waiting: on CUDA into pinned memory with an event,
    so `get()` waits for this copy only and not for what was queued after it (a plain `.tolist()` would wait
    for the whole stream). Off CUDA the tensor itself (already computed)."""

    def __init__(self, t: Tensor):
        self.done = None
        if t.device.type != "cuda":
            self.host = t
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # the caching host allocator: cheap
        self.host.copy_(t, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record(torch.cuda.current_stream(t.device))

    def get(self) -> Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host


class EagerDecode:
    """`decode_steps` called directly: the reference for the graphs, and the burst runner without CUDA."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache

    @torch.inference_mode()
    def run(self, tokens: list[int] | Tensor, positions: list[int], slots: list[int], steps: int = 1) -> tuple[Tensor, Tensor]:
        """(the last step's logits [n, vocab], greedy tokens [steps, n]), as `DecodeGraphs.run`."""
        device = self.cache.k.device
        rest = torch.tensor([positions, slots, list(range(len(positions)))], device=device)
        first = tokens.to(device)[None] if isinstance(tokens, Tensor) else torch.tensor([tokens], device=device)
        greedy, logits = decode_steps(self.model, self.cache, torch.cat([first, rest]), steps)
        return logits, greedy


class GraphPool:
    """The memory pool that all of an engine's graphs capture into. They never run at once and keep their
    inputs and outputs referenced, so what they share is only each other's intermediates."""

    def __init__(self):
        self.handle = None

    def capture(self, graph: torch.cuda.CUDAGraph):
        """torch.cuda.graph(graph) into this pool (the first capture creates it)."""
        return torch.cuda.graph(graph, pool=self.handle)

    def captured(self, graph: torch.cuda.CUDAGraph) -> None:
        self.handle = graph.pool()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # int64 [4, bucket]: tokens, positions, slots, lead
    logits: Tensor  # [bucket, vocab]: the last step's
    greedy: Tensor  # int64 [steps, bucket]: each step's argmax


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, max_batch: int, pool: GraphPool | None = None):
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.max_bucket = self.bucket(max_batch)
        self.graphs: dict[tuple[int, int], _Graph] = {}  # (bucket, steps) -> graph
        self.pool = pool or GraphPool()
        self._staging = torch.zeros(4, self.max_bucket, dtype=torch.int64).pin_memory()
        self._staged = torch.cuda.Event()

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(0, n - 1).bit_length()

    @torch.inference_mode()
    def run(self, tokens: list[int] | Tensor, positions: list[int], slots: list[int], steps: int = 1) -> tuple[Tensor, Tensor]:
        """`steps` greedy decode steps for n rows -> (the last step's logits [n, vocab], greedy tokens
        [steps, n]), views of static outputs that the next replay overwrites. tokens: host ints, or an int64
        device tensor [n] (e.g. the previous replay's last greedy row), copied on the device: no host sync."""
        n = len(positions)
        b = self.bucket(n)
        g = self.graphs.get((b, steps)) or self._capture(b, steps)
        self._staged.synchronize()  # the previous step's copy has left the pinned buffer
        host = self._staging[:, :b]
        on_device = isinstance(tokens, Tensor)
        for i, values in enumerate(([0] * n if on_device else tokens, positions, slots, range(n))):
            host[i, :n] = torch.tensor(values, dtype=torch.int64)
            host[i, n:] = values[0]
        g.inputs.copy_(host, non_blocking=True)
        self._staged.record()
        if on_device:  # stream order: after the copy above, before the replay that overwrites g.greedy
            g.inputs[0, :n].copy_(tokens)
            g.inputs[0, n:].copy_(tokens[:1].expand(b - n))  # padded rows follow row 0
        g.graph.replay()
        return g.logits[:n], g.greedy[:, :n]

    def _capture(self, b: int, steps: int) -> _Graph:
        """Warm up (compiles the kernels for this batch size) and capture `steps` steps for bucket b.

        The warm-up writes keys at the cache's last `steps` positions of slot 0. No sequence reads a position
        before writing it, and a request holding slot 0 is in this very step, which the engine runs only when
        its keys end before those positions, so that is harmless."""
        log.info("capturing %d decode step(s) for batch %d", steps, b)
        inputs = torch.zeros(4, b, dtype=torch.int64, device=self.device)
        inputs[1] = max(0, self.cache.max_seq_len - steps)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_steps(self.model, self.cache, inputs, steps)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with self.pool.capture(graph):
            greedy, logits = decode_steps(self.model, self.cache, inputs, steps)
        self.pool.captured(graph)
        self.graphs[b, steps] = _Graph(graph, inputs, logits, greedy)
        return self.graphs[b, steps]


class PaddedPrefill:
    """Prefills of prompts of up to `max_tokens` tokens (at most the cache's length) through `padded_prefill`, the
    prompt padded with its last token to a power of two of at least MIN_TOKENS; run as they are here (the
    reference for `PrefillGraphs`, and CPU tests)."""

    MIN_TOKENS = 16

    def __init__(self, model: Transformer, cache: KVCache, max_tokens: int):
        self.model, self.cache, self.max_tokens = model, cache, max_tokens
        self.device = cache.k.device

    def padded_length(self, n: int) -> int | None:
        """The length a prompt of n tokens is padded to; None: it is not prefilled here."""
        t = max(self.MIN_TOKENS, DecodeGraphs.bucket(n))
        return t if n <= self.max_tokens and t <= self.cache.max_seq_len else None

    @staticmethod
    def inputs(prompt_ids, slot: int, length: int) -> Tensor:
        """int64 [length + 2] on the host: the padded prompt, the slot, the prompt's last position."""
        ids = list(prompt_ids)
        return torch.tensor(ids + ids[-1:] * (length - len(ids)) + [slot, len(ids) - 1], dtype=torch.int64)

    @staticmethod
    def run_inputs(model: Transformer, cache: KVCache, inputs: Tensor) -> Tensor:
        """`padded_prefill` of `inputs` (as `inputs` lays them out) -> logits [vocab]."""
        t = inputs.shape[0] - 2
        return padded_prefill(model, cache, inputs[:t][None], inputs[t:t + 1], inputs[t + 1:])

    @torch.inference_mode()
    def run(self, prompt_ids, slot: int) -> Tensor | None:
        """Prefill the prompt into `slot` -> logits [vocab] of its last position; None where it is not taken here
        (too long: `prefill` does it)."""
        length = self.padded_length(len(prompt_ids))
        if length is None:
            return None
        return self._forward(self.inputs(prompt_ids, slot, length))

    def _forward(self, inputs: Tensor) -> Tensor:
        """The padded prefill of host `inputs` -> logits [vocab]."""
        return self.run_inputs(self.model, self.cache, inputs.to(self.device))


@dataclass
class _PrefillGraph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # int64 [length + 2] (`PaddedPrefill.inputs`)
    logits: Tensor  # [vocab]


class PrefillGraphs(PaddedPrefill):
    """`PaddedPrefill` replayed from one captured graph per padded length (captured the first time a prompt needs
    it), in the engine's `GraphPool`."""

    def __init__(self, model: Transformer, cache: KVCache, max_tokens: int, pool: GraphPool):
        super().__init__(model, cache, max_tokens)
        self.pool = pool
        self.graphs: dict[int, _PrefillGraph] = {}

    def _forward(self, inputs: Tensor) -> Tensor:
        """Replay (or capture) the graph of the inputs' length; the logits are a copy (the next replay overwrites
        the graph's own)."""
        staged = inputs.pin_memory().to(self.device, non_blocking=True)
        g = self.graphs.get(inputs.shape[0] - 2)
        if g is None:
            return self._capture(staged).logits.clone()
        g.inputs.copy_(staged)
        g.graph.replay()
        return g.logits.clone()

    def _capture(self, staged: Tensor) -> _PrefillGraph:
        """Warm up (compiling the kernels for this length) and capture the padded prefill of these inputs. The
        warm-up prefills this very prompt into its slot, so it writes nothing that the replay does not."""
        length = staged.shape[0] - 2
        log.info("capturing the prefill of prompts padded to %d tokens", length)
        inputs = staged.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run_inputs(self.model, self.cache, inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with self.pool.capture(graph):
            logits = self.run_inputs(self.model, self.cache, inputs)
        self.pool.captured(graph)
        self.graphs[length] = _PrefillGraph(graph, inputs, logits)
        graph.replay()
        return self.graphs[length]
