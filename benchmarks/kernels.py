"""GPU timing of lowbit.kernels.qmatmul on one LLaMA-7B block of linears (correctness: the gpu-marked
tests in tests/kernels/test_qmatmul.py).

Run from the repository root on a CUDA machine:  PYTHONPATH=src python benchmarks/kernels.py [--check]
1. (--check) max |y - reference| / max |reference| over bits, group sizes, act-order, dtypes, M, kernels;
2. a tile sweep for 4-bit g128 at each M (the fastest config is used in the table);
3. the tables: microseconds for one block, CUDA-graph replays over distinct weights (4-bit: 101 MB, twice
   the 50 MB L2), for fp16 cuBLAS, our kernels and torch's int4 tinygemm; once as the 7 linears of the
   checkpoint (q, k, v, o 4096x4096; gate, up 4096->11008; down 11008->4096) and once as the 4 launches
   the model runs (q/k/v and gate/up fused). Markdown to stdout and to $OUT/kernels.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

import torch

from lowbit.kernels import qmatmul as qm
from lowbit.kernels.reference import dequant_reference
from lowbit.quant import pack
from report import save, say  # benchmarks/report.py, beside this script

SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # (K, N) of q, k, v, o, gate, up, down
FUSED = [(4096, 3 * 4096), (4096, 4096), (4096, 2 * 11008), (11008, 4096)]  # wqkv, wo, w13, w2
MS = (1, 16, 64, 2048)
DEADLINE = time.time() + float(os.environ.get("BENCH_SECONDS", "330"))  # the tables stop here
SWEEP_DEADLINE = time.time() + float(os.environ.get("SWEEP_SECONDS", "150"))
def random_weight(k, n, bits, group_size=128, act_order=False, seed=0, layout="slots"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = pack.num_groups(k, group_size)
    codes = torch.randint(0, 1 << bits, (k, n), device="cuda", generator=g).to(torch.uint8)
    zeros = torch.randint(0, 1 << bits, (groups, n), device="cuda", generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, device="cuda", generator=g) * 0.02 + 0.002).half()
    g_idx = pack.default_g_idx(k, group_size).cuda()
    if act_order:
        g_idx = g_idx[torch.randperm(k, device="cuda", generator=g)]
    return qm.repack(codes, zeros, scales, g_idx, bits, layout)


def graph_time(fn, reps=5, replays=30) -> float:
    """Median microseconds of one fn() from CUDA-graph replays (fn captured `reps` times per graph)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ correctness

def correctness():
    say("## correctness (max |y - ref| / max |ref|; fp16/bf16 limit 4e-3/2e-2, fp32 2e-5)\n")
    say("| bits | group | act | dtype | M | kernel | config | rel err |")
    say("|---|---|---|---|---|---|---|---|")
    cases = []
    for bits in (2, 3, 4, 8):
        for gs, act in ((128, True), (32, False), (-1, False)):
            cases.append((bits, gs, act, torch.float16))
    cases += [(4, 128, True, torch.bfloat16), (8, 64, False, torch.bfloat16), (4, 128, False, torch.float32)]
    calls = [("gemv", 1, None), ("dot", 1, None), ("dot", 16, None), ("dot", 16, {"host_gather": False}),
             ("dot", 64, None), ("dot", 300, None), ("dot", 300, {"per_slot": True}), ("dequant", 300, None)]
    worst = 0.0
    for bits, gs, act, dtype in cases:
        if time.time() > DEADLINE - 200:
            say("| (correctness pass cut short by the time budget) |")
            break
        k, n = 4160 if gs == 32 else 4096 - 64, 1000  # partial last group, N not a tile multiple
        w = random_weight(k, n, bits, gs, act, seed=bits)
        W = dequant_reference(w).double()
        bias = torch.randn(n, device="cuda").half()
        for kernel, m, config in calls:
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref = x.double() @ W + bias.double()
            try:
                y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                qm.qmatmul(x, w, bias, kernel=kernel, config=config, out=y)
                torch.cuda.synchronize()
                y2 = qm.qmatmul(x, w, bias, kernel=kernel, config=config)
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                same = torch.equal(y, y2)
                locks = int(w.locks.abs().sum())
                flag = "" if same and not locks else f" NONDETERMINISTIC={not same} locks={locks}"
                worst = max(worst, err) if dtype == torch.float16 else worst
                say(f"| {bits} | {gs} | {act} | {str(dtype)[6:]} | {m} | {kernel} | {config or ''} | {err:.2e}{flag} |")
            except Exception as e:  # report and go on: one broken case must not hide the others
                say(f"| {bits} | {gs} | {act} | {str(dtype)[6:]} | {m} | {kernel} | {config or ''} | ERROR {e!r:.200} |")
                traceback.print_exc()
    say(f"\nworst fp16 relative error: {worst:.2e}\n")


# ------------------------------------------------------------------------------------------ timing

def block_fn(weights, xs, run):
    def fn():
        for w, x in zip(weights, xs):
            run(x, w)
    return fn


def ours(weights, m, kernel=None, config=None, dtype=torch.float16):
    xs = [torch.randn(m, w.in_features, device="cuda", dtype=dtype) for w in weights]
    outs = [torch.empty(m, w.out_features, device="cuda", dtype=dtype) for w in weights]

    def fn():
        for w, x, o in zip(weights, xs, outs):
            qm.qmatmul(x, w, kernel=kernel, config=config, out=o)
    return fn


def ours_adding(weights, m, kernel=None, config=None):
    """The block's launches adding into float32 outputs (qmatmul's accumulate: atomics, no split-K finish), with
    the one memset that zeroes them first; None where the kernel for M rows does not add itself (the slots
    layout's GEMV: M=1; the mma kernel: up to 32 rows a launch, more in several)."""
    if (kernel or qm.pick_kernel(m, torch.device("cuda"), weights[0].layout)[0]) not in ("gemv", "mma"):
        return None
    xs = [torch.randn(m, w.in_features, device="cuda", dtype=torch.float16) for w in weights]
    acc = torch.empty(m * sum(w.out_features for w in weights), device="cuda")
    outs = [o.view(m, -1) for o in acc.split([m * w.out_features for w in weights])]

    def fn():
        acc.zero_()
        for w, x, o in zip(weights, xs, outs):
            qm.qmatmul(x, w, kernel=kernel, config=config, out=o, accumulate=True)
    return fn


def without_pdl(fn):
    """fn with programmatic dependent launch off (LOWBIT_PDL=0 while it launches): the A/B for PDL's share."""
    def run():
        old = os.environ.get("LOWBIT_PDL")
        os.environ["LOWBIT_PDL"] = "0"
        try:
            fn()
        finally:
            if old is None:
                del os.environ["LOWBIT_PDL"]
            else:
                os.environ["LOWBIT_PDL"] = old
    return run


def cublas(m, shapes=SHAPES):
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.01 for k, n in shapes]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for k, _ in shapes]
    outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _, n in shapes]

    def fn():
        for x, w, o in zip(xs, ws, outs):
            torch.matmul(x, w, out=o)
    return fn


def tinygemm(m, shapes=SHAPES):
    """torch's int4 tinygemm (bf16 activations, g128), as gpt-fast uses it."""
    packed, sz, xs = [], [], []
    for k, n in shapes:
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        w8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
        packed.append(torch.ops.aten._convert_weight_to_int4pack(w8, 8))
        sz.append(torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16))
        xs.append(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))

    def fn():
        for x, p, s in zip(xs, packed, sz):
            torch.ops.aten._weight_int4pack_mm(x, p, 128, s)
    return fn


def _sweep_configs():
    """(layout, kernel, config) to time at each M: the slots layout's default kernel as the baseline, the GEMV's
    runners-up and the mma kernel's tiles (earlier sweeps, and the variants they ruled out, are in
    benchmarks/results/gpu.md)."""
    slots = [("slots", None, None)]
    gemv = [("slots", "gemv", {"BN": 32, "num_warps": 2, "waves": 8, "unroll": 2}),
            ("slots", "gemv", {"BN": 64, "num_warps": 4, "waves": 8, "unroll": 1})]
    m16 = [("mma", "mma", {"CT": ct, "waves": wv, "num_warps": 4, "stages": st})
           for ct in (4, 8) for wv in (2, 4) for st in (3, 4)]
    # words through registers a few steps ahead beat the shared-memory pipeline by 15-35 % a launch at M=1
    # (H100, 2026-12-07, results/gemv_sweep_mma.md), and at 16 rows (CT 4); CT 8 halves the x rows each program
    # re-reads (at 16 rows and CT 4 they are as many bytes as the weight), untimed at 16 rows until now
    ahead = [("mma", "mma", {"CT": ct, "waves": wv, "num_warps": 4, "stages": 1, "prefetch": 0, "ahead": ah})
             for ct in (4, 8) for wv in (4, 8) for ah in (2, 3)]
    # the slots dot kernel's tiles with fewer registers a thread: offline sm_90 compiles (triton 3.9, N, K and
    # the strides marked divisible by 16 as the launcher marks them) of the defaults give 255 registers and 16
    # stack bytes at M=16 (BM 16, BN 128, 2 warps), 255 registers and 72 stack bytes at M=64 (BM 64, BN 128,
    # 4 warps); these give 80-136 registers and no stack at M=16, 177-255 registers and 0-24 stack bytes at M=64
    dot16 = [("slots", "dot", {"BM": 16, "BN": bn, "num_warps": 4, "waves": wv}) for bn in (64, 128) for wv in (2, 4)]
    dot64 = [("slots", "dot", {"BM": 64, "BN": bn, "num_warps": nw, "waves": 2, "num_stages": st})
             for bn, nw in ((64, 4), (128, 8)) for st in (2, 3)]
    # the weight as the dot's first operand (`dot(swap=True)`): H100, 2026-12-07, M=16 112.5 against 119.7 us,
    # M=64 167.4 against 234.9 (now the defaults); large M: 1.5-1.9x slower than dequantize + cuBLAS
    swap16 = [("slots", "dot", {"BM": 16, "BN": bn, "num_warps": 4, "waves": wv, "swap": True})
              for bn in (64, 128) for wv in (2, 4)]
    swap64 = [("slots", "dot", {"BM": 64, "BN": bn, "num_warps": nw, "waves": 2, "num_stages": 3, "swap": True})
              for bn, nw in ((64, 4), (128, 4), (128, 8))]
    # the mma layout's tile kernel (`mma_dot`, "dot" on that layout): x^T through shared memory, the unpacked
    # weight wgmma's register operand (H100, 2026-12-07: M=32 131.2 us against the mma kernel's 134.3, M=64 206.4
    # against 263.4; M=16 and 2048 lost)
    tiles = {16: [(4, 3, 2), (4, 3, 4)], 32: [(4, 3, 2), (4, 3, 4)],  # (num_warps, num_stages, waves)
             64: [(4, 3, 2), (4, 4, 2), (8, 3, 2), (8, 4, 2)], 128: [(8, 3, 2), (8, 4, 2)]}
    mdot = {bm: [("mma", "dot", {"BM": bm, "CT": 8, "num_warps": nw, "num_stages": st, "waves": wv})
                 for nw, st, wv in tiles[bm]] for bm in tiles}
    # the same kernel with x the dot's first operand (`mma_dot(x_first=True)`): a wgmma chain and a wait a chunk
    # of 128 rows, both operands in shared memory, where the weight-first kernel waits after each K=16 dot
    # (offline sm_90 SASS, Triton 3.6: 1 wait a run against 16; 134-156 registers at 64 rows, no spills; maxnreg
    # 128: two 8-warp programs an SM instead of one, still no spills)
    first = {bm: [("mma", "dot", {"BM": bm, "CT": ct, "num_warps": nw, "num_stages": st, "waves": 2, "x_first": True,
                                  **extra}) for ct, nw, st, extra in xf]
             for bm, xf in ((16, [(8, 4, 3, {})]), (32, [(8, 4, 3, {})]),
                            (64, [(4, 4, 3, {}), (8, 8, 3, {}), (8, 8, 3, {"maxnreg": 128}), (4, 4, 4, {}),
                                  (8, 8, 4, {})]),
                            (128, [(8, 8, 3, {})]))}
    # the slots tile kernel with one dot a group (`per_slot=False`): one wait a group where per slot waits after
    # each K=16 dot (offline sm_90 SASS, Triton 3.6); never timed at 16 and 64 rows
    group = {m: [("slots", "dot", {"BM": m, "BN": bn, "num_warps": nw, "waves": wv, "num_stages": 3, "swap": sw,
                                   "per_slot": False}) for bn, nw, wv in tiles_ for sw in (False, True)]
             for m, tiles_ in ((16, [(64, 4, 4)]), (64, [(128, 8, 2), (64, 4, 2)]))}
    # L2-sized float slices (8/16/32 MB workspaces, so cuBLAS might read them back from the L2) lost to the
    # 64 MB default on an H200 (2026-12-06): 1766.5 / 1529.4 / 1571.5 against 1491.1 us; not swept any more
    big = [("mma", "dequant", {}), ("slots", "dequant", {})]
    mma = [("mma", None, None)]
    # split_fast: one grid axis, the K split fastest and a split count dividing the SM count, so that the programs
    # an SM runs share their rows of x in its L1 (at 16 rows and CT 4, x's bytes from L2 equal the weight's)
    fast = {m: [("mma", "mma", {**qm.pick_kernel(m, torch.device("cuda"), "mma")[1], **extra, "split_fast": True})
                for extra in ({}, {"waves": 8}, {"CT": 8})] for m in (16, 32)}
    return {1: slots + gemv,
            16: slots + mma + first[16] + group[16] + fast[16] + swap16[2:] + ahead[:4] + ahead[4::2] + mdot[16],
            32: slots + mma + first[32] + fast[32] + mdot[32],
            64: slots + mma + first[64] + group[64] + swap64 + ahead[:4] + mdot[64],
            256: slots + mma + first[128] + mdot[128], 2048: big + first[128] + mdot[128]}


SWEEP = _sweep_configs()


def max_error(weights, m, kernel, config) -> float:
    """max |y - reference| / max |reference| over the block's launches for one random x a launch, the reference
    the dequantize + cuBLAS path on the same weight: a config that computes something else is never the fastest."""
    g = torch.Generator(device="cuda").manual_seed(m)
    worst = 0.0
    for w in weights:
        x = torch.randn(m, w.in_features, device="cuda", dtype=torch.float16, generator=g)
        ref = qm.qmatmul(x, w, kernel="dequant").float()
        y = qm.qmatmul(x, w, kernel=kernel, config=config).float()
        worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item())
    return worst


def sweep(weights):
    """weights: {layout: the block's 4-bit weights in it}. -> {(M, layout): (us, kernel, config)} of the fastest
    for each layout whose result agrees with the reference (`max_error` at most 1e-2)."""
    best = {}
    say("## tile sweep, 4-bit g128, one 7B block as the model runs it (4 fused launches), us\n")
    say("| M | layout | kernel | config | us | max error |")
    say("|---|---|---|---|---|---|")
    for m in [int(v) for v in os.environ.get("SWEEP_MS", "1,16,64,2048").split(",") if v]:  # "": no sweep
        for layout, kernel, config in SWEEP[m]:
            if time.time() > SWEEP_DEADLINE:
                say("| (sweep cut short by the time budget) |")
                return best
            try:
                err = max_error(weights[layout], m, kernel, config)
                t = graph_time(ours(weights[layout], m, kernel, config))
                wrong = " WRONG" if not err <= 1e-2 else ""
                say(f"| {m} | {layout} | {kernel or 'default'} | {config or ''} | {t:.1f} | {err:.1e}{wrong} |")
                if not wrong and ((m, layout) not in best or t < best[m, layout][0]):
                    best[m, layout] = (t, kernel, config)
            except Exception as e:
                say(f"| {m} | {layout} | {kernel} | {config} | ERROR {e!r:.200} |")
                traceback.print_exc()
    say("")
    return best


def per_shape(w4, best):
    """Each fused launch alone at M=1 (the default config, the best with and without PDL, and the default adding
    into float32 with no split-K finish; weights rotated through twice the L2): where the time goes."""
    ones = [(t, layout, kernel, config) for (m, layout), (t, kernel, config) in best.items() if m == 1]
    if not ones:
        return
    _, layout, kernel, config = min(ones, key=lambda r: r[0])
    say(f"## M=1 per launch ({layout} {kernel} {config}), us (GB/s of weight bytes)\n")
    say("| K x N | default | best | best, PDL off | default, adding into float32 | ideal at 3.0 TB/s |")
    say("|---|---|---|---|---|---|")
    for i, w in enumerate(w4[layout]):
        nbytes = w.qweight.numel() * 4 + w.scales.numel() * 4
        copies = [w] + [random_weight(w.in_features, w.out_features, 4, seed=100 + i * 8 + c, layout=layout)
                        for c in range(max(0, -(-120_000_000 // nbytes) - 1))]  # > twice the L2
        cells = []
        for wrap, (kn, cf) in ((lambda fn: fn, (None, None)), (lambda fn: fn, (kernel, config)),
                               (without_pdl, (kernel, config))):
            t = graph_time(wrap(ours(copies, 1, kn, cf)), reps=4) / len(copies)
            cells.append(f"{t:.1f} ({nbytes / t / 1e3:.0f})")
        t = graph_time(ours_adding(copies, 1), reps=4) / len(copies)
        cells.append(f"{t:.1f} ({nbytes / t / 1e3:.0f})")
        say(f"| {w.in_features} x {w.out_features} | " + " | ".join(cells) + f" | {nbytes / 3e6:.1f} |")
    say("")


def table(best, shapes=SHAPES, title="the 7 linears of the checkpoint"):
    weight_mb = {b: sum(k * n * b / 8 + (k // 128) * n * 4 for k, n in shapes) / 1e6 for b in (3, 4, 8)}
    rows = {}
    w4 = [random_weight(k, n, 4, seed=i) for i, (k, n) in enumerate(shapes)]
    w4m = [random_weight(k, n, 4, seed=i, layout="mma") for i, (k, n) in enumerate(shapes)]
    cuda = torch.device("cuda")

    def sorted_input(ws, m):
        return [w.for_sorted_input() for w in ws] if qm.sorted_input_pays(m, cuda, ws[0].layout) else ws

    variants = [("fp16 cuBLAS", lambda m: cublas(m, shapes)),
                ("ours 4-bit g128", lambda m: ours(w4, m, *pick(m, w4))),
                ("ours 4-bit g128, PDL off", lambda m: without_pdl(ours(w4, m, *pick(m, w4)))),
                ("ours 4-bit g128, GEMV adding into float32 (atomics, no split-K finish; + 1 memset)",
                 lambda m: ours_adding(w4, m, *pick(m, w4))),
                ("ours 4-bit g128, mma layout (LOWBIT_MMA=1)", lambda m: ours(w4m, m, *pick(m, w4m))),
                ("ours 4-bit g128, mma layout adding into float32 (atomics, no split-K finish; + 1 memset)",
                 lambda m: ours_adding(w4m, m, *pick(m, w4m))),
                ("ours 4-bit g128 act-order, as in the model (x arrives sorted, up to M=256)",
                 lambda m: ours(sorted_input(w4a, m), m, *pick(m, w4a))),
                ("ours 4-bit g128 act-order, x gathered by the linear", lambda m: ours(w4a, m, *pick(m, w4a))),
                ("ours 8-bit g128", lambda m: ours(w8, m)),
                ("ours 3-bit g128", lambda m: ours(w3, m)),
                ("torch int4 tinygemm (bf16)", lambda m: tinygemm(m, shapes))]

    def pick(m, ws):
        """The sweep's winner at M for weights in its layout, else the dispatch's default."""
        _, kernel, config = best.get((m, ws[0].layout), (0, None, None))
        return kernel, config

    w4a = [random_weight(k, n, 4, act_order=True, seed=10 + i) for i, (k, n) in enumerate(shapes)]
    w8 = [random_weight(k, n, 8, seed=20 + i) for i, (k, n) in enumerate(shapes)]
    w3 = [random_weight(k, n, 3, seed=30 + i) for i, (k, n) in enumerate(shapes)]
    for m in MS:  # variants side by side for each M: the GPU slows over minutes of load (gpu.md)
        for name, make in variants:
            if time.time() > DEADLINE:
                rows.setdefault(name, {})[m] = "time"
                continue
            try:
                fn = make(m)
                rows.setdefault(name, {})[m] = "-" if fn is None else f"{graph_time(fn):.1f}"
            except Exception as e:
                rows.setdefault(name, {})[m] = "n/a"
                say(f"{name} M={m}: {e!r:.300}")
            torch.cuda.empty_cache()
    lines = [f"## one LLaMA-7B block of linears as {title}, us\n",
             f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}; "
             f"CUDA-graph replay, median; 4-bit weights {weight_mb[4]:.0f} MB -> "
             f"{weight_mb[4] / 3.0:.1f} us at 3 TB/s\n",
             "| variant | " + " | ".join(f"M={m}" for m in MS) + " |",
             "|---|" + "---|" * len(MS)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(r.get(m, "") for m in MS) + " |")
    lines.append("\nconfigs used for 'ours': " + "; ".join(f"M={m} {lay}: {k} {c}"
                                                            for (m, lay), (_, k, c) in sorted(best.items())))
    return w4, "\n".join(lines)


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    say(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}\n")
    if "--check" in sys.argv:
        t0 = time.time()
        correctness()
        say(f"(correctness: {time.time() - t0:.0f} s)\n")
    w4 = {layout: [random_weight(k, n, 4, seed=i, layout=layout) for i, (k, n) in enumerate(FUSED)]
          for layout in ("mma", "slots")}  # sweep what the model runs
    t0 = time.time()
    best = sweep(w4)
    say(f"(sweep: {time.time() - t0:.0f} s)\n")
    per_shape(w4, best)
    out = os.environ.get("OUT")
    if out:  # the winners, in qmatmul.CUDA_CONFIGS' terms, for benchmarks/gpu_decode.py --tuned
        import json

        bounds = {1: 1, 16: 16, 32: 32, 64: 64, 256: 256, 2048: 1 << 62}
        with open(os.path.join(out, "tuned.json"), "w") as f:  # [bound, kernel, config, layout] rows
            json.dump([[bounds[m], k, c or {}, lay] for (m, lay), (_, k, c) in sorted(best.items()) if k], f)
    del w4
    torch.cuda.empty_cache()
    tables = [(FUSED, "the model runs them (4 launches: q/k/v and gate/up fused)")]
    if "--unfused" in sys.argv:
        tables.append((SHAPES, "the 7 linears of the checkpoint"))
    for shapes, title in tables:
        _, text = table(best, shapes, title)
        say(text + "\n")
        torch.cuda.empty_cache()
    save("kernels.md")


if __name__ == "__main__":
    main()
