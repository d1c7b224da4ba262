"""`lowbit bench`: decode and prefill speed through the Engine, time to first token, peak GPU memory, and the
weight bandwidth a decode step achieves against the device's measured copy bandwidth; one table.

Owns the measurement protocol (warm-up runs that compile kernels and capture graphs, then timed runs of
greedy requests that ignore EOS, through the engine as users get it: CUDA graphs and bursts of
`decode_steps` tokens per host sync, the next burst running while the host handles one, unless told
otherwise) and the table. The "graph-only" column replays the batch-1 graph the engine decodes with (a burst
of decode_steps tokens) with no host work between replays, at the timed run's middle position: what the GPU
alone sustains, the ceiling of the engine's b=1 column. Prefill speed and TTFT are medians of `TIMINGS` runs.
What is measured comes in as a model: a loaded checkpoint or a random model of a named shape
(`lowbit.eval.random_model`). Only the Engine's public API is used.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError
from lowbit.eval.random_model import SHAPES, VARIANTS, decode_bytes, random_model
from lowbit.model.llama import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What to run: batch sizes, prompt and output lengths, the prefill prompt and the KV cache length."""

    batches: tuple[int, ...] = (1, 4, 16, 64)
    prompt_len: int = 128  # decode runs: prompt tokens per request (its prefill time is the TTFT)
    new_tokens: int = 256  # decode runs: tokens generated per request
    prefill_len: int = 1024  # the prompt whose prefill gives prefill tokens/s
    context: int | None = None  # KV cache length per request (default prompt_len + new_tokens)
    cuda_graphs: bool = True
    decode_steps: int = EngineConfig.decode_steps  # greedy tokens per graph replay / host sync
    overlap_bursts: bool = EngineConfig.overlap_bursts  # the next burst runs while the host handles this one
    prefill_chunk: int | None = EngineConfig.prefill_chunk
    prefill_graphs: int = EngineConfig.prefill_graphs  # prompts up to this many tokens prefill from CUDA graphs
    embeddings_on_host: bool = False


@dataclass
class BenchRow:
    name: str
    decode: dict[int, float | str] = field(default_factory=dict)  # batch -> tokens/s (all rows), or why not
    graph_tps: float | None = None  # batch 1, replays of the engine's decode graph alone (no host work)
    prefill_tps: float | None = None
    ttft_ms: float | None = None
    peak_gb: float | None = None  # one request: load, batch-1 decode at `context` positions, the long prefill
    peak_all_gb: float | None = None  # over every run here (largest batch too)
    weight_gb: float = 0.0  # bytes one decode step reads
    note: str = ""


class _NullTokenizer:
    """What the Engine needs of a tokenizer, for random models: no EOS, one character per token."""

    eos_ids: tuple[int, ...] = ()
    hf = SimpleNamespace(added_tokens_decoder={})

    def decode(self, ids) -> str:
        return "x" * len(ids)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written. Resets the allocator's
    peak afterwards, so that its buffers do not count in the peak of a model loaded next."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    gbps = 2 * nbytes * 10 / (start.elapsed_time(end) * 1e-3) / 1e9
    del a, b
    _release()
    _reset_peak(device)
    return gbps


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


TIMINGS = 3  # prefill and TTFT: the median of this many runs (one run's host time varied 31-77 ms on an H100)


def _timed_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first tokens, seconds of the decode steps after it, tokens those steps made)."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()  # admits and prefills every prompt: first tokens
    t1 = time.perf_counter()
    tokens = 0  # a step makes one token per row, or a burst of decode_steps
    while engine.num_unfinished:
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return t1 - t0, time.perf_counter() - t1, tokens


def _graph_tps(engine: Engine, steps: int, position: int, replays: int = 100) -> float | None:
    """Batch-1 decode rate of replays of the `steps`-token graph alone, its tokens at `position` onwards (the
    attention's work grows with it; the cache's contents there do not matter for timing): the GPU's share of a
    token."""
    if engine.graphs is None:
        return None
    engine.graphs.run([1], [position], [0], steps)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = engine.graphs.graphs[1, steps].graph
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return replays * steps / (start.elapsed_time(end) * 1e-3)


def _peak(device: torch.device) -> int:
    """The allocator's peak since its last reset, in bytes (0 off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def bench_model(name: str, model: Transformer, tokenizer, config: BenchConfig) -> BenchRow:
    """Every measurement of the table for one model (on its device; CPU runs give no memory figures).

    Memory: callers reset the allocator's peak before loading the model, so its value on entry is the load's.
    `peak_gb` is the most GPU memory allocated at any point of what one request goes through: the load, the
    batch-1 decode run (an engine of `context` positions) and the long prefill (an engine of
    max(context, prefill_len + 1) positions). `peak_all_gb` also covers the larger batches.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    context = config.context or config.prompt_len + config.new_tokens
    row = BenchRow(name, weight_gb=decode_bytes(model) / 1e9)

    def engine(batch: int, seq: int) -> Engine:
        return Engine(model, tokenizer, EngineConfig(max_batch=batch, max_seq_len=seq, cuda_graphs=config.cuda_graphs,
                                                     decode_steps=config.decode_steps,
                                                     overlap_bursts=config.overlap_bursts,
                                                     prefill_chunk=config.prefill_chunk,
                                                     prefill_graphs=config.prefill_graphs,
                                                     embeddings_on_host=config.embeddings_on_host))

    peaks = {"load": _peak(device)}
    for batch in config.batches:
        _reset_peak(device)
        eng = None
        try:
            eng = engine(batch, context)
            # compile, capture the single-step and the burst graphs (a burst, then single steps to the end)
            _timed_run(eng, _prompts(vocab, batch, config.prompt_len, 1), config.decode_steps + 2)
            first, decode_s, tokens = _timed_run(eng, _prompts(vocab, batch, config.prompt_len, 2), config.new_tokens)
            row.decode[batch] = tokens / decode_s
            if batch == 1:  # one prefill's host time is noisy: the median of this and TIMINGS - 1 more
                firsts = [first] + [_timed_run(eng, _prompts(vocab, 1, config.prompt_len, 10 + i), 1)[0]
                                    for i in range(TIMINGS - 1)]
                row.ttft_ms = statistics.median(firsts) * 1e3
                steps = config.decode_steps if eng.bursts is not None else 1
                middle = min(config.prompt_len + config.new_tokens // 2, context - steps)
                row.graph_tps = _graph_tps(eng, steps, middle)
        except torch.cuda.OutOfMemoryError:
            row.decode[batch] = "oom"
        finally:
            peaks[batch] = _peak(device)
            eng = None
            _release()
    _reset_peak(device)
    try:
        eng = engine(1, max(context, config.prefill_len + 1))
        _timed_run(eng, _prompts(vocab, 1, config.prefill_len, 3), 1)
        firsts = [_timed_run(eng, _prompts(vocab, 1, config.prefill_len, 4 + i), 1)[0] for i in range(TIMINGS)]
        row.prefill_tps = config.prefill_len / statistics.median(firsts)
    except torch.cuda.OutOfMemoryError:
        row.note = "prefill: oom"
    finally:
        peaks["prefill"] = _peak(device)
        eng = None
        _release()
    if device.type == "cuda":
        log.info("%s peak GB: %s", name, ", ".join(f"{k} {v / 1e9:.2f}" for k, v in peaks.items()))
        if isinstance(row.decode.get(1), float) and row.prefill_tps is not None:
            row.peak_gb = max(peaks["load"], peaks[1], peaks["prefill"]) / 1e9
        row.peak_all_gb = max(peaks.values()) / 1e9
    return row


def bench_shape(shape: str, variants: list[str], config: BenchConfig, device: torch.device,
                report: Callable[[BenchRow], None] = lambda row: None) -> list[BenchRow]:
    """Random models of `shape`, one variant at a time (each freed before the next is built)."""
    if shape not in SHAPES:
        raise LowbitError(f"unknown shape {shape!r}; choose {', '.join(SHAPES)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LowbitError(f"unknown variant {unknown[0]!r}; choose {', '.join(VARIANTS)}")
    rows = []
    for name in variants:
        _reset_peak(device)  # the load's peak is this variant's
        try:
            model = random_model(SHAPES[shape], VARIANTS[name], device)
        except LowbitError as e:
            rows.append(BenchRow(name, note=str(e)))
        else:
            log.info("benchmarking %s %s", shape, name)
            try:
                rows.append(bench_model(name, model, _NullTokenizer(), config))
            except Exception as e:  # one broken variant must not hide the others' numbers
                log.exception("%s failed", name)
                rows.append(BenchRow(name, note=f"error: {type(e).__name__}: {e}"[:200]))
        model = None
        _release()
        report(rows[-1])
    return rows


def table(rows: list[BenchRow], config: BenchConfig, copy_gbps: float) -> str:
    """Markdown: one row per model, decode tokens/s per batch size, then the single-stream numbers."""
    def num(v, fmt="{:.0f}"):
        return "" if v is None else v if isinstance(v, str) else fmt.format(v)

    head = ["variant"] + [f"decode tok/s b={b}" for b in config.batches]
    head += ["b=1 graph-only tok/s", f"prefill tok/s ({config.prefill_len})", f"TTFT ms ({config.prompt_len})",
             "peak GB (b=1: load, prefill, decode)", "peak GB (all)", "weights GB/token", "weight GB/s (b=1)",
             "% of copy BW", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tps = r.decode.get(1)
        gbps = r.weight_gb * tps if isinstance(tps, float) else None
        cells = [r.name] + [num(r.decode.get(b)) for b in config.batches]
        cells += [num(r.graph_tps), num(r.prefill_tps), num(r.ttft_ms, "{:.1f}"), num(r.peak_gb, "{:.2f}"),
                  num(r.peak_all_gb, "{:.2f}"),
                  num(r.weight_gb, "{:.2f}"), num(gbps), num(None if gbps is None else 100 * gbps / copy_gbps),
                  r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
