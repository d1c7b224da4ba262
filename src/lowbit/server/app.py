"""`create_app(engine, tokenizer, template, config) -> FastAPI`: the OpenAI-compatible API and the chat page.

Routes only translate: a protocol request becomes prompt ids and `SamplingParams`, the `EngineRunner`
streams `RequestOutput`s back, and those become OpenAI responses or SSE chunks. Errors come out in
OpenAI's JSON shape with their status: 400 for bad input, 401 without the key, 404 for an unknown model,
413 for a huge body, 429 when the queue is full, 503 when a request waited too long for a slot.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lowbit.chat.template import ChatTemplate
from lowbit.config import ServerConfig
from lowbit.engine.engine import Engine
from lowbit.engine.request import FinishReason, RequestOutput
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError, Overloaded
from lowbit.model.tokenizer import Tokenizer
from lowbit.server import protocol as P
from lowbit.server.middleware import AccessLog, BodyLimit
from lowbit.server.runner import EngineFailed, EngineRunner, RequestStream

log = logging.getLogger(__name__)

STATIC = resources.files("lowbit.server") / "static"
_DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, P.ErrorBody(message=message, type=type, param=param, code=code)


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) answer was ready."""


def create_app(engine: Engine, tokenizer: Tokenizer, template: ChatTemplate,
               config: ServerConfig = ServerConfig()) -> FastAPI:
    runner = EngineRunner(engine)
    api = _Translator(runner, tokenizer, template, config, engine.max_seq_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        log.info("serving %s (max batch %d, context %d)", config.model_name, engine.cache.num_slots,
                 engine.max_seq_len)
        yield
        runner.stop()

    app = FastAPI(title="lowbit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    _add_error_handlers(app)
    auth = [Depends(_auth(config.api_key))]

    @app.get("/health")
    async def health():
        alive = runner.running
        body = {"status": "ok" if alive else "engine stopped", "model": config.model_name,
                "active_requests": runner.num_active, "waiting_requests": runner.num_waiting}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> P.ModelList:
        return P.ModelList(data=[api.model_card()])

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> P.ModelCard:
        api.check_model(model_id)
        return api.model_card()

    @app.get("/info", dependencies=auth)
    async def info():
        return {"model": config.model_name, "max_model_len": engine.max_seq_len, "max_batch": engine.cache.num_slots,
                "template": {"name": template.name, "source": template.source, "stop": list(template.stop)}}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        ids, params = api.chat_request(body)
        return await api.respond(request, "chatcmpl", ids, params, body, api.chat_chunks, api.chat_completion)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: P.CompletionRequest, request: Request):
        ids, params = api.completion_request(body)
        return await api.respond(request, "cmpl", ids, params, body, api.completion_chunks, api.completion)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(AccessLog)
    return app


class _Translator:
    """Protocol requests -> prompt ids + SamplingParams; engine outputs -> OpenAI responses and chunks."""

    def __init__(self, runner: EngineRunner, tokenizer: Tokenizer, template: ChatTemplate, config: ServerConfig,
                 max_len: int):
        self.runner, self.tokenizer, self.template, self.config, self.max_len = runner, tokenizer, template, config, max_len

    def model_card(self) -> P.ModelCard:
        return P.ModelCard(id=self.config.model_name, max_model_len=self.max_len)

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server has '{self.config.model_name}'",
                           param="model", code="model_not_found")

    # ----- requests -----
    def chat_request(self, body: P.ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        self._check_common(body)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        text = self.template.render(messages, add_generation_prompt=True, **self.tokenizer.special_tokens)
        ids = self.tokenizer.encode(text, add_bos=False)
        return ids, self._params(body, len(ids), body.max_completion_tokens or body.max_tokens, self.template.stop)

    def completion_request(self, body: P.CompletionRequest) -> tuple[list[int], SamplingParams]:
        self._check_common(body)
        for name, unsupported in (("echo", body.echo), ("logprobs", body.logprobs is not None),
                                  ("suffix", body.suffix is not None), ("best_of", (body.best_of or 1) > 1)):
            if unsupported:
                raise ApiError(400, f"{name} is not supported", param=name)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        return ids, self._params(body, len(ids), body.max_tokens, ())

    def _check_common(self, body: P.Request) -> None:
        self.check_model(body.model)
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")

    def _params(self, body: P.Request, prompt_len: int, max_tokens: int | None, stop: tuple[str, ...]) -> SamplingParams:
        """SamplingParams for the request; 400 when the prompt or max_tokens do not fit the context."""
        room = self.max_len - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens. However, your "
                                f"prompt has {prompt_len} tokens, leaving no room for a completion.",
                           param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                                f"{max_tokens} for the completion).", param="max_tokens", code="context_length_exceeded")
        user_stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=body.seed, max_new_tokens=max_tokens or room,
            stop=tuple(dict.fromkeys(user_stop + list(stop))), ignore_eos=body.ignore_eos)

    # ----- running -----
    async def respond(self, request: Request, prefix: str, ids: list[int], params: SamplingParams, body: P.Request,
                      chunks, complete):
        """Start the request, wait for its first output (so that queue trouble is still an HTTP error), then
        stream SSE chunks or collect the whole answer."""
        rid = f"{prefix}-{uuid.uuid4().hex}"
        request.state.log = {"id": rid, "prompt_tokens": len(ids)}
        stream = await self._start(rid, ids, params)
        try:
            first = await _unless_disconnected(request, anext(stream))
            if first.finish_reason == FinishReason.TIMEOUT:
                raise ApiError(503, "the server is overloaded: no slot freed up in time; try again later",
                               type="server_error", code="overloaded")
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = chunks(rid, body.model, _chain(first, stream, request.state.log), include_usage)
                return _EventStream(self._sse(stream, events), stream)
            text, last = await _unless_disconnected(request, _collect(first, stream))
        except BaseException:
            stream.close()
            raise
        request.state.log.update(completion_tokens=last.num_output_tokens, finish_reason=_finish(last))
        return complete(rid, body.model, text, last)

    async def _start(self, rid: str, ids: list[int], params: SamplingParams) -> RequestStream:
        try:
            return await self.runner.generate(rid, ids, params)
        except Overloaded as e:
            raise ApiError(429, f"the server is overloaded: {e}", type="server_error", code="overloaded") from None
        except EngineFailed as e:
            raise ApiError(503, str(e), type="server_error") from None

    @staticmethod
    async def _sse(stream: RequestStream, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """The SSE body; ends with [DONE]. A client that leaves cancels this generator, which aborts the request."""
        try:
            async for event in events:
                yield event
        except EngineFailed as e:
            yield _data(P.ErrorResponse(error=P.ErrorBody(message=str(e), type="server_error")))
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

    def chat_chunks(self, rid: str, model: str, outputs, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: P.Delta, reason: str | None = None) -> str:
            return _data(P.ChatCompletionChunk(id=rid, model=model, choices=[P.ChatChunkChoice(delta=delta, finish_reason=reason)]))

        async def events():
            yield chunk(P.Delta(role="assistant", content=""))
            async for out in outputs:
                if out.delta_text:
                    yield chunk(P.Delta(content=out.delta_text))
                if out.finished:
                    yield chunk(P.Delta(), _finish(out))
                    if include_usage:
                        yield _data(P.ChatCompletionChunk(id=rid, model=model, choices=[], usage=_usage(out)))

        return events()

    def completion_chunks(self, rid: str, model: str, outputs, include_usage: bool) -> AsyncIterator[str]:
        async def events():
            async for out in outputs:
                if out.delta_text or out.finished:
                    choice = P.CompletionChoice(text=out.delta_text, finish_reason=_finish(out) if out.finished else None)
                    yield _data(P.Completion(id=rid, model=model, choices=[choice]))
                if out.finished and include_usage:
                    yield _data(P.Completion(id=rid, model=model, choices=[], usage=_usage(out)))

        return events()

    @staticmethod
    def chat_completion(rid: str, model: str, text: str, last: RequestOutput) -> P.ChatCompletion:
        choice = P.ChatChoice(message=P.AssistantMessage(content=text), finish_reason=_finish(last))
        return P.ChatCompletion(id=rid, model=model, choices=[choice], usage=_usage(last))

    @staticmethod
    def completion(rid: str, model: str, text: str, last: RequestOutput) -> P.Completion:
        choice = P.CompletionChoice(text=text, finish_reason=_finish(last))
        return P.Completion(id=rid, model=model, choices=[choice], usage=_usage(last))


# ----- helpers -----

class _EventStream(StreamingResponse):
    """An SSE response that aborts its request however the response ends (a client that left included)."""

    def __init__(self, events: AsyncIterator[str], stream: RequestStream):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()


def _finish(out: RequestOutput) -> str | None:
    return None if out.finish_reason is None else out.finish_reason.value


def _usage(out: RequestOutput) -> P.Usage:
    return P.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                   total_tokens=out.num_prompt_tokens + out.num_output_tokens)


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _data(model) -> str:
    """One SSE event. JSON leaves U+0085/U+2028/U+2029 raw; they are escaped, since clients that split the
    stream with str.splitlines() (requests, httpx) would otherwise cut an event in two."""
    return f"data: {model.model_dump_json().translate(_LINE_BREAKS)}\n\n"


async def _chain(first: RequestOutput, stream: RequestStream, log: dict) -> AsyncIterator[RequestOutput]:
    """`first`, then the rest of the stream; the last output's counts go to the access log."""
    last = first
    yield first
    async for out in stream:
        last = out
        yield out
    log.update(completion_tokens=last.num_output_tokens, finish_reason=_finish(last))


async def _collect(first: RequestOutput, stream: RequestStream) -> tuple[str, RequestOutput]:
    text, last = [first.delta_text], first
    async for out in stream:
        text.append(out.delta_text)
        last = out
    return "".join(text), last


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, but give up (ClientGone) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        task.cancel()


def _auth(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    return check


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(P.ErrorResponse(error=e.body).model_dump(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON in the request body: {first.get('ctx', {}).get('error', '')}")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(LowbitError)
    async def bad_input(request, e: LowbitError):
        return _error(400, str(e))

    @app.exception_handler(EngineFailed)
    async def engine_failed(request, e: EngineFailed):
        return _error(500, str(e), type="server_error")

    @app.exception_handler(ClientGone)
    async def gone(request, e: ClientGone):
        return _error(499, "client closed the request")

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error", type="server_error")
