"""Where a decode step's time goes: the GPU time of each kernel in one captured decode step (batch 1).

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/profile_decode.py [--shape llama-7b] [--variants gptq-4bit-g128,fp16]
For each variant: a random model of the shape, one decode step at position 200 captured as a CUDA graph (as
the engine runs it), replayed under torch.profiler. Prints, per kernel name: launches per step, GPU µs per
step and share; then the step's wall time from CUDA events next to the summed kernel time (the difference is
what launch gaps, ramp-up and tails cost). PDL on and off (LOWBIT_PDL) side by side. Markdown to stdout and
to $OUT/profile_decode.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.engine.cuda_graphs import DecodeGraphs
from lowbit.engine.kv_cache import KVCache
from lowbit.eval.random_model import SHAPES, VARIANTS, random_model

REPLAYS = 20
LINES: list[str] = []


def say(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


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


def kernel_table(graph: torch.cuda.CUDAGraph):
    """{kernel: (launches per step, µs per step)}, the summed kernel µs per step, and the step's first kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith("Memcpy")]
    for e in kernels:
        per[short(e.name)][0] += 1
        per[short(e.name)][1] += e.device_time
    table = {k: (round(n / REPLAYS), us / REPLAYS) for k, (n, us) in per.items()}
    return table, sum(us for _, us in table.values()), kernels[:14]  # the step's first kernels, in order


def profile_variant(shape: str, variant: str) -> None:
    device = torch.device("cuda")
    model = random_model(SHAPES[shape], VARIANTS[variant], device)
    cache = KVCache(model.config, 1, 384, torch.float16, device)
    results = {}
    for pdl in ("1", "0"):
        os.environ["LOWBIT_PDL"] = pdl
        graphs = DecodeGraphs(model, cache, 1)  # captured anew: PDL is decided at capture
        graphs.run([1], [200], [0])  # captures, and stages the inputs every replay below reuses
        graph = graphs.graphs[1, 1].graph
        wall = step_wall_us(graph)
        table, busy, first = kernel_table(graph)
        results[pdl] = (wall, table, busy, first)
        del graphs
    os.environ.pop("LOWBIT_PDL")
    say(f"## {shape} {variant}: one decode step, batch 1, position 200\n")
    for pdl, (wall, _, busy, _) in results.items():
        say(f"- PDL {'on' if pdl == '1' else 'off'}: step {wall:.0f} µs wall (graph replay), kernels {busy:.0f} µs "
            f"summed ({busy / wall:.0%} of wall: with PDL kernels overlap, so this can pass 100%)")
    say("")
    wall, table, busy, first = results["0"]  # with PDL a kernel's span includes its wait for the one before
    say("| kernel (PDL off: each kernel's own time) | launches/step | µs/step | µs/launch | share of kernel time |")
    say("|---|---|---|---|---|")
    for name, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        say(f"| {name} | {n} | {us:.1f} | {us / max(n, 1):.1f} | {us / busy:.1%} |")
    say("\nThe step's first kernels in order (PDL off), µs: " + ", ".join(
        f"{short(e.name)} {e.device_time:.1f}" for e in first) + "\n")
    del model, cache
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    p.add_argument("--variants", default="gptq-4bit-g128,fp16")
    args = p.parse_args()
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}\n")
    for v in args.variants.split(","):
        profile_variant(args.shape, v)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "profile_decode.md"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
