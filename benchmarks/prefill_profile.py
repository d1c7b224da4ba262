"""Where a prefill's time goes (the time to first token): the host against the GPU, launches, the host's top ops.

Why: `lowbit bench`'s TTFT at 128 tokens (31.7-74.3 ms on an H100 over sessions) about equals its 1024-token
prefill's time (32.6-64 ms), so most of it is a fixed cost, not GPU work that grows with the prompt. This says how
much of a prefill the GPU is busy, how many kernels it launches and which host ops cost the most, so that the fix
(fewer launches, CUDA graphs for prefill chunks, less Python a launch) can be chosen from numbers.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/prefill_profile.py [--shape llama-7b] [--variant gptq-4bit-g128] [--tokens 128]
        [--layers N] [--device cuda]
Rows: wall ms of one prefill (median of 5, synchronized), GPU busy ms (the sum of its kernels' times) and kernels
launched (torch.profiler), then the host ops with the most self CPU time, then the Python functions with the
most own time (cProfile: Triton's launcher shows there, not among torch's ops). Markdown to stdout and to
$OUT/prefill_profile.md. `--device cpu --variant fp16 --layers 1` runs it anywhere (a smoke test).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.engine.kv_cache import KVCache
from lowbit.engine.prefill import prefill
from lowbit.eval.random_model import SHAPES, VARIANTS, random_model
from report import save, say  # benchmarks/report.py, beside this script

RUNS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(run, device: torch.device) -> float:
    """Median ms of RUNS synchronized runs of `run`."""
    times = []
    for _ in range(RUNS):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_time_us(event) -> float:
    """A profiled kernel's own device time, µs (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--variant", default="gptq-4bit-g128", choices=sorted(VARIANTS))
    ap.add_argument("--tokens", type=int, default=128, help="prompt length")
    ap.add_argument("--layers", type=int, help="keep only this many layers (a quicker, smaller run)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    if args.layers:
        shape = dataclasses.replace(shape, num_layers=args.layers)
    variant = VARIANTS[args.variant]
    model = random_model(shape, variant, device)
    cache = KVCache(model.config, 1, args.tokens + 1, variant.dtype, device)
    prompt = torch.randint(1, shape.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    def run() -> None:
        with torch.inference_mode():
            prefill(model, cache, prompt, 0, None, device)

    run()  # compiles the kernels
    wall = wall_ms(run, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(kernel_time_us(e) for e in kernels) / 1e3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"# Prefill of {args.tokens} tokens, {args.shape} ({shape.num_layers} layers) {args.variant} ({name}, "
        f"torch {torch.__version__})\n")
    say("| wall ms (median of 5) | GPU busy ms | kernels launched | µs of wall a kernel |")
    say("|---|---|---|---|")
    per = f"{wall * 1e3 / len(kernels):.1f}" if kernels else "-"
    say(f"| {wall:.2f} | {busy:.2f} | {len(kernels)} | {per} |\n")
    say("Host ops by self CPU time (one profiled prefill):\n")
    say("```")
    say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    say("```\n")
    say("Python functions by own time (one prefill under cProfile, which slows the host):\n")
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    _sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    say("```")
    say(text.getvalue().strip())
    say("```")
    save("prefill_profile.md")


if __name__ == "__main__":
    main()
