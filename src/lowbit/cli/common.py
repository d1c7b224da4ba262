"""What every `lowbit` command shares: the model, engine and sampling flags (derived from `SamplingParams`),
loading from them, the cache folder (LOWBIT_CACHE) and whether to draw progress bars."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


SAMPLING_HELP = {
    "temperature": "softmax temperature; 0 = greedy",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling: keep the smallest set with this probability mass",
    "min_p": "drop tokens below min_p x the top probability",
    "typical_p": "locally typical sampling mass (1 = off)",
    "repetition_penalty": "HF/CTRL penalty on tokens seen in prompt or output (1 = off)",
    "presence_penalty": "OpenAI presence penalty on generated tokens",
    "frequency_penalty": "OpenAI frequency penalty on generated tokens",
    "seed": "random seed for reproducible sampling",
    "max_new_tokens": "most tokens to generate",
    "stop": "stop when this string appears (repeatable)",
}


SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "top_k": 40}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    from lowbit.engine.sampling import SamplingParams

    group = parser.add_argument_group("sampling")
    for f in dataclasses.fields(SamplingParams):
        if f.name not in SAMPLING_HELP:
            continue
        default = SAMPLING_DEFAULTS.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "stop":
            group.add_argument(flag, action="append", default=[], help=SAMPLING_HELP[f.name])
            continue
        kind = int if f.name in ("top_k", "seed", "max_new_tokens") else float
        group.add_argument(flag, type=kind, default=default, help=f"{SAMPLING_HELP[f.name]} (default: {default})")


def sampling_params(args: argparse.Namespace):
    from lowbit.engine.sampling import SamplingParams

    values = {k: getattr(args, k) for k in SAMPLING_HELP}
    values["stop"] = tuple(values["stop"])
    return SamplingParams(**values)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder, .safetensors/.gguf file, Hub id org/name[:branch], or 'smollm2'")
    group = parser.add_argument_group("loading")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    group.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: float16 on GPU, float32 on CPU)")
    group.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt pickle weights (can run code)")


def add_engine_args(parser: argparse.ArgumentParser):
    """The engine flags of every command that runs a model; returns the group (serve adds its own flags)."""
    from lowbit.engine.engine import EngineConfig

    group = parser.add_argument_group("engine")
    d = EngineConfig.decode_steps
    group.add_argument("--decode-steps", type=int, default=d,
                       help=f"on a GPU, greedy tokens decoded per CUDA-graph replay: the host syncs once per this "
                            f"many tokens instead of once per token, so the GPU does not wait for it (default {d}; "
                            "1 = one token per step)")
    group.add_argument("--no-overlap-bursts", action="store_true",
                       help="wait for the host to handle each burst's tokens before launching the next (default: "
                            "the next burst already runs on the GPU meanwhile; the same tokens either way)")
    chunk = EngineConfig().prefill_chunk
    group.add_argument("--embeddings-on-host", action="store_true", help=(
        "keep the token-embedding table in pinned host memory (as llama.cpp keeps tok_embd on the CPU): a step "
        "needs only one row per token, which the GPU reads over PCIe, so the table (vocab x hidden x 2 bytes: "
        "0.33 GB for LLaMA-13B) need not take GPU memory. Untied embeddings only; a tied table is lm_head's "
        "weight too and stays on the GPU"))
    group.add_argument("--prefill-chunk", type=_tokens, default=chunk, help=(
        f"prompt tokens per forward pass during prefill: bounds the activations of long prompts "
        f"(default {chunk}; 0 = the whole prompt at once, fastest for long prompts, most memory)"))
    group.add_argument("--prefill-graphs", type=_tokens, default=EngineConfig.prefill_graphs, metavar="TOKENS", help=(
        "on a GPU, prompts of up to this many tokens prefill by replaying a CUDA graph captured for their length "
        "padded to a power of two (the first prompt of a length captures it): a short prompt's prefill is bound "
        "by launching hundreds of kernels from the host, which the graph does at once. Costs GPU memory for the "
        "graphs' activations (default 0 = off)"))
    return group


def check_engine_args(args: argparse.Namespace) -> None:
    """Refuse bad engine flags before the (slow) model load."""
    if args.decode_steps < 1:
        raise LowbitError(f"--decode-steps must be at least 1, got {args.decode_steps}")


def load_from_args(args: argparse.Namespace):
    from lowbit.api import load

    return load(args.model, args.device, args.dtype, args.allow_pickle, cache_dir(), progress=show_progress())


def show_progress() -> bool:
    return sys.stderr.isatty()


def _tokens(value: str) -> int:
    """argparse type of --prefill-chunk and --prefill-graphs: a count >= 0, checked before the model loads."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 0, got {value!r}")
    return n


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig keywords from the flags of `add_engine_args`."""
    return {"decode_steps": args.decode_steps, "overlap_bursts": not args.no_overlap_bursts,
            "embeddings_on_host": args.embeddings_on_host, "prefill_chunk": args.prefill_chunk or None,
            "prefill_graphs": args.prefill_graphs}


def make_engine(loaded, args, max_seq_len: int):
    from lowbit.engine.engine import Engine, EngineConfig

    config = EngineConfig(max_batch=1, max_seq_len=max_seq_len, **engine_options(args))
    return Engine(loaded.model, loaded.tokenizer, config)


def named_template(args: argparse.Namespace):
    """Check a --template name before the (slow) model load."""
    from lowbit.chat import template

    return template.get(args.template) if args.template else None
