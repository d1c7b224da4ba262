"""The Engine: owns the model, the KV cache, the scheduler, and the step loop.

One `step()` is schedule -> forward -> sample -> update. Requests join (prefill into a free cache slot) and
leave (slot freed) at any step, so several prompts of different lengths decode together. A decode step of
greedy rows runs as a burst of `decode_steps` tokens (one graph replay, one host sync), whose tokens the
update applies row by row in order. With `overlap_bursts`, while the host applies a burst's tokens the GPU
already runs the next burst for the same rows (fed the last argmax on the device), which the next step then
applies: launched only when the next step would be that very burst, and applied (drained) before anything
changes the batch, so every step returns what it would without overlap. Chat, the server and the benchmarks
use only `add_request`, `step`, `abort`, `stream` and `generate`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from lowbit.engine import cuda_graphs
from lowbit.engine.kv_cache import KVCache
from lowbit.engine.prefill import prefill
from lowbit.engine.request import FinishReason, Request, RequestOutput, StopStrings
from lowbit.engine.sampling import PenaltyHistory, SamplingParams, make_generator, sample
from lowbit.engine.scheduler import Scheduler
from lowbit.errors import LowbitError, Overloaded
from lowbit.model.host_embedding import embeddings_to_host
from lowbit.model.llama import Transformer
from lowbit.model.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime sizing. max_seq_len bounds prompt + output of one request (the KV cache length)."""

    max_batch: int = 1
    max_seq_len: int = 2048
    max_waiting: int | None = None  # add_request raises Overloaded beyond this many queued requests
    max_wait_s: float | None = None  # a request still queued after this long finishes with TIMEOUT
    kv_dtype: torch.dtype | None = None  # default: the model's dtype

    cuda_graphs: bool = True  # on CUDA, replay decode steps as captured graphs (lowbit.engine.cuda_graphs)
    # greedy decode steps per burst: one graph replay and one host sync per this many tokens, so the GPU does
    # not idle while the host handles each token (1 = a step per token). Bursts need graphs or eager_bursts.
    decode_steps: int = 8
    # run bursts (and padded prefills) without graphs where graphs are off or unsupported (CPU tests)
    eager_bursts: bool = False
    # launch the next burst before the host applies this one's tokens, so the GPU does not idle while the host
    # detokenizes and checks stops (off: the GPU waits for the host after every burst)
    overlap_bursts: bool = True
    # prompts go through the model this many tokens at a time (None: at once): bounds a long prompt's activations;
    # smaller chunks save memory (256: 13B in 9 GB) but re-read every weight per chunk (7B 4-bit prefill of 1024
    # tokens: 23k tok/s at once, 8.9k in chunks of 512; H100, benchmarks/results/gpu.md)
    prefill_chunk: int | None = 2048
    # prompts of up to this many tokens prefill by replaying a captured CUDA graph, the prompt padded to a power of
    # two (lowbit.engine.cuda_graphs.PrefillGraphs): a short prompt's prefill is bound by the host's launches, not
    # the GPU; 0: off. With eager_bursts where graphs cannot run, such prompts are padded the same way, eagerly.
    prefill_graphs: int = 0
    embeddings_on_host: bool = False  # untied token embeddings in pinned host memory (lowbit.model.host_embedding)

    def __post_init__(self) -> None:
        if self.decode_steps < 1:
            raise LowbitError(f"decode_steps must be at least 1, got {self.decode_steps}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise LowbitError(f"prefill_chunk must be a positive number of tokens (or None), got {self.prefill_chunk}")
        if self.prefill_graphs < 0:
            raise LowbitError(f"prefill_graphs is a number of tokens (0: off), got {self.prefill_graphs}")


@dataclass
class _Live:
    """Per-request runtime state that is not part of the request's description."""

    request: Request
    decoder: StreamDecoder
    stops: StopStrings
    generator: torch.Generator | None


@dataclass
class _Burst:
    """A launched burst whose tokens the rows' host state does not include yet."""

    requests: list[Request]
    greedy: Tensor  # int64 [S, n] on the device (a view the runner's next burst overwrites)
    copy: cuda_graphs.HostCopy  # of greedy, started before anything else was queued


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if config.embeddings_on_host:  # before the cache is allocated: the table's GPU memory is freed first
            embeddings_to_host(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(config.max_seq_len, model.config.max_position_embeddings)
        self.cache = KVCache(model.config, config.max_batch, self.max_seq_len, config.kv_dtype or self.dtype, self.device)
        self.history = PenaltyHistory.empty(config.max_batch, model.config.vocab_size, self.device)
        self.scheduler = Scheduler(config.max_waiting, config.max_wait_s)
        self.live: dict[str, _Live] = {}
        self._ids = itertools.count()
        use_graphs = config.cuda_graphs and cuda_graphs.supported(model, self.device)
        pool = cuda_graphs.GraphPool()
        self.graphs = cuda_graphs.DecodeGraphs(model, self.cache, config.max_batch, pool) if use_graphs else None
        eager = cuda_graphs.EagerDecode(model, self.cache) if config.eager_bursts else None
        self.bursts = self.graphs if use_graphs else eager  # what runs a burst of decode_steps (None: no bursts)
        short = min(config.prefill_graphs, config.prefill_chunk or config.prefill_graphs)  # one chunk
        self.padded = None  # what prefills short prompts padded (None: `prefill` takes every prompt)
        if short and use_graphs:
            self.padded = cuda_graphs.PrefillGraphs(model, self.cache, short, pool)
        elif short and config.eager_bursts:
            self.padded = cuda_graphs.PaddedPrefill(model, self.cache, short)
        self._greedy: Tensor | None = None  # the graph's argmax, when the whole step was one replay
        self._pending: _Burst | None = None  # the burst the next step applies, already running (overlap_bursts)

    # ----- API -----
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a prompt; raises LowbitError when it cannot fit the context, Overloaded when the queue is full."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise LowbitError("the prompt is empty (no tokens)")
        if len(prompt) >= self.max_seq_len:
            raise LowbitError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len} "
                              "(prompt + at least one new token)")
        if max(prompt) >= self.model.config.vocab_size or min(prompt) < 0:
            raise LowbitError(f"token id out of range for vocab_size {self.model.config.vocab_size}")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.live:
            raise LowbitError(f"request id {rid!r} is already in use")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.tokenizer.eos_ids))
        request = Request(rid, prompt, params, frozenset(stop_ids))
        if not self.scheduler.add(rid, len(prompt), time.monotonic()):
            raise Overloaded(f"{self.scheduler.num_waiting} requests are already waiting; try again later")
        self.live[rid] = _Live(request, StreamDecoder(self.tokenizer, context=prompt), StopStrings(params.stop),
                               make_generator(params.seed, self.device))
        return rid

    def abort(self, request_id: str) -> None:
        """Drop a request now, freeing its slot (unknown or finished ids are ignored)."""
        live = self.live.get(request_id)
        if live is not None:
            self._finish(live.request, FinishReason.ABORT)

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet finished: running plus waiting (0 when the engine is idle)."""
        return self.scheduler.num_unfinished

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> forward -> sample -> update (plus the requests that waited too long).
        A burst the previous step launched (overlap_bursts) is this step: only its update is left to do."""
        expired = self._expire()
        if self._pending is not None:  # launched by the previous step for the same rows: this step's tokens
            return expired + self._land(self._pending)
        plan = self.scheduler.schedule(self._allocate)
        if not plan:
            return expired
        requests = [self.live[rid].request for rid in plan]
        if self._burst_fits(requests, plan):
            return expired + self._land(self._launch(requests, [r.output_ids[-1] for r in requests]))
        logits = self._forward(requests, plan)
        tokens = self._sample(requests, logits)
        return expired + self._update(requests, [[t] for t in tokens])

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Run one request to the end, yielding its outputs (stops it if the caller stops iterating)."""
        rid = self.add_request(prompt_ids, params)
        try:
            while rid in self.live:
                yield from (out for out in self.step() if out.request_id == rid)
        finally:
            self.abort(rid)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[tuple[str, list[int], FinishReason]]:
        """Run prompts together to the end: (text, token ids, finish reason) per prompt, in order."""
        rids = [self.add_request(p, params) for p in prompts]
        text = {rid: "" for rid in rids}
        ids: dict[str, list[int]] = {rid: [] for rid in rids}
        reason: dict[str, FinishReason] = {}
        while self.num_unfinished:
            for out in self.step():
                text[out.request_id] += out.delta_text
                ids[out.request_id] += out.new_token_ids
                if out.finished:
                    reason[out.request_id] = out.finish_reason
        return [(text[r], ids[r], reason[r]) for r in rids]

    # ----- the step's parts -----
    def _expire(self) -> list[RequestOutput]:
        """Finish, with TIMEOUT, the requests that waited longer than max_wait_s without getting a slot."""
        outputs = []
        for rid in self.scheduler.expire(time.monotonic()):
            request = self.live[rid].request
            self._finish(request, FinishReason.TIMEOUT)
            outputs.append(RequestOutput(rid, "", (), len(request.prompt_ids), 0, FinishReason.TIMEOUT))
        return outputs

    def _allocate(self, request_id: str) -> bool:
        slot = self.cache.allocate()
        if slot is None:
            return False
        request = self.live[request_id].request
        request.slot = slot
        self.history.start(slot, request.prompt_ids)
        return True

    @torch.inference_mode()
    def _forward(self, requests: list[Request], plan: dict[str, int]) -> Tensor:
        """Logits [len(requests), vocab] for the next token of each scheduled request."""
        decode = [r for r in requests if plan[r.request_id] == 1 and r.output_ids]
        order = {r.request_id: i for i, r in enumerate(decode)}
        self._greedy = None
        if decode and self.graphs is not None:
            decoded, greedy = self.graphs.run([r.output_ids[-1] for r in decode], [r.length - 1 for r in decode],
                                              [r.slot for r in decode])
            if len(decode) == len(requests):  # a pure decode step: the graph's outputs are the step's
                self._greedy = greedy[0]
                return decoded
        elif decode:
            tokens = torch.tensor([[r.output_ids[-1]] for r in decode], device=self.device)
            pos = torch.tensor([[r.length - 1] for r in decode], device=self.device)
            slots = torch.tensor([r.slot for r in decode], device=self.device)
            decoded = self.model(tokens, pos, self.cache, slots)[:, -1]
        out = []
        for r in requests:
            if r.request_id in order:
                out.append(decoded[order[r.request_id]])
                continue
            logits = None if self.padded is None else self.padded.run(r.prompt_ids, r.slot)
            if logits is None:
                logits = prefill(self.model, self.cache, r.prompt_ids, r.slot, self.config.prefill_chunk, self.device)
            out.append(logits)
        return torch.stack(out)

    def _sample(self, requests: list[Request], logits: Tensor) -> list[int]:
        slots = self._to_device([r.slot for r in requests])
        params = [r.params for r in requests]
        generators = [self.live[r.request_id].generator for r in requests]
        if self._greedy is not None and cuda_graphs.greedy_only(params):
            tokens = self._greedy  # sampled inside the graph
        else:
            tokens = sample(logits, params, self.history.select(slots), generators)
        self.history.append(tokens, slots)
        return tokens.tolist()

    def _burst_fits(self, requests: list[Request], plan: dict[str, int]) -> bool:
        """Whether this step can be a burst of S greedy steps: a pure decode step, greedy-only rows, every
        row's S key/value writes (positions length-1 .. length+S-2) inside the cache, and some row that wants
        all S tokens (a row that wants fewer finishes with LENGTH mid-burst: at batch > 1 its extra steps
        cost nothing, while falling back would cost the other rows a host sync per token)."""
        return (self.bursts is not None and self.config.decode_steps > 1
                and all(plan[r.request_id] == 1 and r.output_ids for r in requests)
                and cuda_graphs.greedy_only([r.params for r in requests])
                and self._room_for_burst(requests))

    def _room_for_burst(self, requests: list[Request], ahead: int = 0) -> bool:
        """`_burst_fits`'s length rule, for a burst `ahead` tokens past the rows' host state: every row's key
        writes (up to position length + ahead + S - 2) inside the cache, and some row wanting all S tokens."""
        S = self.config.decode_steps
        return (all(r.length + ahead + S - 1 <= self.max_seq_len for r in requests)
                and max(r.params.max_new_tokens - len(r.output_ids) - ahead for r in requests) >= S)

    def _launch(self, requests: list[Request], tokens: list[int] | Tensor, ahead: int = 0) -> _Burst:
        """Queue S greedy decode steps for these rows from `tokens` (their last, uncached token: host ints, or
        the previous burst's last argmax on the device) at `ahead` positions past their host state; no sync."""
        positions = [r.length - 1 + ahead for r in requests]
        _, greedy = self.bursts.run(tokens, positions, [r.slot for r in requests], self.config.decode_steps)
        return _Burst(requests, greedy, cuda_graphs.HostCopy(greedy))  # the copy is queued before any next burst

    def _land(self, burst: _Burst) -> list[RequestOutput]:
        """Apply a launched burst's tokens, having first launched the next burst for the same rows when
        `_may_overlap` says the next step would be exactly that burst (it becomes `_pending`).

        The update keeps each row's tokens up to its finish and drops the rest; a row that finished (or was
        aborted) before its burst lands gets nothing from it. The dropped steps wrote keys past the row's end
        in its own slot, which may be freed and handed to a new request before the GPU has even run them. That
        is safe: all engine work is queued on one stream, so the new owner's prefill and decode steps run after
        those writes, and a sequence attends only to positions 0..its own, each written by itself first."""
        overlap = self._may_overlap(burst.requests)
        self._pending = self._launch(burst.requests, burst.greedy[-1], self.config.decode_steps) if overlap else None
        rows = burst.copy.get().T.tolist()  # waits for this burst's tokens only, not for the pending burst
        running = [(r, row) for r, row in zip(burst.requests, rows) if r.finish_reason is None]
        requests, tokens = [r for r, _ in running], [row for _, row in running]
        slots, before = [r.slot for r in requests], [len(r.output_ids) for r in requests]
        outputs = self._update(requests, tokens)
        kept = [(slot, t) for r, n, slot in zip(requests, before, slots) for t in r.output_ids[n:]]
        if kept:
            kept_slots, kept_tokens = self._to_device(kept).T
            self.history.append(kept_tokens, kept_slots)
        return outputs

    def _may_overlap(self, requests: list[Request]) -> bool:
        """Whether to launch the next burst for these rows before applying the one in flight: only when the next
        step would be that very burst for the rows still running after it, whichever of them finish in this one
        (LENGTH, a stop id or string), so every step returns what it would without overlap. That holds when
        overlap is on, no request is waiting (one could take a freed slot), every row is still running, and
        every row alone meets `_burst_fits`'s length rule S tokens ahead (its keys inside the cache, S tokens
        wanted after this burst). `_land` drops the next burst's tokens of rows that finish in this one."""
        S = self.config.decode_steps
        return (self.config.overlap_bursts and self.scheduler.num_waiting == 0
                and all(r.finish_reason is None and self._room_for_burst([r], ahead=S) for r in requests))

    def _to_device(self, values: list) -> Tensor:
        """torch.tensor(values) (int64) on the engine's device, through pinned memory: a plain copy from host
        memory waits for the GPU, which may be running the pending burst."""
        t = torch.tensor(values, dtype=torch.int64)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _update(self, requests: list[Request], tokens: list[list[int]]) -> list[RequestOutput]:
        """Apply each row's new tokens in order (stop ids, stop strings, LENGTH); one output per row."""
        outputs = []
        for r, row in zip(requests, tokens):
            live = self.live[r.request_id]
            text, new_ids, reason = "", [], None
            for token in row:
                r.output_ids.append(token)
                reason = self._finish_reason(r, token)
                delta, hit = ("", False) if token in r.stop_ids else live.stops.feed(live.decoder.push(token))
                if hit:
                    reason = FinishReason.STOP
                elif reason is not None:
                    delta += live.stops.feed(live.decoder.flush())[0] + live.stops.flush()
                text += delta
                new_ids += [] if token in r.stop_ids else [token]
                if reason is not None:
                    break
            if reason is not None:
                self._finish(r, reason)
            outputs.append(RequestOutput(r.request_id, text, tuple(new_ids), len(r.prompt_ids), len(r.output_ids), reason))
        return outputs

    def _finish_reason(self, r: Request, token: int) -> FinishReason | None:
        if token in r.stop_ids:
            return FinishReason.STOP
        if len(r.output_ids) >= r.params.max_new_tokens or r.length >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        self.scheduler.finish(request.request_id)
        if request.slot is not None:
            self.cache.free(request.slot)
            request.slot = None
        self.live.pop(request.request_id, None)
        if self._pending is not None and all(r.finish_reason is not None for r in self._pending.requests):
            self._pending = None  # nothing left to apply (the GPU finishes it in stream order; its tokens are dropped)
