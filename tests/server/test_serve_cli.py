"""`lowbit serve` from the command line: bad flags fail in one line before loading anything, and the real
SmolLM2 starts in seconds and answers the official openai client sensibly."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from lowbit.cli import main
from tests.server.test_load import free_port

SRC = Path(__file__).resolve().parents[2] / "src"


def one_line_error(capsys, argv, match):
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error:") and match in err[0], err


def test_bad_flags_and_busy_port_fail_in_one_line(capsys, tmp_path):
    one_line_error(capsys, ["serve", str(tmp_path), "--max-batch", "0"], "--max-batch")
    one_line_error(capsys, ["serve", str(tmp_path), "--decode-steps", "0", "--port", str(free_port())], "--decode-steps")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        one_line_error(capsys, ["serve", str(tmp_path), "--port", str(s.getsockname()[1])], "cannot listen on")
    one_line_error(capsys, ["serve", str(tmp_path / "nope"), "--port", str(free_port())], "no such file or folder")
    one_line_error(capsys, ["serve", str(tmp_path), "--template", "nope", "--port", str(free_port())],
                   "unknown chat template")


@pytest.mark.slow
def test_serve_smollm2_starts_in_seconds_and_answers(smollm2_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", str(smollm2_dir), "--port", str(port),
                             "--api-key", "k"], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        seconds = time.monotonic() - start
        print(f"lowbit serve SmolLM2-135M-Instruct: /health answered after {seconds:.1f} s")
        assert seconds < 60
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert client.models.list().data[0].id == smollm2_dir.name
        r = client.chat.completions.create(model=smollm2_dir.name, temperature=0, max_tokens=30,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "lowbit: serving" in proc.stderr.read()
