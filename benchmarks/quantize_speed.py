"""GPU wall time and peak memory of `lowbit quantize` on a random-weight LLaMA-shaped checkpoint.

Run from the repository root on a CUDA machine:

    PYTHONPATH=src python benchmarks/quantize_speed.py --recipes default,recommended --out $OUT/speed.md  # 7B
    PYTHONPATH=src python benchmarks/quantize_speed.py --shape llama-65b --layers 4 --out $OUT/speed65.md

1. writes a random fp16 checkpoint of the shape (only `--layers` decoder layers; config says so) to --workdir
   (not timed; the file stays in the page cache, as after any download);
2. `--micro`: checks and times the parts: the GPTQ block kernel against its torch reference (and a tile
   sweep), half x half -> float32 Hessian accumulation against float64, the inverse Hessian factor, and
   GPTQ on each 7B linear shape;
3. times `lowbit.quant.job.quantize` end to end (128 x 2048 random calibration tokens, 4-bit g128;
   --recipes: the defaults and/or the recommended recipe): load + calibrate + GPTQ + pack + write, with the
   split per phase and the peak GPU memory.
   Markdown to stdout and to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from lowbit.config import RECOMMENDED_MSE, RECOMMENDED_QUANT, CalibrationConfig, QuantConfig
from lowbit.quant import job as job_module
from lowbit.quant.export import PartialRun

SHAPES = {  # hidden, intermediate, heads, layers, vocab
    "llama-7b": (4096, 11008, 32, 32, 32000),
    "llama-65b": (8192, 22016, 64, 80, 32000),
    "tiny": (64, 96, 4, 2, 96),  # a CPU smoke test of this script
}
RECIPES = {  # name -> (QuantConfig, mse)
    "default": (QuantConfig(), False),  # 4-bit g128 sym, no act-order: the seeds' main branch
    "recommended": (RECOMMENDED_QUANT, RECOMMENDED_MSE),  # asym, act-order + static groups, MSE clipping
}
LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


# ------------------------------------------------------------------------------------------ checkpoint

def write_checkpoint(folder: Path, shape: str, layers: int, device: str, shard_bytes: int = 4 << 30) -> None:
    """A LlamaForCausalLM folder with N(0, 0.02) fp16 weights (norms 1), sharded like HF."""
    from safetensors.torch import save_file

    hidden, inter, heads, _, vocab = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": heads,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float16",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    gen = torch.Generator(device=device).manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shp in shapes.items():
        if len(shp) == 1:
            t = torch.ones(shp, dtype=torch.float16)
        else:
            t = (torch.randn(shp, device=device, generator=gen) * 0.02).half().cpu()
        if current and size + t.numel() * 2 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
    shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------------------------------------ micro

def event_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of fn() over reps runs (after one warm-up), timed with CUDA events."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def micro() -> None:
    say("## parts\n")
    micro_block_kernel()
    micro_hessian()
    micro_inverse()
    micro_gptq()
    say("")


def micro_block_kernel(n: int = 4096, b: int = 128) -> None:
    """The Triton block sweep against the torch loop, over tile shapes (codes must agree)."""
    from lowbit.kernels.gptq_block import gptq_block_reference

    W1 = torch.randn(n, b, device="cuda")
    A = torch.randn(b, 4 * b, device="cuda")
    Hinv1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A @ A.t() / b)), upper=True)
    scales = (W1.abs().amax(1) / 7).half().float()[None].contiguous()
    zeros = torch.full_like(scales, 8.0)
    cg = torch.zeros(b, dtype=torch.int32, device="cuda")
    c0 = torch.empty(b, n, dtype=torch.uint8, device="cuda")
    e0 = torch.empty(b, n, device="cuda")
    ref_ms = event_ms(lambda: gptq_block_reference(W1, Hinv1, scales, zeros, cg, 15, c0, e0), reps=3)
    say(f"GPTQ block {n} x {b}, torch reference (per-column loop): {ref_ms:.2f} ms\n")
    say("| BLOCK_N | warps | ms per block | codes differing from reference | max rel err diff |")
    say("|---|---|---|---|---|")
    for block_n in (8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            say(tile_row((W1, Hinv1, scales, zeros, cg), (c0, e0), block_n, warps))


def tile_row(inputs, reference, block_n: int, warps: int) -> str:
    from lowbit.kernels.gptq_block import gptq_block_triton

    c0, e0 = reference
    c1, e1 = torch.full_like(c0, 255), torch.full_like(e0, float("nan"))
    try:
        ms = event_ms(lambda: gptq_block_triton(*inputs, 15, c1, e1, block_n, warps))
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not the end
        return f"| {block_n} | {warps} | failed: {e!r:.80} | | |"
    diff = float((c1 != c0).float().mean())
    rel = float((e1 - e0).abs().max() / e0.abs().max())
    return f"| {block_n} | {warps} | {ms:.3f} | {diff:.2e} | {rel:.1e} |"


def micro_hessian() -> None:
    say("\n| Hessian accumulation, x [8192, K] | K | ms (half -> fp32) | ms (fp32) | rel err vs fp64 |")
    say("|---|---|---|---|---|")
    for k in (4096, 11008):
        say(hessian_row(k))


def hessian_row(k: int) -> str:
    from lowbit.quant.gptq import accumulate_xtx

    x = (torch.randn(8192, k, device="cuda") * torch.rand(k, device="cuda") * 4).half()
    H = torch.zeros(k, k, device="cuda")
    fast = event_ms(lambda: accumulate_xtx(H, x, 0.5, 0.5))
    H32 = torch.zeros(k, k, device="cuda")
    slow = event_ms(lambda: H32.addmm_(x.float().t(), x.float(), beta=0.5, alpha=0.5))
    H.zero_()
    accumulate_xtx(H, x, 0.0, 1.0)
    ref = x.double().t() @ x.double()
    return f"| | {k} | {fast:.2f} | {slow:.2f} | {float((H.double() - ref).norm() / ref.norm()):.1e} |"


def micro_inverse() -> None:
    say("\n| inverse Hessian factor | K | ms (one Cholesky + triangular inverse) | ms (references' three steps) |")
    say("|---|---|---|---|")
    for k in (4096, 11008):
        say(inverse_row(k))


def inverse_row(k: int) -> str:
    from lowbit.quant.gptq import inverse_hessian_cholesky

    X = torch.randn(2 * k, k, device="cuda")
    H = X.t() @ X / (2 * k)
    ours = event_ms(lambda: inverse_hessian_cholesky(H.clone(), 0.01), reps=3)

    def three():
        Hd = H + 0.01 * H.diagonal().mean() * torch.eye(k, device="cuda")
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    return f"| | {k} | {ours:.1f} | {event_ms(three, reps=3):.1f} |"


def micro_gptq() -> None:
    from lowbit.quant.gptq import GPTQ

    say("\n| GPTQ.quantize (4-bit g128) | N x K | seconds | seconds, act-order |")
    say("|---|---|---|---|")
    for n, k in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)):
        g = GPTQ(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02)
        g.add_batch(torch.randn(4 * k, k, device="cuda", dtype=torch.float16))
        times = []
        for act in (False, True):
            cfg = QuantConfig(desc_act=act)
            g.quantize(cfg)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.quantize(cfg)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        say(f"| | {n} x {k} | {times[0]:.3f} | {times[1]:.3f} |")


# ------------------------------------------------------------------------------------------ end to end

class PhaseTimer:
    """Wraps the job's layer loop and writers to attribute wall time to phases (benchmark-only patching)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.layers: list[float] = []

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def install(self):
        orig_layers, orig_save, orig_assemble = job_module.quantize_layers, PartialRun.save_layer, job_module.assemble
        orig_embed = job_module.embed_inputs
        timer = self

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    if torch.cuda.is_initialized():
                        torch.cuda.synchronize()
                    timer.add(name, time.perf_counter() - t0)
            return wrapper

        def layers(*args, **kwargs):
            for result in orig_layers(*args, **kwargs):
                for k, v in result.phases.items():
                    timer.add(k, v)
                timer.layers.append(result.seconds)
                yield result

        job_module.quantize_layers = layers
        job_module.embed_inputs = timed("embed", orig_embed)
        job_module.assemble = timed("write (assemble shards)", orig_assemble)
        PartialRun.save_layer = timed("pack + save layer", orig_save)

        def restore():
            job_module.quantize_layers, job_module.assemble, job_module.embed_inputs = orig_layers, orig_assemble, orig_embed
            PartialRun.save_layer = orig_save
        return restore


def end_to_end(folder: Path, out: Path, shape: str, layers: int, nsamples: int, seqlen: int, recipe: str,
               device: torch.device):
    vocab = SHAPES[shape][4]
    tokens = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    quant, mse = RECIPES[recipe]
    timer = PhaseTimer()
    restore = timer.install()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        t0 = time.perf_counter()
        report = job_module.quantize(folder, out, quant, CalibrationConfig("random", nsamples, seqlen, 0),
                                     mse=mse, device=device, overwrite=True, tokens=tokens)
        wall = time.perf_counter() - t0
    finally:
        restore()
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else 0
    say(f"## {shape}, {layers} layers, {nsamples} x {seqlen} tokens, {recipe}: {describe(quant, mse)}\n")
    say("| phase | seconds |")
    say("|---|---|")
    for name, sec in timer.phases.items():
        say(f"| {name} | {sec:.1f} |")
    accounted = sum(timer.phases.values())
    say(f"| other (open, checks, card, ...) | {wall - accounted:.1f} |")
    say(f"| **total wall** | **{wall:.1f}** |")
    say(f"\npeak GPU memory: {report.peak_gpu_bytes / 2**30:.2f} GiB allocated, {reserved / 2**30:.2f} GiB reserved; "
        f"output {report.size_bytes / 2**30:.2f} GiB; mean loss {report.mean_loss:.4g}")
    per_layer = statistics.median(timer.layers[1:] or timer.layers)
    say(f"per layer (median, first excluded): {per_layer:.2f} s; first layer {timer.layers[0]:.2f} s")
    full = SHAPES[shape][3]
    if layers < full:
        write_per_layer = timer.phases.get("pack + save layer", 0) / layers
        assemble_per_layer = timer.phases.get("write (assemble shards)", 0) / layers
        est = wall + (full - layers) * (per_layer + write_per_layer + assemble_per_layer)
        say(f"extrapolated to all {full} layers: {est:.0f} s ({est / 60:.1f} min), peak memory unchanged "
            f"(one layer at a time; activations {nsamples * seqlen * SHAPES[shape][0] * 2 / 2**30:.1f} GiB)")
    say("")
    return report


def describe(q: QuantConfig, mse: bool) -> str:
    return (f"{q.bits}-bit g{q.group_size}{' act-order' if q.desc_act else ''}"
            f"{' static groups' if q.static_groups else ''}{' sym' if q.sym else ' asym'}{' MSE' if mse else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to write and quantize (default: all)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--recipes", default="default", help=f"comma-separated, from {', '.join(RECIPES)}")
    ap.add_argument("--micro", action="store_true", help="also check and time the parts")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lowbit-speed"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoint for a later run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    layers = args.layers or SHAPES[args.shape][3]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    say(f"# lowbit quantize speed: {name}, torch {torch.__version__}\n")
    src = args.workdir / f"{args.shape}-{layers}"
    if not (src / "config.json").exists():
        t0 = time.perf_counter()
        write_checkpoint(src, args.shape, layers, args.device)
        say(f"wrote the random checkpoint {src} in {time.perf_counter() - t0:.0f} s (not timed below)\n")
    if args.micro:
        micro()
    for recipe in args.recipes.split(","):
        end_to_end(src, args.workdir / "out", args.shape, layers, args.nsamples, args.seqlen, recipe, device)
    shutil.rmtree(args.workdir / "out", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
