"""Where each program of a batch-1 decode step spends its time: a per-program trace of the captured step.

Why: `profile_decode.py`'s chain table gives each launch's first start and last end. With PDL the open
questions lie inside those spans: when a kernel's programs become resident (all at once, or a second wave as
the kernel before frees its SMs), how long after the kernel before ends their wait returns, and how spread their
ends are (the tail). Here every PDL kernel's programs record %globaltimer when they start, when their wait
ends and when they end (`lowbit.kernels.sync.trace`, compiled in only when a buffer is set, as here).

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/trace_step.py [--shape llama-7b] [--variant gptq-4bit-g128] [--layer 16]
One step at position 200 is replayed from a CUDA graph. Two tables: each launch of a layer, medians over the
layers (what it adds, how soon its wait returns, how many programs start late, its tail); then one layer's
launches (and the next layer's first), times in µs from the end of the launch before (its last program's end). Markdown
to stdout and to $OUT/trace_step.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="trace_step_")  # a fresh cache: trace points compile in

import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit.kernels import sync  # noqa: E402
from report import save, say  # noqa: E402  (benchmarks/report.py, beside this script)

CAPACITY = 2 << 20  # records (64 MiB): a 7B step writes about 430 thousand
POSITION, CONTEXT, WARM = 200, 384, 5
def parse(words: torch.Tensor) -> list[tuple[int, int, int, tuple, tuple]]:
    """int32 records [n, 8] -> (time ns, event, sm, block index, grid) each."""
    out = []
    for w in words.tolist():
        w = [v & 0xFFFFFFFF for v in w]
        grid = (w[6], w[7] >> 16, w[7] & 0xFFFF)
        out.append((w[0] | w[1] << 32, w[2] >> 16, w[2] & 0xFFFF, (w[3], w[4], w[5]), grid))
    return out


def launches(records: list) -> list[dict]:
    """The launches in order, each {"grid", "start", "waited", "end"} (lists of ns, one entry a program).

    A dependent kernel launches only once every program of the one before has started (and recorded event 0),
    so the start records sorted by time fall into runs of one grid; a program's k-th start, wait and end records
    (same grid and block index) belong to the k-th launch of that grid."""
    starts = sorted(r for r in records if r[1] == 0)
    out: list[dict] = []
    nth: dict[tuple, list] = {}  # (grid, block) -> the launches its start records went to, in order
    for t, _, _, block, grid in starts:
        if not out or out[-1]["grid"] != grid:
            out.append({"grid": grid, "start": [], "waited": [], "end": []})
        out[-1]["start"].append(t)
        nth.setdefault((grid, block), []).append(out[-1])
    for event, name in ((1, "waited"), (2, "end")):
        seen: dict[tuple, int] = {}
        for t, _, sm, block, grid in sorted(r for r in records if r[1] == event):
            k = seen.get((grid, block), 0)
            seen[(grid, block)] = k + 1
            runs = nth.get((grid, block), [])
            if k < len(runs):
                runs[k][name].append(t)
                if event == 2:
                    runs[k].setdefault("sm_ends", []).append((sm, t))
    return out


def sm_table(runs: list[dict], first: int, count: int) -> None:
    """Whether a launch's late ends sit on the SMs that ran more of its programs: for each count of programs an
    SM ran, how many SMs ran that many and the median (and latest) of their last ends, µs from the previous
    launch's last end."""
    say("| launch | programs an SM ran: SMs, median / latest last end |")
    say("|---|---|")
    for i in range(max(1, first), min(len(runs), first + count)):
        r, ref = runs[i], max(runs[i - 1]["end"] or runs[i - 1]["start"])
        per_sm: dict[int, list] = {}
        for sm, t in r.get("sm_ends", []):
            per_sm.setdefault(sm, []).append(t)
        by_count: dict[int, list] = {}
        for ends in per_sm.values():
            by_count.setdefault(len(ends), []).append((max(ends) - ref) / 1000)
        cells = [f"{n}: {len(v)} SMs, {statistics.median(v):+.1f} / {max(v):+.1f}" for n, v in sorted(by_count.items())]
        say(f"| {i} | {'; '.join(cells)} |")


def layer_table(runs: list[dict], first: int, count: int) -> None:
    """The table of runs[first : first + count], times from the previous launch's last end."""
    say("| launch | grid | programs | starts: first / last | waits end: first / median / last "
        "| ends: first / median / last | adds |")
    say("|---|---|---|---|---|---|---|")
    for i in range(max(1, first), min(len(runs), first + count)):
        r, ref = runs[i], max(runs[i - 1]["end"] or runs[i - 1]["start"])

        def us(ts: list, how=(min, statistics.median, max)) -> str:
            return " / ".join(f"{(f(ts) - ref) / 1000:+.1f}" for f in how) if ts else "-"

        adds = (max(r["end"]) - ref) / 1000 if r["end"] else float("nan")
        say(f"| {i} | {'x'.join(map(str, r['grid']))} | {len(r['start'])} | {us(r['start'], (min, max))} "
            f"| {us(r['waited'])} | {us(r['end'])} | {adds:.1f} |")


def layer_summary(runs: list[dict], lead: int, per_layer: int, layers: int) -> None:
    """Medians over the layers, for each launch of a layer: what it adds (its last end minus the previous
    launch's), how long after that previous end its first wait returned, how many of its programs started only
    after it (a second wave), and its tail (last end minus median end)."""
    say("| launch of a layer | grid | adds, µs | first wait returns, µs after the previous end "
        "| programs started after it | tail, µs |")
    say("|---|---|---|---|---|---|")
    for p in range(per_layer):
        rows = []
        for layer in range(layers):
            i = lead + layer * per_layer + p
            if i < 1 or not runs[i]["end"] or not runs[i]["waited"]:
                continue
            r, ref = runs[i], max(runs[i - 1]["end"] or runs[i - 1]["start"])
            rows.append(((max(r["end"]) - ref) / 1000, (min(r["waited"]) - ref) / 1000,
                         sum(t > ref for t in r["start"]), (max(r["end"]) - statistics.median(r["end"])) / 1000))
        if rows:
            med = [statistics.median(col) for col in zip(*rows)]
            grid = "x".join(map(str, runs[lead + p]["grid"]))
            say(f"| {p} | {grid} | {med[0]:.1f} | {med[1]:+.1f} | {med[2]:.0f} | {med[3]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--variant", default="gptq-4bit-g128")
    ap.add_argument("--layer", type=int, default=16, help="the layer whose launches the table shows")
    args = ap.parse_args()
    device = torch.device("cuda")
    buf = torch.zeros(sync.TRACE_HEADER + CAPACITY * sync.TRACE_RECORD, dtype=torch.uint8, device=device)
    sync.TRACE = tl.constexpr(buf.data_ptr())  # before anything compiles

    from lowbit.engine.cuda_graphs import DecodeGraphs
    from lowbit.engine.kv_cache import KVCache
    from lowbit.eval.random_model import SHAPES, VARIANTS, random_model

    model = random_model(SHAPES[args.shape], VARIANTS[args.variant], device)
    cache = KVCache(model.config, 1, CONTEXT, torch.float16, device)
    graphs = DecodeGraphs(model, cache, 1)
    graphs.run([1], [POSITION], [0])  # compiles and captures (three steps' records: two eager, one replay)
    graph = graphs.graphs[1, 1].graph
    for _ in range(WARM):  # (the record counter restarts before each replay: the buffer holds one step)
        buf[:sync.TRACE_HEADER].zero_()
        graph.replay()
    torch.cuda.synchronize()
    buf[:sync.TRACE_HEADER].zero_()
    graph.replay()
    torch.cuda.synchronize()
    n = int(buf[:4].view(torch.int32))
    if n > CAPACITY:
        raise SystemExit(f"{n} records overflowed the buffer of {CAPACITY}: raise CAPACITY")
    words = buf[sync.TRACE_HEADER:sync.TRACE_HEADER + n * sync.TRACE_RECORD].view(torch.int32).view(n, 8).cpu()
    records = parse(words)
    runs = launches(records)
    times = sorted({r[0] for r in records})
    step = (max(times) - min(times)) / 1000
    tick = min((b - a for a, b in zip(times, times[1:]) if b > a), default=0)
    layers = model.config.num_layers
    per_layer = (len(runs) - 1) // layers  # the final norm follows the layers
    lead = len(runs) - 1 - per_layer * layers  # traced launches before the first layer's (an embedding's)
    say(f"# {args.shape} {args.variant}: one batch-1 decode step at position {POSITION}, per program "
        f"({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    say(f"{n} records, {len(runs)} traced launches ({per_layer} a layer, {lead} before the first), {step:.1f} µs "
        f"from the first record to the last; the timer ticks in steps of {tick} ns at least.\n")
    layer_summary(runs, lead, per_layer, layers)
    say(f"\nLayer {args.layer}, each program's times from the previous launch's last end, µs:\n")
    layer_table(runs, lead + args.layer * per_layer, per_layer + 1)
    say(f"\nLayer {args.layer}, its launches' last ends by how many of their programs an SM ran:\n")
    sm_table(runs, lead + args.layer * per_layer, per_layer + 1)
    save("trace_step.md")


if __name__ == "__main__":
    main()
