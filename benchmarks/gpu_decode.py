"""Whole-model GPU decode benchmark on random weights of a LLaMA shape: fp16, lowbit GPTQ (4-bit, 4-bit
act-order, 8-bit, 3-bit) and torch's int4 tinygemm side by side, through `lowbit bench`.

Run from the repository root on a CUDA machine:
    PYTHONPATH=src python benchmarks/gpu_decode.py [--shape llama-7b] [--tuned tuned.json] [`lowbit bench` options]
(--tuned, may repeat: the kernel configs a benchmarks/kernels.py sweep picked, instead of qmatmul's defaults;
--deterministic: torch.use_deterministic_algorithms(True), so one-row decode keeps its float16 residual and the
GEMV's split-K finish instead of adding into a float32 residual with atomics, `Block.forward_into`.)
The table goes to stdout and to $OUT/gpu_decode_<shape>.md when $OUT is set (else benchmarks/results/).
Decode runs through the engine as users get it: CUDA graphs, greedy tokens in bursts of --decode-steps
(default 8) per graph replay and host sync. "graph-only" replays that batch-1 burst graph with no host work
in between, at the timed run's middle position (before 2026-12-07: at position 0, where attention costs
least): what the GPU alone sustains, the ceiling of the engine's b=1 column (--decode-steps 1 measures the
single-step graph, as the tables before 2026-11-25 did).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lowbit.cli import main
from lowbit.kernels import qmatmul


def use_tuned(path: str) -> None:
    """Replace rows of qmatmul.CUDA_CONFIGS (MMA_CUDA_CONFIGS for the mma layout) with the winners of a
    benchmarks/kernels.py sweep (tuned.json: [bound, kernel, config, layout] rows; without a layout, the mma
    kernel's rows are the mma layout's)."""
    for bound, kernel, config, *layout in json.loads(Path(path).read_text()):
        mma = (layout[0] if layout else "mma" if kernel == "mma" else "slots") == "mma"
        rows = qmatmul.MMA_CUDA_CONFIGS if mma else qmatmul.CUDA_CONFIGS
        rows[:] = sorted([r for r in rows if r[0] != bound] + [(bound, kernel, config)], key=lambda r: r[0])
        print(f"qmatmul ({'mma' if mma else 'slots'} layout): M <= {bound}: {kernel} {config}", file=sys.stderr)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--deterministic" in args:
        args.remove("--deterministic")
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    while "--tuned" in args:  # each file that exists, in order (a later one's rows replace an earlier one's)
        i = args.index("--tuned")
        if Path(args[i + 1]).exists():
            use_tuned(args[i + 1])
        del args[i:i + 2]
    if "--shape" not in args:
        args = ["--shape", "llama-7b", *args]
    shape = args[args.index("--shape") + 1]
    if "--out" not in args:
        folder = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        folder.mkdir(parents=True, exist_ok=True)
        args += ["--out", str(folder / f"gpu_decode_{shape}.md")]
    sys.exit(main(["-v", "bench", *args]))
