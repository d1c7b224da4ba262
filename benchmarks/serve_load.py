"""Serving throughput and time-to-first-token: continuous batching vs one-request-at-a-time serving.

For each number of concurrent streams (1, 8, 32, 64), that many closed-loop clients each send `--rounds`
requests one after another (prompts of different lengths, exactly `--max-tokens` output tokens each via
ignore_eos). The same load runs twice: on a server that batches up to 64 requests, and on one that serves
one request at a time (max batch 1: the others queue). Prints a markdown table of output tokens/s and
p50/p99 TTFT (from sending a request to its first token, queueing included), also written to --out.

  http    (default) `lowbit serve MODEL` in a subprocess, streaming clients over loopback (httpx):
          PYTHONPATH=src python benchmarks/serve_load.py --model smollm2 --out benchmarks/results/serve-cpu.md
  engine  the Engine in this process, no HTTP (for machines without fastapi/uvicorn, e.g. the GPU device);
          --random-7b builds a LLaMA-7B-shaped model with random 4-bit GPTQ weights run by the Triton kernels:
          PYTHONPATH=src python benchmarks/serve_load.py --mode engine --random-7b --out serve-gpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TOPICS = ["the ocean", "a small town", "prime numbers", "bread", "the moon", "trains", "music", "gardens"]


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [f"Write about {rng.choice(TOPICS)}." + " Please be detailed and vivid." * rng.randint(0, 6) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


# ---------------------------------------------------------------------------------------------- http

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_len: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", model, "--port", str(port), "--model-name", "m",
                             "--max-batch", str(max_batch), "--max-model-len", str(max_len), "--max-wait", "3600", *extra],
                            stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"serve_load: the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


async def http_client(url: str, texts: list[str], max_tokens: int, ttft: list[float], tokens: list[int]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=None) as http:
        for text in texts:
            body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": True, "temperature": 0.7,
                    "max_tokens": max_tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}
            sent, first = time.perf_counter(), None
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - sent
                    if chunk.get("usage"):
                        tokens.append(chunk["usage"]["completion_tokens"])
            ttft.append(first if first is not None else time.perf_counter() - sent)


def http_level(url: str, streams: int, rounds: int, max_tokens: int) -> tuple[float, list[float], int]:
    texts = prompts(streams * rounds)
    ttft, tokens = [], []

    async def run():
        await asyncio.gather(*(http_client(url, texts[i::streams], max_tokens, ttft, tokens) for i in range(streams)))

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start, ttft, sum(tokens)


def run_http(args) -> list[dict]:
    rows = []
    for serving, max_batch in (("continuous batching", max(args.streams)), ("one at a time", 1)):
        proc, url = start_server(args.model, max_batch, args.max_model_len, args.serve_args)
        try:
            http_level(url, 2, 1, 4)  # warm-up
            for streams in args.streams:
                wall, ttft, tokens = http_level(url, streams, args.rounds, args.max_tokens)
                rows.append(row(serving, streams, len(ttft), tokens, wall, ttft))
        finally:
            proc.terminate()
            proc.wait()
    return rows


# -------------------------------------------------------------------------------------------- engine

def random_llama7b(device: str):
    """LLaMA-7B's shape with random 4-bit GPTQ weights (group 128) in the Triton kernels' layout, fp16."""
    import torch
    from torch import nn

    from lowbit.config import ModelConfig
    from lowbit.kernels import qmatmul as qm
    from lowbit.model.llama import Transformer

    class KernelLinear(nn.Module):
        def __init__(self, k: int, n: int, seed: int):
            super().__init__()
            g = torch.Generator(device=device).manual_seed(seed)
            groups = k // 128
            codes = torch.randint(0, 16, (k, n), device=device, generator=g).to(torch.uint8)
            zeros = torch.randint(0, 16, (groups, n), device=device, generator=g, dtype=torch.int32)
            scales = (torch.rand(groups, n, device=device, generator=g) * 0.002 + 0.0005).half()
            g_idx = torch.arange(k, device=device, dtype=torch.int32) // 128
            self.w = qm.repack(codes, zeros, scales, g_idx, 4)

        def forward(self, x):
            return qm.qmatmul(x, self.w)

    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
    seeds = iter(range(1, 10_000))
    with torch.device(device):
        model = Transformer(cfg, lambda name, k, n, bias: KernelLinear(k, n, next(seeds)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.rotary.to(device)  # its table is built on the CPU (load_model moves it the same way)
    return model.half().eval()


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with `vocab_size` made-up words: enough for the engine's streaming decoder."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.model.tokenizer import Tokenizer

    raw = RawTokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", eos_token="w2"), (2,))


def engine_level(engine, prompt_ids: list[list[int]], streams: int, rounds: int, max_tokens: int):
    """Closed loop: `streams` requests in flight, each finished one replaced until streams * rounds ran."""
    from lowbit.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.7, max_new_tokens=max_tokens, ignore_eos=True)
    todo = list(prompt_ids[: streams * rounds])
    sent, ttft, tokens = {}, [], 0

    def submit():
        sent[engine.add_request(todo.pop(), params)] = time.perf_counter()

    start = time.perf_counter()
    for _ in range(min(streams, len(todo))):
        submit()
    while engine.num_unfinished:
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.request_id in sent:
                ttft.append(time.perf_counter() - sent.pop(out.request_id))
            if out.finished and todo:
                submit()
    return time.perf_counter() - start, ttft, tokens


def run_engine(args) -> list[dict]:
    import torch

    from lowbit.engine.engine import Engine, EngineConfig

    if args.random_7b:
        model, tokenizer = random_llama7b(args.device), word_tokenizer(32000)
        rng = random.Random(0)
        ids = [[rng.randrange(3, 32000) for _ in range(rng.randint(32, 160))] for _ in range(max(args.streams) * args.rounds)]
    else:
        from lowbit.api import load

        loaded = load(args.model, args.device)
        model, tokenizer = loaded.model, loaded.tokenizer
        template = loaded.chat_template()
        ids = [tokenizer.encode(template.render([{"role": "user", "content": t}], **tokenizer.special_tokens),
                                add_bos=False) for t in prompts(max(args.streams) * args.rounds)]
    rows = []
    for serving, max_batch in (("continuous batching", max(args.streams)), ("one at a time", 1)):
        engine = Engine(model, tokenizer, EngineConfig(max_batch=max_batch, max_seq_len=args.max_model_len))
        for streams in args.streams if max_batch > 1 else [1]:  # warm-up: compile the kernels for every prompt
            engine_level(engine, ids, streams, args.rounds, 2)  # length and decode batch size measured below
        for streams in args.streams:
            if time.time() > args.deadline:
                print(f"serve_load: time budget spent; skipping {serving} at {streams} streams", flush=True)
                continue
            wall, ttft, tokens = engine_level(engine, ids, streams, args.rounds, args.max_tokens)
            rows.append(row(serving, streams, len(ttft), tokens, wall, ttft))
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report

def row(serving: str, streams: int, requests: int, tokens: int, wall: float, ttft: list[float]) -> dict:
    r = dict(serving=serving, streams=streams, requests=requests, tokens=tokens, seconds=wall, tok_s=tokens / wall,
             p50=1000 * statistics.median(ttft), p99=1000 * pct(ttft, 99))
    print(json.dumps(r), flush=True)
    return r


def table(rows: list[dict]) -> str:
    serial = {r["streams"]: r["tok_s"] for r in rows if r["serving"] == "one at a time"}
    lines = ["| streams | serving | requests | output tokens | seconds | output tok/s | p50 TTFT ms | p99 TTFT ms "
             "| vs one at a time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["streams"], r["serving"])):
        ratio = f"{r['tok_s'] / serial[r['streams']]:.1f}x" if r["streams"] in serial else "-"
        lines.append(f"| {r['streams']} | {r['serving']} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("http", "engine"), default="http")
    p.add_argument("--model", default="smollm2", help="what `lowbit serve` / `lowbit.api.load` take")
    p.add_argument("--random-7b", action="store_true", help="engine mode: a random LLaMA-7B-shaped 4-bit model (CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--rounds", type=int, default=1, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--seconds", type=float, default=1e9, help="engine mode: skip levels once this budget is spent")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more `lowbit serve` flags (http)")
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args()
    args.deadline = time.time() + args.seconds
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run_http(args) if args.mode == "http" else run_engine(args)
    device = _device(args.device)
    head = (f"command: {' '.join(['python', *sys.argv])}\ndevice: {device}\nmodel: "
            f"{'random LLaMA-7B shape, 4-bit g128, Triton kernels' if args.random_7b else args.model}; "
            f"{args.max_tokens} output tokens per request (ignore_eos), {args.rounds} request(s) per stream, "
            f"max model len {args.max_model_len}\n")
    text = head + "\n" + table(rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


if __name__ == "__main__":
    main()
