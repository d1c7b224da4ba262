"""The `lowbit` command. The only place that configures logging, reads the environment and picks devices.

Each subcommand lives in a module of this package (run, quantize, serve, bench); every `LowbitError`
becomes one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from lowbit.cli.bench import add_bench_parser
from lowbit.cli.common import add_memory_args, add_model_args, add_sampling_args
from lowbit.cli.quantize import (
    add_apply_delta_parser,
    add_eval_parser,
    add_quantize_parser,
)
from lowbit.cli.run import (
    CHAT_HELP,
    add_demo_parser,
    cmd_chat,
    cmd_convert_gguf,
    cmd_generate,
    cmd_info,
)
from lowbit.cli.serve import add_serve_parser
from lowbit.errors import LowbitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize LLaMA-family models with GPTQ and run them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete one prompt and print only the completion")
    add_model_args(p)
    p.add_argument("prompt", help="the prompt (wrapped in the chat template unless --no-template)")
    p.add_argument("--no-template", action="store_true", help="feed the prompt raw, without a chat template")
    p.add_argument("--template", help="a named fallback template instead of the model's own (vicuna_v1.1, "
                                      "guanaco, llama-2-chat, alpaca, chatml)")
    p.add_argument("--system", help="system prompt")
    add_memory_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming", description=CHAT_HELP)
    add_model_args(p)
    p.add_argument("--template", help="a named fallback template instead of the model's own")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context window used for the conversation")
    add_memory_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameters, quantization and memory of a model")
    p.add_argument("model", help="model folder, file, Hub id or built-in name")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt pickle weights")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert-gguf", help="import a llama.cpp GGUF file as an HF float checkpoint folder")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out_dir", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_convert_gguf)
    add_quantize_parser(sub)
    add_apply_delta_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
