"""What a batch-1 decode step costs in its chain of kernels: tile configs tried inside the whole step, and what
the step saves when one kind of launch is left out.

Why: a launch timed alone (`gemv_sweep.py`, `kernels.py`) does not see how PDL overlaps it with its neighbours,
and per-kernel profiles (`profile_decode.py`) sum each kernel's own time, which PDL overlaps. Here every row is
the wall time of one whole captured decode step (CUDA graph replay, as the engine runs it), so a config's row
is what it gives the model, and an ablation's row says what that kind of launch really costs in the chain.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python benchmarks/decode_sweep.py [--shape llama-7b] [--variant gptq-4bit-g128]
        [--configs JSON] [--shapes JSON] [--skip]
        [--attention JSON] [--env JSON] [--position 200] [--context 384]
--configs: a JSON list of the mma kernel's M=1 keywords to try (each replaces the M=1 row of
`qmatmul.MMA_CUDA_CONFIGS` for the whole step); --shapes: a JSON list of objects {"KxN": keywords}, each a row
of per-weight-shape overrides on top of the M=1 row (e.g. [{"4096x4096": {"CT": 2}}]); --skip: also the
ablations (norms, attention, each linear shape, all linears left out; the output is garbage, the time is what
is left); --attention: a JSON list of objects {NAME: value}, each a row with those module-level settings of
`lowbit.kernels.attention` (BLOCK, CHUNK, WAVES, MAX_SPLITS, NUM_WARPS); --env: a JSON list of objects
{VARIABLE: value}, each a row with those environment settings at capture (e.g. [{"LOWBIT_PDL": "0"}]).
Rows: µs a step (median of the replays) and the tok/s that is; the baseline is re-measured between rows, so
a drift shows. Markdown to stdout and to $OUT/decode_sweep.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from unittest import mock

import torch

from lowbit.engine.cuda_graphs import DecodeGraphs
from lowbit.engine.kv_cache import KVCache
from lowbit.eval.random_model import SHAPES, VARIANTS, random_model
from lowbit.kernels import attention, mma, ops, qmatmul
from profile_decode import step_wall_us  # benchmarks/profile_decode.py, beside this script
from report import save, say  # benchmarks/report.py

REPLAYS = 200
POSITION, CONTEXT = 200, 384  # (--position, --context)
def step_us(model, cache) -> float:
    """Median µs of one replay of a freshly captured batch-1 decode step at POSITION (configs are read at
    capture)."""
    graphs = DecodeGraphs(model, cache, 1)
    graphs.run([1], [POSITION], [0])  # captures, stages the inputs the replays reuse
    graph = graphs.graphs[1, 1].graph
    for _ in range(20):
        graph.replay()
    return step_wall_us(graph, REPLAYS)


@contextlib.contextmanager
def m1_row(config: dict | None):
    """The mma layout's M=1 row replaced by `config` (None: unchanged)."""
    table = qmatmul.MMA_CUDA_CONFIGS
    saved = table[0]
    if config is not None:
        table[0] = (1, "mma", config)
    try:
        yield
    finally:
        table[0] = saved


@contextlib.contextmanager
def per_shape(overrides: dict[str, dict], skip: set[str] = frozenset()):
    """mma_matmul with keywords overridden for weights of shape "KxN", and launches of shapes in `skip` left
    out (their output left as it was)."""
    launch = mma.mma_matmul

    def patched(x2, w, bias, y, sms, **config):
        key = f"{w.in_features}x{w.out_features}"
        if key in skip or "all" in skip:
            return None
        return launch(x2, w, bias, y, sms, **{**config, **overrides.get(key, {})})

    mma.mma_matmul = patched
    try:
        yield
    finally:
        mma.mma_matmul = launch


@contextlib.contextmanager
def settings(module, values: dict):
    """Module-level settings (e.g. attention's BLOCK) replaced for a row."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def without(part: str):
    """A kind of launch left out of the step: "norms" (every RMSNorm) or "attention" (decode attention)."""
    if part == "norms":
        saved, name = ops.rms_norm, "rms_norm"
        setattr(ops, name, lambda x, weight, eps, order=None, dtype=None: torch.empty(
            x.shape, dtype=dtype or x.dtype, device=x.device))
        owner = ops
    else:
        saved, name, owner = KVCache.attend, "attend", KVCache
        setattr(KVCache, name, lambda self, layer, rows, input_pos, q, *a, **k: torch.empty(
            q.shape[0], 1, q.shape[2] * q.shape[3], dtype=self.k.dtype, device=q.device))
    try:
        yield
    finally:
        setattr(owner, name, saved)


def main() -> None:
    global POSITION
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--variant", default="gptq-4bit-g128", choices=sorted(VARIANTS))
    ap.add_argument("--configs", default="[]", help="JSON list of M=1 mma keyword dicts to try in the step")
    ap.add_argument("--shapes", default="[]", help='JSON list of {"KxN": keywords}: per-shape overrides, a row each')
    ap.add_argument("--attention", default="[]",
                    help='JSON list of {NAME: value} settings of lowbit.kernels.attention (e.g. {"BLOCK": 32}): '
                         'a row each')
    ap.add_argument("--env", default="[]", help='JSON list of {VARIABLE: value} environment settings: a row each')
    ap.add_argument("--skip", action="store_true", help="also time the step without norms, attention, linears")
    ap.add_argument("--position", type=int, default=POSITION, help="the position the step decodes")
    ap.add_argument("--context", type=int, default=CONTEXT, help="the cache's length (fixes attention's splits)")
    args = ap.parse_args()
    POSITION = args.position
    device = torch.device("cuda")
    model = random_model(SHAPES[args.shape], VARIANTS[args.variant], device)
    cache = KVCache(model.config, 1, max(args.context, args.position + 1), torch.float16, device)
    c = model.config
    shapes = [f"{c.hidden_size}x{(c.num_heads + 2 * c.num_kv_heads) * c.head_dim}",
              f"{c.num_heads * c.head_dim}x{c.hidden_size}", f"{c.hidden_size}x{2 * c.intermediate_size}",
              f"{c.intermediate_size}x{c.hidden_size}"]
    say(f"# {args.shape} {args.variant}: one batch-1 decode step at position {POSITION} in the chain "
        f"({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    say(f"M=1 row now: {qmatmul.MMA_CUDA_CONFIGS[0][2]}\n")
    say("| row | µs a step | tok/s | vs baseline |")
    say("|---|---|---|---|")
    base = step_us(model, cache)
    say(f"| baseline | {base:.1f} | {1e6 / base:.0f} | |")

    def row(label: str, us: float) -> None:
        say(f"| {label} | {us:.1f} | {1e6 / us:.0f} | {us / base - 1:+.1%} |")

    rows = [(f"M=1 {json.dumps(cfg)}", m1_row(cfg)) for cfg in json.loads(args.configs)]
    rows += [(f"per shape {json.dumps(o)}", per_shape(o)) for o in json.loads(args.shapes)]
    rows += [(f"attention {json.dumps(o)}", settings(attention, o)) for o in json.loads(args.attention)]
    rows += [(f"env {json.dumps(o)}", mock.patch.dict(os.environ, {k: str(v) for k, v in o.items()}))
             for o in json.loads(args.env)]
    if args.skip:
        rows += [("without norms", without("norms")), ("without attention", without("attention"))]
        rows += [(f"without the {s} linears", per_shape({}, {s})) for s in shapes]
        rows.append(("without any 4-bit linear", per_shape({}, {"all"})))
    for i, (label, ctx) in enumerate(rows):
        with ctx:
            row(label, step_us(model, cache))
        if i % 4 == 3:
            base = step_us(model, cache)
            say(f"| baseline again | {base:.1f} | {1e6 / base:.0f} | |")
    os.environ["LOWBIT_PDL"] = "0"
    row("PDL off", step_us(model, cache))
    save("decode_sweep.md")


if __name__ == "__main__":
    main()
