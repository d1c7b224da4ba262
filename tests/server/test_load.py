"""Load test of `lowbit serve` as a separate process on loopback: 32 concurrent streaming clients for 60 s,
a third of them hanging up mid-stream at random. Zero 5xx, every finished stream well-formed, the engine's
active-request count back to 0 and the server's memory back to its idle level afterwards.

The model is the tiny random chat model (the server's behaviour under load is the point, not the text).
Bounded: clients start no request after 60 s and every request has max_tokens <= 96.
"""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.chat_model import write_tiny_chat_model

CLIENTS, SECONDS = 32, 60.0
SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = write_tiny_chat_model(tmp_path_factory.mktemp("load") / "m")
    port = free_port()
    log = tmp_path_factory.mktemp("load-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", str(folder), "--port", str(port),
                                 "--model-name", "tiny", "--max-batch", "16", "--max-model-len", "256"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, psutil.Process(proc.pid), log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def check_stream(lines: list[str], max_tokens: int) -> None:
    """A whole SSE body in OpenAI's chat-chunk shape, ending with [DONE]."""
    events = [line for line in lines if line]
    assert all(e.startswith("data: ") for e in events), events[:3]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 1 <= usage["completion_tokens"] <= max_tokens
    assert finishes[0] == "stop" or usage["completion_tokens"] == max_tokens


async def client(url: str, index: int, until: float, stats: dict) -> None:
    rng = random.Random(index)
    hangs_up = index % 3 == 0
    async with httpx.AsyncClient(timeout=60) as http:
        while time.monotonic() < until:
            max_tokens = rng.randint(8, 96)
            body = {"model": "tiny", "stream": True, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]),
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": f"client {index} says hello {rng.random()}"}]}
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                if r.status_code != 200:
                    await r.aread()
                    continue
                lines, leave_after = [], rng.randint(1, 12) if hangs_up else None
                async for line in r.aiter_lines():
                    lines.append(line)
                    if leave_after is not None and len(lines) >= leave_after:
                        break
            if leave_after is not None and lines[-1:] != ["data: [DONE]"]:
                stats["hung_up"] += 1
            else:
                check_stream(lines, max_tokens)
                stats["completed"] += 1


async def run_clients(url: str, n: int, seconds: float) -> dict:
    stats = {"status": {}, "completed": 0, "hung_up": 0}
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(url, i, until, stats) for i in range(n)))
    return stats


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (health := httpx.get(url + "/health").json())["active_requests"] != 0:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_32_streaming_clients_for_60_seconds_a_third_hanging_up(server):
    url, proc, log = server
    asyncio.run(run_clients(url, CLIENTS, 3.0))  # warm up: every slot, the allocator's arenas, the code paths
    wait_idle(url)
    time.sleep(1.0)
    idle_rss = proc.memory_info().rss

    stats = asyncio.run(run_clients(url, CLIENTS, SECONDS))

    health = wait_idle(url, timeout=5.0)  # the hung-up requests were aborted, not left to run
    assert health["waiting_requests"] == 0
    time.sleep(1.0)
    rss = proc.memory_info().rss
    print(f"load: {stats}, idle RSS {idle_rss / 2**20:.0f} MiB, after {rss / 2**20:.0f} MiB")
    assert set(stats["status"]) == {200}, stats  # no 5xx, and no 429 either at this load
    assert stats["completed"] > CLIENTS and stats["hung_up"] > CLIENTS // 3, stats
    assert rss <= idle_rss * 1.10 + 16 * 2**20, (idle_rss, rss)
    assert "Traceback" not in log.read_text()
