"""`lowbit bench`: GPU decode/prefill speed of a model or a named random LLaMA shape."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lowbit.cli.common import add_engine_args, cache_dir, check_engine_args, engine_options, show_progress
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


def add_bench_parser(sub) -> None:
    from lowbit.eval.bench import BenchConfig

    d = BenchConfig()
    p = sub.add_parser("bench", help="GPU decode/prefill speed, TTFT, memory and weight bandwidth, as one table",
                       description="Benchmark MODEL, or random models of --shape in several weight formats side by "
                                   "side. 'peak GB (b=1: load, prefill, decode)' is the most GPU memory allocated while "
                                   "loading and serving one request of --context tokens: the figure to hold against "
                                   "a memory budget.")
    p.add_argument("model", nargs="?", help="model folder/file/Hub id/'smollm2' (omit with --shape)")
    p.add_argument("--shape", help="random weights of a named shape: llama-7b, llama-13b, llama-65b, llama-2-70b")
    p.add_argument("--variants", default="fp16,gptq-4bit-g128,gptq-4bit-g128-act,gptq-8bit-g128,gptq-3bit-g128,"
                   "torch-int4-tinygemm", help="with --shape: comma-separated weight formats to compare")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="decode batch sizes (default 1,4,16,64)")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens per decode request")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per request")
    p.add_argument("--prefill-len", type=int, default=d.prefill_len, help="prompt length of the prefill measurement")
    p.add_argument("--context", type=int, help="KV cache length per request (default prompt + new tokens)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--dtype", default="float16", help="with MODEL: float16 (default) or bfloat16")
    p.add_argument("--out", help="also write the table (with command, date and device) to this markdown file")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import datetime

    import torch

    from lowbit.eval import bench

    if not torch.cuda.is_available():
        raise LowbitError("lowbit bench measures GPU inference and needs a CUDA GPU")
    if bool(args.model) == bool(args.shape):
        raise LowbitError("give a MODEL or --shape (one of them)")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise LowbitError(f"--batches must be integers separated by commas, got {args.batches!r}") from None
    check_engine_args(args)
    config = bench.BenchConfig(batches, args.prompt_len, args.new_tokens, args.prefill_len, args.context,
                               cuda_graphs=not args.no_cuda_graphs, **engine_options(args))
    device = torch.device("cuda")
    copy = bench.copy_bandwidth(device)
    if args.shape:
        done: list = []

        def report(row) -> None:  # the table so far, in case a long run is cut short
            done.append(row)
            log.info("so far:\n%s", bench.table(done, config, copy))

        rows = bench.bench_shape(args.shape, args.variants.split(","), config, device, report=report)
    else:
        from lowbit.api import load

        loaded = load(args.model, "cuda", args.dtype, cache=cache_dir(), progress=show_progress())
        rows = [bench.bench_model(args.model, loaded.model, loaded.tokenizer, config)]
    import triton

    what = f"--shape {args.shape}" if args.shape else args.model
    header = (f"lowbit bench {what}: batches {args.batches}, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
              f"prefill {args.prefill_len}, context {args.context or args.prompt_len + args.new_tokens}, "
              f"cuda graphs {not args.no_cuda_graphs}, decode steps {args.decode_steps}, "
              f"overlap bursts {config.overlap_bursts}, "
              f"prefill chunk {config.prefill_chunk or 'off'}, prefill graphs {config.prefill_graphs or 'off'}, "
              f"embeddings on host {config.embeddings_on_host}. "
              f"{datetime.date.today()}, "
              f"{torch.cuda.get_device_name(device)}, "
              f"torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {copy:.0f} GB/s (read + write)\n")
    text = header + "\n" + bench.table(rows, config, copy)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
