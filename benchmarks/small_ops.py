"""RMSNorm and SiLU*up with and without a channel order (act-order's sorted input), by rows: what placing x's
channels costs the kernel before an act-order linear, next to torch's index_select doing it separately.

Run on a CUDA machine from the repository root (PDL off, so each launch is timed alone):
    PYTHONPATH=src python benchmarks/small_ops.py
LLaMA-7B sizes (hidden 4096, intermediate 11008); µs per launch from CUDA-graph replays of 10 launches.
"""

from __future__ import annotations

import os

import torch

os.environ["LOWBIT_PDL"] = "0"
from lowbit.kernels import norm_rope  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 11008


def graph_us(fn, launches: int = 10, replays: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (launches * replays)


def main() -> None:
    dev = "cuda"
    src_i = torch.randperm(INTERMEDIATE, device=dev).int()
    src_h = torch.randperm(HIDDEN, device=dev).int()
    w = torch.rand(HIDDEN, device=dev).half()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| rows | SiLU*up | in order | then index_select | add+RMSNorm | in order | index_select alone |")
    print("|---|---|---|---|---|---|---|")
    for m in (1, 16, 128, 1024):
        y = torch.randn(m, 2 * INTERMEDIATE, device=dev).half()
        x, r = torch.randn(m, HIDDEN, device=dev).half(), torch.randn(m, HIDDEN, device=dev).half()
        cells = [graph_us(lambda: norm_rope.silu_mul(y)), graph_us(lambda: norm_rope.silu_mul(y, src_i)),
                 graph_us(lambda: norm_rope.silu_mul(y).index_select(-1, src_i)),
                 graph_us(lambda: norm_rope.rms_norm(x, w, 1e-5, r)),
                 graph_us(lambda: norm_rope.rms_norm(x, w, 1e-5, r, src_h)),
                 graph_us(lambda: x.index_select(-1, src_h))]
        print(f"| {m} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
