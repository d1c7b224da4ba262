"""Decode attention alone (`lowbit.kernels.attention.decode_attention`): µs per launch at LLaMA-7B's heads (32 q
and kv heads of 128), a 2048-position cache, by row length and batch, for each `row_splits` given (0: the
default, `row_fill`).

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/attention_decode.py [--row-splits 0,1,2,8]
(a tree whose decode_attention has no row_splits runs its default once). µs: the median of CUDA-graph replays
of 10 launches, PDL on (launches overlap as in the model) and off (each alone). Markdown to stdout.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernels import graph_time  # noqa: E402

from lowbit.kernels import attention  # noqa: E402

HEADS, DIM, CACHE = 32, 128, 2048


def launch(batch: int, position: int, row_splits: int | None):
    dev = "cuda"
    q = torch.randn(batch, HEADS, DIM, device=dev, dtype=torch.float16)
    k_new, v_new = (torch.randn(batch, HEADS, DIM, device=dev, dtype=torch.float16) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, HEADS, CACHE, DIM, device=dev, dtype=torch.float16) for _ in range(2))
    rows = torch.arange(batch, device=dev, dtype=torch.int32)
    pos = torch.full((batch,), position, device=dev, dtype=torch.int32)
    locks = torch.zeros(batch * HEADS, device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    extra = {"row_splits": row_splits} if row_splits else {}
    return lambda: attention.decode_attention(q, k_new, v_new, k_cache, v_cache, rows, pos, locks, out=out, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row-splits", default="0,1,2,8")
    p.add_argument("--label", default="")
    args = p.parse_args()
    chunks = [int(c) for c in args.row_splits.split(",")]
    if "row_splits" not in inspect.signature(attention.decode_attention).parameters:
        chunks = [None]
    positions, batches = (128, 256, 384, 1024, 2000), (1, 4)
    print(f"## decode attention {args.label} ({torch.cuda.get_device_name()}), µs per launch, PDL on / off\n")
    print("| batch | row_splits | " + " | ".join(f"pos {t}" for t in positions) + " |")
    print("|---|---|" + "---|" * len(positions))
    for batch in batches:
        for chunk in chunks:
            cells = []
            for t in positions:
                fn = launch(batch, t, chunk)
                on = graph_time(fn, reps=10)
                os.environ["LOWBIT_PDL"] = "0"
                off = graph_time(fn, reps=10)
                del os.environ["LOWBIT_PDL"]
                cells.append(f"{on:.1f} / {off:.1f}")
            print(f"| {batch} | {chunk or 'default'} | " + " | ".join(cells) + " |", flush=True)
    print()


if __name__ == "__main__":
    main()
