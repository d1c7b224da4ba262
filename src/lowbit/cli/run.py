"""`lowbit generate`, `chat`, `info`, `convert-gguf` and `demo`: using a model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lowbit.cli.common import (
    cache_dir,
    check_engine_args,
    load_from_args,
    make_engine,
    named_template,
    sampling_params,
    show_progress,
)
from lowbit.errors import LowbitError

CHAT_HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def cmd_generate(args: argparse.Namespace) -> int:
    check_engine_args(args)
    params = sampling_params(args)
    named = named_template(args)
    loaded = load_from_args(args)
    if args.no_template:
        ids = loaded.tokenizer.encode(args.prompt, add_bos=True)
    else:
        template = named or loaded.chat_template()
        params = dataclasses.replace(params, stop=params.stop + template.stop)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        text = template.render(messages, add_generation_prompt=True, **loaded.tokenizer.special_tokens)
        ids = loaded.tokenizer.encode(text, add_bos=False)
    engine = make_engine(loaded, args, len(ids) + params.max_new_tokens)
    for out in engine.stream(ids, params):
        sys.stdout.write(out.delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lowbit.chat.session import ChatSession

    check_engine_args(args)
    params = sampling_params(args)
    named = named_template(args)
    loaded = load_from_args(args)
    template = named or loaded.chat_template()
    engine = make_engine(loaded, args, args.max_seq_len)
    session = ChatSession(engine, template, params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lowbit chat: {loaded.folder.name} (template: {template.name}). {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not _chat_line(session, line.strip()):
            return 0


def _chat_line(session, line: str) -> bool:
    """Handle one line of the REPL; False means quit."""
    if not line:
        return True
    if line in ("/exit", "/quit"):
        return False
    if line == "/reset":
        session.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif line.startswith("/system"):
        session.set_system(line[len("/system"):].strip())
        session.reset()
        print("(system prompt set; conversation cleared)", file=sys.stderr)
    elif line.startswith("/"):
        print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
    else:
        try:
            for delta in session.send(line):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this reply, keep the conversation
        sys.stdout.write("\n")
        sys.stdout.flush()
    return True


def cmd_info(args: argparse.Namespace) -> int:
    from lowbit.api import model_folder
    from lowbit.model.info import describe

    print(describe(model_folder(args.model, cache_dir(), show_progress()), args.allow_pickle))
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from lowbit.api import DTYPES
    from lowbit.model.gguf import convert_gguf

    if args.dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {args.dtype!r}; choose {', '.join(DTYPES)}")
    out = convert_gguf(Path(args.gguf), Path(args.out_dir), DTYPES[args.dtype], args.overwrite, show_progress())
    print(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit import demo

    settings = demo.DemoSettings(nsamples=args.nsamples, eval_windows=args.eval_windows, dataset=args.dataset)
    demo.run(settings, cache_dir(), args.device, args.overwrite, progress=show_progress())
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole path on the built-in SmolLM2: import, quantize, perplexity, chat",
                       description="Import SmolLM2-135M-Instruct, quantize it to 4-bit GPTQ, compare float and "
                                   "quantized perplexity and size, and answer one chat turn with the 4-bit model.")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    p.add_argument("--eval-windows", type=int, default=24, help="perplexity windows of 512 tokens (default 24)")
    p.add_argument("--dataset", help="text for calibration and evaluation (default: the Python docs split)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="quantize again even if the demo checkpoint exists")
    p.set_defaults(func=cmd_demo)
