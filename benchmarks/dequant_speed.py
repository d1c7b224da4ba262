"""How fast each layout's dequantization runs (the large-M path: dequantize, then cuBLAS), for the four launches
of one LLaMA-7B block (4-bit g128), against a device-to-device copy of the same float bytes.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/dequant_speed.py
Prints µs a launch (CUDA-graph replays, median) and GB/s of what it moves (packed bytes read + float bytes
written); markdown to stdout and to $OUT/dequant_speed.md.
"""

from __future__ import annotations


import torch

from kernels import FUSED, graph_time, random_weight  # benchmarks/kernels.py, beside this script
from report import save, say
from lowbit.kernels.qmatmul import dequantize


def main() -> None:
    say(f"# dequantize, 4-bit g128, one 7B block ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    say("| K x N | layout | µs | GB/s moved | float copy µs |")
    say("|---|---|---|---|---|")
    for k, n in FUSED:
        copy_src = torch.empty(k, n, dtype=torch.float16, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        copy_us = graph_time(lambda: copy_dst.copy_(copy_src))
        for layout in ("slots", "mma"):
            w = random_weight(k, n, 4, layout=layout)
            us = graph_time(lambda: dequantize(w))  # noqa: B023 (timed before the next weight)
            moved = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros)) + 2 * k * n
            say(f"| {k} x {n} | {layout} | {us:.1f} | {moved / us / 1e3:.0f} | {copy_us:.1f} |")
    save("dequant_speed.md")


if __name__ == "__main__":
    main()
