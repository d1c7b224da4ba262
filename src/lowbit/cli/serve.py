"""`lowbit serve`: the OpenAI-compatible server and chat page (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from lowbit.cli.common import (
    add_engine_args,
    add_model_args,
    check_engine_args,
    engine_options,
    load_from_args,
    named_template,
)
from lowbit.errors import LowbitError


def add_serve_parser(sub) -> None:
    from lowbit.config import ServerConfig

    p = sub.add_parser("serve", help="OpenAI-compatible API (/v1/chat/completions, /v1/completions) and a chat page at /",
                       description="Serve MODEL over HTTP with continuous batching; open http://HOST:PORT/ to chat.")
    add_model_args(p)
    p.add_argument("--template", help="a named fallback template instead of the model's own")
    g = p.add_argument_group("http")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    for f in dataclasses.fields(ServerConfig):  # default None: cmd_serve fills in model- and env-based defaults
        kind = int if f.type == "int" else str
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f.metadata["help"])
    g = add_engine_args(p)
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots; default 8)")
    g.add_argument("--max-model-len", type=int, default=2048, help="prompt + reply tokens per request (default 2048)")
    g.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429 (default 256)")
    g.add_argument("--max-wait", type=float, default=60.0, help="seconds a request may wait for a slot before a 503")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from lowbit.server.app import create_app
    except ImportError as e:
        raise LowbitError(f"lowbit serve needs the serve extra ({e.name} is missing): pip install 'lowbit[serve]'") from None
    from lowbit.config import ServerConfig
    from lowbit.engine.engine import Engine, EngineConfig

    if args.max_batch < 1 or args.max_model_len < 2 or args.max_waiting < 0 or args.max_wait <= 0:
        raise LowbitError("--max-batch must be >= 1, --max-model-len >= 2, --max-waiting >= 0 and --max-wait > 0")
    check_engine_args(args)
    _check_port_free(args.host, args.port)
    named = named_template(args)
    defaults = ServerConfig(model_name=Path(args.model).name if Path(args.model).exists() else args.model,
                            api_key=os.environ.get("LOWBIT_API_KEY") or None)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if getattr(args, f.name) is not None}
    config = dataclasses.replace(defaults, **given)
    loaded = load_from_args(args)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch=args.max_batch, max_seq_len=args.max_model_len, max_waiting=args.max_waiting,
        max_wait_s=args.max_wait, **engine_options(args)))
    app = create_app(engine, loaded.tokenizer, named or loaded.chat_template(), config)
    logging.getLogger("lowbit.server").setLevel(logging.INFO)
    print(f"lowbit: serving {config.model_name} on http://{args.host}:{args.port}/ (max batch {args.max_batch}, "
          f"context {engine.max_seq_len}, KV cache {engine.cache.nbytes / 2**20:.0f} MiB)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before the (slow) model load when the address cannot be listened on."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, OverflowError) as e:
        raise LowbitError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
