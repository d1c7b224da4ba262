"""How fast each layout's dequantization runs (the large-M path: dequantize, then cuBLAS), for the four launches
of one LLaMA-7B block (4-bit g128), against a device-to-device copy of the same float bytes.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/dequant_speed.py
Prints µs a launch (CUDA-graph replays, median) and GB/s of what it moves (packed bytes read + float bytes
written); markdown to stdout and to $OUT/dequant_speed.md.
"""

from __future__ import annotations

import os

import torch

from kernels import FUSED, graph_time, random_weight  # benchmarks/kernels.py, beside this script
from lowbit.kernels.qmatmul import dequantize


def main() -> None:
    lines = [f"# dequantize, 4-bit g128, one 7B block ({torch.cuda.get_device_name()}, torch {torch.__version__})",
             "", "| K x N | layout | µs | GB/s moved | float copy µs |", "|---|---|---|---|---|"]
    for k, n in FUSED:
        copy_src = torch.empty(k, n, dtype=torch.float16, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        copy_us = graph_time(lambda: copy_dst.copy_(copy_src))
        for layout in ("slots", "mma"):
            w = random_weight(k, n, 4, layout=layout)
            us = graph_time(lambda: dequantize(w))  # noqa: B023 (timed before the next weight)
            moved = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros)) + 2 * k * n
            lines.append(f"| {k} x {n} | {layout} | {us:.1f} | {moved / us / 1e3:.0f} | {copy_us:.1f} |")
            print(lines[-1], flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "dequant_speed.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
