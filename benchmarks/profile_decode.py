"""Where a decode step's time goes: the GPU time of each kernel in one captured decode step (batch 1 or --batch).

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/profile_decode.py [--shape llama-7b] [--variants gptq-4bit-g128,fp16]
        [--prefill 128]   (also profile an eager prefill of that many tokens, the TTFT's main part) [--batch 4]
For each variant: a random model of the shape, one decode step at position 200 captured as a CUDA graph (as
the engine runs it), replayed under torch.profiler. Prints, per kernel name: launches per step, GPU µs per
step and share; then the step's wall time from CUDA events next to the summed kernel time (the difference is
what launch gaps, ramp-up and tails cost), and for each launch of a layer what it adds to the chain and how
early it started (`chain_table`). PDL on and off (LOWBIT_PDL) side by side. Markdown to stdout and
to $OUT/profile_decode.md.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.engine.cuda_graphs import DecodeGraphs
from lowbit.engine.kv_cache import KVCache
from lowbit.eval.random_model import SHAPES, VARIANTS, random_model
from report import save, say  # benchmarks/report.py, beside this script

REPLAYS = 20
def short(name: str) -> str:
    """A kernel's name without template arguments and launch suffixes (cuBLAS names are long)."""
    name = name.split("(")[0].split("<")[0]
    return name if len(name) <= 60 else name[:57] + "..."


def step_wall_us(graph: torch.cuda.CUDAGraph, replays: int = 50) -> float:
    """Median microseconds of one replay of the one-step graph (inputs already staged), from CUDA events."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def gpu_kernels(prof) -> list:
    """The profiled GPU kernels in launch order (memory copies left out)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith("Memcpy")]


def per_kernel(kernels: list, runs: int = 1) -> dict[str, tuple[float, float]]:
    """{kernel name: (launches per run, GPU µs per run)} of kernels profiled over `runs` runs."""
    per = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        per[short(e.name)][0] += 1
        per[short(e.name)][1] += e.device_time
    return {k: (n / runs, us / runs) for k, (n, us) in per.items()}


LAYER = ("RMSNorm (attention)", "wqkv", "attention", "wo", "RMSNorm (MLP)", "w13", "w2")  # a decode layer's launches


def chain_table(kernels: list) -> dict[str, tuple[float, float, float]]:
    """{launch of a layer: median µs of (its end - the previous kernel's end, how long it had started before the
    previous kernel ended, its own start-to-end span)} over every layer found in launch order (a norm, a linear,
    the decode attention, a linear, a norm, two linears). With PDL the first is what the launch adds to the
    chain; the second is how much of it overlapped the kernel before (its loads issued before its wait)."""
    names = [short(e.name) for e in kernels]
    start = [e.time_range.start for e in kernels]
    end = [e.time_range.end for e in kernels]
    rows = collections.defaultdict(list)
    for i, name in enumerate(names):
        if name != "_decode_kernel" or i < 3 or i + 4 >= len(kernels):
            continue
        if "norm" not in names[i - 2] or "norm" not in names[i + 2]:
            continue  # not the plain layer pattern (e.g. the step's first layer after other ops)
        for j, label in enumerate(LAYER):
            k = i - 2 + j
            rows[label].append((end[k] - end[k - 1], end[k - 1] - start[k], end[k] - start[k]))
    return {label: tuple(statistics.median(r[c] for r in rows[label]) for c in range(3))
            for label in LAYER if rows[label]}


def kernel_table(graph: torch.cuda.CUDAGraph):
    """{kernel: (launches per step, µs per step)}, the summed kernel µs per step, the step's first kernels and the
    layer's launches in the chain (`chain_table`)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    kernels = gpu_kernels(prof)
    table = {k: (round(n), us) for k, (n, us) in per_kernel(kernels, REPLAYS).items()}
    return table, sum(us for _, us in table.values()), kernels[:14], chain_table(kernels)


def profile_prefill(model, tokens: int) -> None:
    """Wall time of a batch-1 prefill of `tokens` (median of 5, eager as the engine runs it, PDL off) next to its
    summed kernel time, its kernels by GPU time, and its host time by Python function: a wall far above the
    kernels means host work or a sync."""
    device = torch.device("cuda")
    cache = KVCache(model.config, 1, tokens + 1, torch.float16, device)
    x = torch.randint(1, model.config.vocab_size, (1, tokens), device=device)
    rows = torch.zeros(1, dtype=torch.long, device=device)

    def run():
        with torch.inference_mode():
            model(x, None, cache, rows, last_only=True)
        torch.cuda.synchronize()

    times = []
    for i in range(7):
        t0 = time.perf_counter()
        run()
        if i >= 2:  # the first runs compile
            times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    host = cProfile.Profile()
    host.enable()
    run()
    host.disable()
    listing = io.StringIO()
    pstats.Stats(host, stream=listing).sort_stats("tottime").print_stats(14)
    per = per_kernel(gpu_kernels(prof))
    busy = sum(us for _, us in per.values())
    say(f"- prefill of {tokens} tokens: {statistics.median(times) * 1e3:.2f} ms wall (median of 5, runs "
        f"{', '.join(f'{t * 1e3:.1f}' for t in times)}), kernels {busy / 1e3:.2f} ms summed\n")
    say("| kernel | launches | µs | share |")
    say("|---|---|---|---|")
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:12]:
        say(f"| {name} | {n:.0f} | {us:.1f} | {us / busy:.1%} |")
    say("\nHost time of one prefill by Python function (cProfile, own time first):\n\n```")
    say("\n".join(line for line in listing.getvalue().splitlines() if line.strip())[-3000:])
    say("```\n")


def profile_variant(shape: str, variant: str, prefill: int = 0, batch: int = 1) -> None:
    device = torch.device("cuda")
    model = random_model(SHAPES[shape], VARIANTS[variant], device)
    cache = KVCache(model.config, batch, 384, torch.float16, device)
    results = {}
    for pdl in ("1", "0"):
        os.environ["LOWBIT_PDL"] = pdl
        graphs = DecodeGraphs(model, cache, batch)  # captured anew: PDL is decided at capture
        graphs.run([1] * batch, [200] * batch, list(range(batch)))  # captures; stages the inputs replays reuse
        graph = graphs.graphs[batch, 1].graph
        wall = step_wall_us(graph)
        table, busy, first, chain = kernel_table(graph)
        results[pdl] = (wall, table, busy, first, chain)
        del graphs
    os.environ.pop("LOWBIT_PDL")
    say(f"## {shape} {variant}: one decode step, batch {batch}, position 200\n")
    for pdl, (wall, _, busy, _, _) in results.items():
        say(f"- PDL {'on' if pdl == '1' else 'off'}: step {wall:.0f} µs wall (graph replay), kernels {busy:.0f} µs "
            f"summed ({busy / wall:.0%} of wall: with PDL kernels overlap, so this can pass 100%)")
    say("")
    say("| a layer's launch, in the chain (PDL on / off) | adds to the step, µs | started before the one before it "
        "ended, µs | its span, µs |")
    say("|---|---|---|---|")
    for label in LAYER:
        cells = [" / ".join(f"{results[p][4][label][c]:.1f}" if label in results[p][4] else "-" for p in ("1", "0"))
                 for c in range(3)]
        say(f"| {label} | {' | '.join(cells)} |")
    say("")
    wall, table, busy, first, _ = results["0"]  # with PDL a kernel's span includes its wait for the one before
    say("| kernel (PDL off: each kernel's own time) | launches/step | µs/step | µs/launch | share of kernel time |")
    say("|---|---|---|---|---|")
    for name, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        say(f"| {name} | {n} | {us:.1f} | {us / max(n, 1):.1f} | {us / busy:.1%} |")
    say("\nThe step's first kernels in order (PDL off), µs: " + ", ".join(
        f"{short(e.name)} {e.device_time:.1f}" for e in first) + "\n")
    if prefill:
        os.environ["LOWBIT_PDL"] = "0"  # with PDL a kernel's span includes its wait for the one before
        profile_prefill(model, prefill)
        os.environ.pop("LOWBIT_PDL")
    del model, cache
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    p.add_argument("--variants", default="gptq-4bit-g128,fp16")
    p.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens (0: no)")
    p.add_argument("--batch", type=int, default=1, help="rows of the decode step (a power of two: a graph bucket)")
    args = p.parse_args()
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}\n")
    for v in args.variants.split(","):
        profile_variant(args.shape, v, args.prefill, args.batch)
    save("profile_decode.md")


if __name__ == "__main__":
    main()
