"""The OpenAI-compatible API over real HTTP on loopback, driven by the official `openai` package unchanged.

A tiny random chat model answers (its text is noise, which is fine: the server must pass whatever the
engine makes through exactly). Checked: answers equal the engine's own for the same request, streaming
and not; usage counts; stop strings; seeds; OpenAI's error shape and status for bad input, with the server
still serving afterwards; the API key; 429/503 on overload; aborting on disconnect; the access log.
"""

import json
import threading
import time

import httpx
import openai
import pytest

from lowbit.config import ServerConfig
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.server.app import create_app
from tests.server.conftest import live_server, make_app

HELLO = [{"role": "user", "content": "Hello! How are you?"}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def engine_answer(loaded, prompt_ids, params):
    """What the engine alone generates for this request: (text, finish reason)."""
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch=1, max_seq_len=256))
    text, _, reason = engine.generate([prompt_ids], params)[0]
    return text, reason.value


def chat_ids(loaded, messages):
    text = loaded.chat_template().render(messages, add_generation_prompt=True, **loaded.tokenizer.special_tokens)
    return loaded.tokenizer.encode(text, add_bos=False)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_equals_the_engine_streaming_or_not(client, tiny_chat):
    ids = chat_ids(tiny_chat, HELLO)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=24,
                            stop=tiny_chat.chat_template().stop)
    expected, reason = engine_answer(tiny_chat, ids, params)
    kw = dict(model="tiny", messages=HELLO, temperature=0.9, top_p=0.95, seed=7, max_tokens=24)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_greedy_chat_streams_bursts_of_tokens_as_the_engine_answers(client, tiny_chat):
    """The server's engine decodes greedy requests 8 tokens per step: fewer chunks, the same text as one
    token per step."""
    ids = chat_ids(tiny_chat, HELLO)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=tiny_chat.chat_template().stop)
    expected, reason = engine_answer(tiny_chat, ids, params)
    kw = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 30, "extra_body": {"ignore_eos": True}}
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.completion_tokens == 30 and len(chunks) < 15
    assert client.chat.completions.create(**kw).choices[0].message.content == expected


def test_completions_equal_the_engine_streaming_or_not(client, tiny_chat):
    ids = tiny_chat.tokenizer.encode("Once upon a time", add_bos=True)
    params = SamplingParams(temperature=0, max_new_tokens=12, presence_penalty=0.5, frequency_penalty=1.0)
    expected, reason = engine_answer(tiny_chat, ids, params)
    kw = dict(model="tiny", temperature=0, max_tokens=12, presence_penalty=0.5, frequency_penalty=1.0)
    r = client.completions.create(prompt="Once upon a time", **kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, reason)
    assert r.usage.prompt_tokens == len(ids)
    assert client.completions.create(prompt=ids, **kw).choices[0].text == expected  # token ids as the prompt
    chunks = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == reason


def test_stop_string_and_seed(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[10:12]
    cut = client.completions.create(**kw, stop=[stop, "never-there"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    sampled = [client.completions.create(model="tiny", prompt="abc", max_tokens=20, seed=s).choices[0].text
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_max_tokens_default_fills_the_context(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == 256 and r.choices[0].finish_reason == "length"


CHAT = {"model": "tiny", "messages": HELLO}
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
    ("messages not a list", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("temperature a word", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {**CHAT, "temperature": 3}, 400, "temperature"),
    ("no messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("no model", {"messages": HELLO}, 400, "model"),
    ("unknown model", {**CHAT, "model": "gpt-4"}, 404, "does not exist"),
    ("max_tokens 0", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {**CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens beyond the context", {**CHAT, "max_tokens": 250}, 400, "maximum context length is 256"),
    ("prompt beyond the context", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300}]}, 400,
     "maximum context length is 256"),
    ("n=2", {**CHAT, "n": 2}, 400, "n=1"),
    ("empty stop string", {**CHAT, "stop": [""]}, 400, "stop"),
    ("logprobs", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("seed negative", {**CHAT, "seed": -1}, 400, "seed"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_chat_requests_get_openai_errors(tiny_server, name, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_bad_completion_requests_and_routes(tiny_server):
    url = tiny_server.url
    cases = [({"model": "tiny", "prompt": [999999]}, 400, "token id out of range"),
             ({"model": "tiny", "prompt": ""}, 400, "empty"),
             ({"model": "tiny", "prompt": ["a", "b"]}, 400, "one prompt"),
             ({"model": "tiny", "prompt": "a", "echo": True}, 400, "echo")]
    for body, status, message in cases:
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/v1/nothing").status_code == 404 and "error" in httpx.get(url + "/v1/nothing").json()
    assert httpx.get(url + "/v1/chat/completions").status_code == 405


def test_openai_client_raises_and_the_server_keeps_serving(client, tiny_server):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).usage.completion_tokens <= 3
    assert httpx.get(tiny_server.url + "/health").json()["active_requests"] == 0


def test_body_size_limit(tiny_server):
    huge = json.dumps({**CHAT, "user": "x" * (2 << 20)}).encode()
    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(tiny_server.url + "/v1/chat/completions", content=iter([huge[:1000], huge[1000:]]),
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_access_log_is_one_json_line_per_request(client, caplog):
    with caplog.at_level("INFO", logger="lowbit.server.access"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
        time.sleep(0.05)
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lowbit.server.access"]
    entry = entries[-1]
    assert entry["path"] == "/v1/chat/completions" and entry["status"] == 200 and entry["method"] == "POST"
    assert entry["id"].startswith("chatcmpl-") and entry["prompt_tokens"] > 0 and entry["completion_tokens"] <= 4


def test_api_key(tiny_chat):
    with live_server(make_app(tiny_chat, EngineConfig(max_batch=1, max_seq_len=64), api_key="s3cret")) as live:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(live.url + "/info").status_code == 401
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        assert httpx.get(live.url + "/health").status_code == 200  # open, for load balancers


class SlowEngine(Engine):
    """The real engine, 20 ms slower per step, so that requests stay in flight long enough to observe."""

    def step(self):
        time.sleep(0.02)
        return super().step()


@pytest.fixture
def slow_server(tiny_chat):
    engine = SlowEngine(tiny_chat.model, tiny_chat.tokenizer,
                        EngineConfig(max_batch=1, max_seq_len=256, max_waiting=1, max_wait_s=1.0))
    app = create_app(engine, tiny_chat.tokenizer, tiny_chat.chat_template(), ServerConfig(model_name="tiny"))
    with live_server(app) as live:
        yield live


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


LONG = {"model": "tiny", "prompt": "abc", "max_tokens": 200, "ignore_eos": True}


def test_full_queue_is_429_and_a_long_wait_is_503(slow_server):
    url, runner = slow_server.url, slow_server.runner
    http = httpx.Client()
    with http.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}) as running:
        lines = running.iter_lines()  # (dropping this iterator would close the connection)
        next(lines)  # the first request holds the only slot for 4 s
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(httpx.post(url + "/v1/completions", json=LONG)))
        waiter.start()
        wait_for(lambda: runner.num_waiting == 1)  # the second waits (1 s at most) ...
        full = http.post(url + "/v1/completions", json=LONG)  # ... so the third finds the queue full
        assert full.status_code == 429 and full.json()["error"]["code"] == "overloaded"
        waiter.join()
        assert waited[0].status_code == 503 and "overloaded" in waited[0].json()["error"]["message"]
    wait_for(lambda: runner.num_active == 0)


def test_disconnect_aborts_at_once(slow_server):
    url, runner = slow_server.url, slow_server.runner
    with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 200}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        assert runner.num_active == 1
    wait_for(lambda: runner.num_active == 0, timeout=1.0)  # 200 tokens would take > 4 s
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(url + "/v1/completions", json=LONG, timeout=0.3)
    wait_for(lambda: runner.num_active == 0, timeout=2.0)
    assert runner.engine.cache.num_free == 1


class FlakyEngine(Engine):
    """The real engine, whose next step raises when told to (a stand-in for a CUDA error or a bug)."""

    fail_next = False

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return super().step()


def test_a_failing_step_fails_its_requests_and_the_server_keeps_serving(tiny_chat):
    engine = FlakyEngine(tiny_chat.model, tiny_chat.tokenizer, EngineConfig(max_batch=2, max_seq_len=64))
    app = create_app(engine, tiny_chat.tokenizer, tiny_chat.chat_template(), ServerConfig(model_name="tiny"))
    with live_server(app) as live:
        engine.fail_next = True
        r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4})
        assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
        ok = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4})
        assert ok.status_code == 200 and httpx.get(live.url + "/health").json()["active_requests"] == 0


def test_sse_events_survive_splitlines():
    from lowbit.server import protocol as P
    from lowbit.server.app import _data

    text = "a\u2028b\u2029c\x85d\re\nf\x0bg\x0ch\x1ci\x1dj\x1ek"
    event = _data(P.ChatCompletionChunk(id="x", model="m", choices=[P.ChatChunkChoice(delta=P.Delta(content=text))]))
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[6:])["choices"][0]["delta"]["content"] == text
