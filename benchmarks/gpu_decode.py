"""Whole-model GPU decode benchmark on random weights of a LLaMA shape: fp16, lowbit GPTQ (4-bit, 4-bit
act-order, 8-bit, 3-bit) and torch's int4 tinygemm side by side, through `lowbit bench`.

Run from the repository root on a CUDA machine:
    PYTHONPATH=src python benchmarks/gpu_decode.py [--shape llama-7b] [any `lowbit bench` option]
The table goes to stdout and to $OUT/gpu_decode_<shape>.md when $OUT is set (else benchmarks/results/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lowbit.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--shape" not in args:
        args = ["--shape", "llama-7b", *args]
    shape = args[args.index("--shape") + 1]
    if "--out" not in args:
        folder = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        folder.mkdir(parents=True, exist_ok=True)
        args += ["--out", str(folder / f"gpu_decode_{shape}.md")]
    sys.exit(main(["-v", "bench", *args]))
