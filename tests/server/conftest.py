"""A real uvicorn server on loopback around `create_app`, for the tests that talk HTTP to it."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn

from lowbit.api import load
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.config import ServerConfig
from lowbit.server.app import create_app
from tests.chat_model import write_tiny_chat_model


@dataclass
class Live:
    url: str
    app: object

    @property
    def runner(self):
        return self.app.state.runner


@contextmanager
def live_server(app):
    """Run `app` under uvicorn on 127.0.0.1 (a free port) in a thread; stop it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    return load(str(write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "m")), device="cpu")


def make_app(loaded, engine_config: EngineConfig, **server):
    engine = Engine(loaded.model, loaded.tokenizer, engine_config)
    return create_app(engine, loaded.tokenizer, loaded.chat_template(), ServerConfig(**{"model_name": "tiny", **server}))


@pytest.fixture(scope="module")
def tiny_server(tiny_chat):
    # greedy requests decode in bursts of 8 tokens, as on a GPU (eager here): answers must not change
    config = EngineConfig(max_batch=4, max_seq_len=256, max_waiting=64, decode_steps=8, eager_bursts=True)
    with live_server(make_app(tiny_chat, config)) as live:
        yield live
