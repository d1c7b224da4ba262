"""Tile sweep of the float M=1 GEMV (`lowbit.kernels.dense.dense_gemv_add`) against cuBLAS, one 7B block's four
fused fp16 launches each alone (wqkv, wo, w13, w2), weights rotated through more than twice the L2, CUDA-graph
replays (on an H200, 2026-12-06, BN 4, BK 512, 4 warps, 8 waves had the lowest sum over the four, 102.4 µs,
within 8 % of each launch's best; it is the default now). cuBLAS is timed as the float model runs it without the GEMV: the linear, then the add of its output
into the float32 residual (two launches); "cuBLAS linear" is the matmul alone.

Run from the repository root on a CUDA machine:  PYTHONPATH=src python benchmarks/dense_sweep.py
($DENSE_SWEEP_SECONDS caps the time; a markdown table per launch goes to stdout and $OUT/dense_sweep.md.)
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernels import graph_time  # noqa: E402

from lowbit.kernels.dense import dense_gemv_add  # noqa: E402

DEADLINE = time.time() + float(os.environ.get("DENSE_SWEEP_SECONDS", "150"))
LAUNCHES = [("wqkv", 4096, 3 * 4096), ("wo", 4096, 4096), ("w13", 4096, 2 * 11008), ("w2", 11008, 4096)]
CONFIGS = [{}] + [{"BN": bn, "BK": bk, "num_warps": w, "waves": v}
                  for bn, bk, w, v in [(16, 256, 4, 4), (16, 512, 4, 4), (16, 256, 8, 4), (8, 512, 4, 8),
                                       (4, 512, 8, 8), (4, 1024, 4, 8), (4, 512, 4, 16), (2, 1024, 4, 8),
                                       (8, 256, 8, 8), (4, 512, 4, 4)]]


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    lines = [f"# M=1 float16 GEMV adding into float32 vs cuBLAS ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}), us per launch (GB/s of weight bytes)\n"]
    print(lines[0], flush=True)
    for name, k, n in LAUNCHES:
        nbytes = n * k * 2
        copies = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
                  for _ in range(max(2, -(-120_000_000 // nbytes)))]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        out = torch.zeros(1, n, device="cuda", dtype=torch.float32)
        ref = x.float() @ copies[0].float().T
        rows = []

        def cublas(add=True):
            for w in copies:
                y = torch.nn.functional.linear(x, w)
                if add:
                    out.add_(y)

        rows.append(("cuBLAS linear + add", graph_time(cublas, reps=4) / len(copies)))
        rows.append(("cuBLAS linear", graph_time(lambda: cublas(False), reps=4) / len(copies)))
        for config in CONFIGS:
            if time.time() > DEADLINE:
                break
            try:
                out.zero_()
                dense_gemv_add(x, copies[0], None, out, **config)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-3:
                    raise AssertionError(f"max error {err:.2e}")

                def fn(config=config):
                    for w in copies:
                        dense_gemv_add(x, w, None, out, **config)

                rows.append((str(config or "default"), graph_time(fn, reps=4) / len(copies)))
            except Exception as e:  # a tile the compiler refuses, or a wrong answer
                print(f"{name} {config}: {e!r:.200}", flush=True)
        base = rows[0][1]
        lines += [f"\n### {name}: {k} -> {n}, {nbytes / 1e6:.1f} MB, ideal at 3.0 TB/s {nbytes / 3.0e6:.1f} us\n",
                  "| config | us | GB/s | vs cuBLAS linear + add |", "|---|---|---|---|"]
        lines += [f"| {c} | {t:.2f} | {nbytes / t / 1e3:.0f} | {100 * (t / base - 1):+.1f}% |"
                  for c, t in sorted(rows, key=lambda r: r[1])]
        print("\n".join(lines[-len(rows) - 3:]), flush=True)
        del copies
    path = os.path.join(os.environ.get("OUT", "benchmarks/results"), "dense_sweep.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
