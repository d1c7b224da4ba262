"""CPU decode speed of SmolLM2-135M-Instruct: float32 and a 4-bit GPTQ checkpoint, through the Engine.

    python benchmarks/cpu_decode.py [--gptq FOLDER] [--new-tokens 128] [--batch 1 4]

The GPTQ checkpoint defaults to the one `lowbit demo` writes; without it, a round-to-nearest 4-bit g128
checkpoint is written to a temporary folder (same format and kernels, so the same speed). Prints one
markdown table: prefill and decode tokens/s per model, backend and batch size (greedy, fixed length).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from lowbit.api import load, model_folder
from lowbit.config import CalibrationConfig, QuantConfig
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.model.weights import _choose_backend
from lowbit.quant.job import quantize

CACHE = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_generate(engine: Engine, prompt_ids: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for `batch` copies of the prompt, each generating exactly new_tokens."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    rids = [engine.add_request(prompt_ids, params) for _ in range(batch)]
    started: set[str] = set()
    t0 = time.perf_counter()
    while len(started) < batch:  # prefill: each request's first token
        started |= {out.request_id for out in engine.step() if out.new_token_ids}
    t1 = time.perf_counter()
    produced = 0
    while engine.num_unfinished:
        produced += sum(len(out.new_token_ids) for out in engine.step())
    t2 = time.perf_counter()
    assert started == set(rids)
    return batch * len(prompt_ids) / (t1 - t0), produced / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptq", type=Path, help="GPTQ checkpoint of SmolLM2 (default: lowbit demo's)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--backends", nargs="+", default=["dense"], help="GPTQ backends: dense, reference")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    float_dir = model_folder("smollm2", CACHE)
    gptq_dir = args.gptq or CACHE / "demo" / f"{float_dir.name}-gptq-4bit-128g"
    tmp = None
    if not (gptq_dir / "quantize_config.json").exists():
        tmp = tempfile.TemporaryDirectory()
        gptq_dir = Path(tmp.name) / "rtn"
        quantize(float_dir, gptq_dir, QuantConfig(), CalibrationConfig(), method="rtn")
    rows = []
    for label, folder, backends in (("float32", float_dir, [None]), ("GPTQ 4-bit g128", gptq_dir, args.backends)):
        m = load(str(folder), "cpu")
        ids = m.tokenizer.encode(PROMPT, add_bos=True)
        for backend in backends:
            if backend:
                _choose_backend(m.model, torch.device("cpu"), torch.float32, backend)
            for batch in args.batch:
                engine = Engine(m.model, m.tokenizer, EngineConfig(max_batch=max(args.batch), max_seq_len=512))
                timed_generate(engine, ids, 1, 4)  # warm-up
                prefill, decode = timed_generate(engine, ids, batch, args.new_tokens)
                rows.append((label, backend or "-", batch, prefill, decode))
                print(f"{label} {backend or ''} batch {batch}: prefill {prefill:.0f} tok/s, decode {decode:.1f} tok/s",
                      flush=True)
    print(f"\nSmolLM2-135M-Instruct, CPU ({platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}), prompt {len(ids)} tokens, {args.new_tokens} new tokens, {date.today()}\n")
    print("| model | backend | batch | prefill tok/s | decode tok/s |\n|---|---|---|---|---|")
    for label, backend, batch, prefill, decode in rows:
        print(f"| {label} | {backend} | {batch} | {prefill:.0f} | {decode:.1f} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
