"""The bridge between asyncio and the engine: one thread runs the step loop, coroutines submit and abort.

The `Engine` is not thread-safe, so only the runner's thread touches it. Coroutines hand it commands
(add a request, abort one) through a queue that the thread drains between steps, so an abort frees the
request's cache slot before the next step. Each step's outputs go back to the waiting coroutines through
per-request asyncio queues. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Sequence

from lowbit.engine.engine import Engine
from lowbit.engine.request import RequestOutput
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.1  # how often an idle loop looks at the stop flag


class EngineFailed(Exception):
    """The engine raised while this request was running (a bug or out of memory); the request is dropped."""


class RequestStream:
    """One request's outputs, in order; `close()` (or leaving `async with`) aborts it if it is not finished."""

    def __init__(self, runner: EngineRunner, request_id: str):
        self.runner, self.request_id = runner, request_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if isinstance(out, Exception):
            self.finished = True
            raise out
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.runner.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched only by the runner's thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- lifecycle (called from the server's startup and shutdown) -----
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lowbit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort everything in flight (their streams end with EngineFailed) and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._run_commands(block=False)  # pending adds get an answer (then fail below) instead of hanging
        self._fail_all(EngineFailed("the server is shutting down"))

    # ----- what coroutines call -----
    async def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> RequestStream:
        """Queue a request and return its stream of outputs; raises LowbitError (or Overloaded) at once when
        the engine refuses it. Use the stream as `async with`, so that leaving early aborts the request."""
        stream = RequestStream(self, request_id)
        added: concurrent.futures.Future = concurrent.futures.Future()

        def add() -> None:
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except LowbitError as e:
                added.set_exception(e)
                return
            self._streams[request_id] = stream
            added.set_result(None)

        self._submit(add)
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request at the next step boundary, freeing its slot (unknown ids are ignored)."""
        def abort() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

        self._submit(abort)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_active(self) -> int:
        """Requests the engine holds, running or waiting (reads two dict sizes; safe from any thread)."""
        return self.engine.num_unfinished

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    # ----- internals -----
    def _submit(self, command: Callable[[], None]) -> None:
        if not self.running:
            raise EngineFailed("the engine is not running")
        self._commands.put(command)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=self.engine.num_unfinished == 0)
            if self.engine.num_unfinished == 0:
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server; the requests fail
                log.exception("engine step failed; failing %d requests", len(self._streams))
                self._fail_all(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
                continue
            self._dispatch(outputs)

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
            while True:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_all(self, error: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        self._streams.clear()
