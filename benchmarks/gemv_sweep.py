"""Tile sweep of the M=1 GEMV as one-row decode runs it: every launch adds into float32 (qmatmul's accumulate,
atomics, no split-K finish), one 7B block's four fused launches each alone, weights rotated through more than
twice the L2. One row ("l2_resident") reads one copy every launch instead; the "load_only" rows are the probe
below, the grid and loads with no math. The split-K finish's sweep (benchmarks/kernels.py) picked the default
tile; with the finish gone, more K splits cost less, so the best tile may differ, and may differ by shape.

Run from the repository root on a CUDA machine:  PYTHONPATH=src python benchmarks/gemv_sweep.py [--mma]
(--mma: the mma layout's kernel at M=1 in its tiles against the slots GEMV's default, to gemv_sweep_mma.md.)
($GEMV_SWEEP_SECONDS caps the time; a markdown table per launch goes to stdout and $OUT/gemv_sweep.md.)
"""

from __future__ import annotations

import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from kernels import graph_time, random_weight  # noqa: E402

from lowbit.kernels import gemv, splitk  # noqa: E402
from lowbit.kernels import qmatmul as qm  # noqa: E402
from lowbit.kernels.sync import pdl_launch, release_next, wait_previous  # noqa: E402

DEADLINE = time.time() + float(os.environ.get("GEMV_SWEEP_SECONDS", "240"))
# The full tile sweep of 2026-12-06 (BN 32-128, 2-8 warps, 2-16 waves, unroll 1-2, maxnreg 96-128;
# benchmarks/results/gemv_sweep.md) left the default best but for gate/up (-8 %: BN 32, 2 warps, 16 waves,
# maxnreg 128). A half2 version of the math (float16 products, 10 % fewer instructions in the loop) was slower
# at every launch (+2 to +6 %) and was dropped. Now: the default tile at K splits around the default's (the
# blocks each program reads, and how the programs fill whole waves of the SMs), SwiGLU computed once per value
# into a scratch row (swiglu_once: only down_proj's launch reads it), and loads a step ahead (prefetch).
CONFIGS = [{"BN": 64, "num_warps": 4, "unroll": 2, "waves": 4, "swiglu_once": True},
           {"BN": 64, "num_warps": 4, "unroll": 2, "waves": 4, "prefetch": True},
           {"BN": 32, "num_warps": 2, "unroll": 2, "waves": 16, "maxnreg": 128}]
SPLITS = {"wqkv": (4, 5, 8, 11), "wo": (8, 11, 32), "w13": (3, 4, 6, 8), "w2": (8, 11, 22, 29)}  # default's tile
PROBES = ([{"BN": 64, "num_warps": 4, "unroll": 2, "waves": w} for w in (4, 8)]  # load_only_fn
          + [{"BN": 64, "num_warps": 4, "unroll": 2, "waves": 4, "wait_first": True}])
# (name, K, N, input): "x" fp16 x; "swiglu" float32 gate/up sums, the input their SwiGLU (down_proj)
LAUNCHES = [("wqkv", 4096, 3 * 4096, "x"), ("wo", 4096, 4096, "x"), ("w13", 4096, 2 * 11008, "x"),
            ("w2", 11008, 4096, "swiglu")]


@triton.jit
def _load_only(qw_ptr, y_ptr, N, blocks_per_split, num_blocks, BN: tl.constexpr, UNROLL: tl.constexpr,
               WAIT_FIRST: tl.constexpr, PDL: tl.constexpr):
    """The GEMV's grid and word tiles with no math: two [16, BN] chunks a block, xor-reduced, one atomic a
    column (the memory side's ceiling for this decomposition); launched with PDL as the GEMV is, but waiting
    for the kernel before only to add its sums (it reads nothing that kernel writes), or (WAIT_FIRST) before
    any load, as a kernel whose every load depends on the one before."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    release_next(PDL)
    if WAIT_FIRST:
        wait_previous(PDL)
    c0 = pid_n * (2 * BN) + tl.max_contiguous(tl.multiple_of(tl.arange(0, BN), BN), BN)
    wi = tl.arange(0, 16)
    acc = tl.zeros((16, BN), tl.int32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, num_blocks)
    for blk in range(b_start, b_end, UNROLL):
        for u in tl.static_range(UNROLL):
            ptr = qw_ptr + (tl.minimum(blk + u, b_end - 1) * 16 + wi[:, None]) * N + c0[None, :]
            acc ^= tl.load(ptr) ^ tl.load(ptr + BN)
    if not WAIT_FIRST:
        wait_previous(PDL)
    tl.atomic_add(y_ptr + c0, tl.sum(acc, axis=0).to(tl.float32), sem="relaxed")


def load_only_fn(copies, config):
    """The memory-only probe over the weight copies, with `config`'s tile and waves."""
    k, n = copies[0].in_features, copies[0].out_features
    out = torch.zeros(len(copies), n, device="cuda")
    bn, unroll = config.get("BN", 64), config.get("unroll", 1)
    num_blocks = copies[0].qweight.shape[0] // 16
    tiles = -(-n // (2 * bn))
    splits, per = splitk.split_k(num_blocks, tiles, config.get("waves", 4) * splitk.sm_count(out.device))

    def fn():
        out.zero_()
        for i, w in enumerate(copies):
            _load_only[(tiles, splits)](w.qweight, out[i], n, per, num_blocks, BN=bn, UNROLL=unroll,
                                        WAIT_FIRST=config.get("wait_first", False),
                                        num_warps=config.get("num_warps", 4), **pdl_launch(out))
    return fn, "no math"


def launch_fn(copies, kind, config):
    """One adding launch per weight copy (outputs zeroed by one memset, as the model's step does), and the
    compiled kernel's registers and spills."""
    k, n = copies[0].in_features, copies[0].out_features
    x = torch.randn(1, 2 * k if kind == "swiglu" else k, device="cuda",
                    dtype=torch.float16 if kind == "x" else torch.float32)
    out = torch.zeros(len(copies), n, device="cuda")
    extra = {"swiglu_input": torch.float16} if kind == "swiglu" else {}
    compiled = gemv.gemv(x, copies[0], None, out[:1], **config, add=True, x_swiglu=extra.get("swiglu_input"))
    regs = f"{getattr(compiled, 'n_regs', '?')} regs, {getattr(compiled, 'n_spills', '?')} spills"

    def fn():
        out.zero_()
        for i, w in enumerate(copies):
            qm.qmatmul(x, w, kernel="gemv", config=config, out=out[i:i + 1], accumulate=True, **extra)
    return fn, regs


# The mma layout's kernel at M=1 adding into float32 (`mma_matmul(add=True)`): tensor cores do the multiply-adds,
# ~1.3 instructions a weight against the GEMV's ~3.6. x is plain fp16 for every launch (down_proj too: that
# kernel does not compute SwiGLU on load), so w2's row is the matmul alone.
MMA_CONFIGS = [{"CT": ct, "waves": wv, "stages": 1, "prefetch": 0, "num_warps": nw, "ahead": ah, "lanes": ln}
               for ct, wv, nw, ah, ln in [  # ahead: words through registers, that many steps early (the first
                   # sweep, 2026-12-07, results/gemv_sweep_mma.md: Triton's shared-memory pipeline lost to it
                   # everywhere); lanes: each lane adds its own sums (no gather through shared memory)
                   (4, 8, 4, 2, False), (4, 8, 4, 2, True), (4, 8, 4, 3, True), (4, 12, 4, 2, True),
                   (4, 12, 4, 3, True), (4, 16, 4, 3, True), (8, 4, 8, 2, True), (8, 8, 8, 3, True),
                   (4, 8, 8, 3, True)]]


def mma_fn(copies, config):
    """One adding launch of the mma kernel per mma-layout weight copy (fp16 x), outputs zeroed by one memset."""
    k, n = copies[0].in_features, copies[0].out_features
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.zeros(len(copies), n, device="cuda")

    def fn():
        out.zero_()
        for i, w in enumerate(copies):
            qm.qmatmul(x, w, kernel="mma", config=config, out=out[i:i + 1], accumulate=True)
    return fn, "mma"


def ranked(heading, columns, versus, results, nbytes):
    """A markdown table (printed, and returned as lines) of `results`, (us, cell per column) tuples, fastest
    first, with GB/s of `nbytes` and the time against the first result's."""
    base = results[0][0]
    block = [heading, "| rank | " + " | ".join(columns) + f" | us | GB/s | {versus} |",
             "|---" * (len(columns) + 4) + "|"]
    for i, (t, *cells) in enumerate(sorted(results, key=lambda r: r[0])):
        block.append(f"| {i + 1} | " + " | ".join(map(str, cells))
                     + f" | {t:.2f} | {nbytes / t / 1e3:.0f} | {t / base - 1:+.1%} |")
    print("\n".join(block) + "\n", flush=True)
    return block + [""]


def save(lines, name):
    """The tables to $OUT/name (else benchmarks/results/name)."""
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(folder, name), "w") as f:
        f.write("\n".join(lines) + "\n")


def main_mma():
    """The mma kernel's tiles at M=1 against the slots GEMV's default, each launch alone, one table per launch."""
    lines = ["# M=1, adding into float32: the mma kernel's tiles against the slots GEMV "
             f"({torch.cuda.get_device_name()}"
             f", torch {torch.__version__}), us per launch (GB/s of weight bytes)\n"]
    default = qm.CUDA_CONFIGS[0][2]
    for name, k, n, kind in LAUNCHES:
        slots = [random_weight(k, n, 4, seed=s, layout="slots") for s in range(1)]
        nbytes = slots[0].qweight.numel() * 4 + slots[0].scales.numel() * 4
        count = max(2, -(-120_000_000 // nbytes))
        slots += [random_weight(k, n, 4, seed=s, layout="slots") for s in range(1, count)]
        results = []
        fn, _ = launch_fn(slots, kind, dict(default))
        results.append((graph_time(fn, reps=4) / count, f"slots GEMV default {default}"))
        print(f"{name} {results[-1][1]}: {results[-1][0]:.2f} us", flush=True)
        del slots, fn
        copies = [random_weight(k, n, 4, seed=s, layout="mma") for s in range(count)]
        for config in MMA_CONFIGS:
            if time.time() > DEADLINE:
                break
            try:
                fn, _ = mma_fn(copies, config)
                t = graph_time(fn, reps=4) / count
            except Exception as e:
                print(f"{name} mma {config}: {e!r:.200}", flush=True)
                continue
            results.append((t, f"mma {config}"))
            print(f"{name} mma {config}: {t:.2f} us", flush=True)
        lines += ranked(f"## {name}: {k} x {n}, {nbytes / 1e6:.1f} MB, ideal at 3.0 TB/s {nbytes / 3e6:.1f} us\n",
                        ["kernel, config"], "vs slots GEMV", results, nbytes)
        del copies
        torch.cuda.empty_cache()
    save(lines, "gemv_sweep_mma.md")


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if "--mma" in sys.argv:
        return main_mma()
    lines = [f"# M=1 GEMV adding into float32, tile sweep ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}), us per launch (GB/s of weight bytes)\n"]
    print(lines[0], flush=True)
    default = qm.CUDA_CONFIGS[0][2]
    for name, k, n, kind in LAUNCHES:
        copies = [random_weight(k, n, 4, seed=s) for s in range(1)]
        nbytes = copies[0].qweight.numel() * 4 + copies[0].scales.numel() * 4
        copies += [random_weight(k, n, 4, seed=s) for s in range(1, max(2, -(-120_000_000 // nbytes)))]
        results = []
        configs = ([dict(default)] + [dict(c) for c in CONFIGS] + [{**default, "split": n} for n in SPLITS[name]]
                   + [{"load_only": True, **c} for c in PROBES])
        if nbytes < 30e6:  # the same weight every launch, read from the 50 MB L2: the GEMV's cost without DRAM
            configs.append({"l2_resident": True, **default})
        if kind == "swiglu":
            configs += [{**default, "split": n, "swiglu_once": True} for n in SPLITS[name]]
        for config in configs:
            if time.time() > DEADLINE:
                break
            try:
                marks = {key: config.pop(key) for key in ("load_only", "l2_resident") if key in config}
                weights = [copies[0]] * len(copies) if marks.get("l2_resident") else copies
                if marks.get("load_only"):
                    fn, regs = load_only_fn(weights, config)
                else:
                    fn, regs = launch_fn(weights, kind, config)
                config = {**marks, **config}  # as the table shows it
                t = graph_time(fn, reps=4) / len(copies)
            except Exception as e:  # a tile the compiler refuses (registers, shared memory)
                print(f"{name} {config}: {e!r:.200}", flush=True)
                continue
            results.append((t, config, regs))
            print(f"{name} {config} ({regs}): {t:.2f} us", flush=True)
        if not results:
            continue
        lines += ranked(f"## {name}: {k} x {n}, {nbytes / 1e6:.1f} MB, ideal at 3.0 TB/s {nbytes / 3e6:.1f} us; "
                        f"default {default} {results[0][0]:.2f} us\n", ["config", "compiled"], "vs default",
                        results, nbytes)
        del copies
        torch.cuda.empty_cache()
    save(lines, "gemv_sweep.md")


if __name__ == "__main__":
    main()
