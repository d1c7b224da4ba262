"""HTTP plumbing below the routes: the request-body size limit and the structured access log.

Both are plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers streaming responses and
hides client disconnects from them). They know nothing of OpenAI or the engine; a route may leave facts
for the access log (token counts, the completion id) in `request.state.log`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

access_log = logging.getLogger("lowbit.server.access")

TOO_LARGE = json.dumps({"error": {"message": "request body too large", "type": "invalid_request_error",
                                  "param": None, "code": "request_too_large"}}).encode()


class BodyLimit:
    """Answer 413 to a request whose body exceeds `max_bytes`, before any route parses it.

    A declared Content-Length is checked at once; a chunked body is read (at most max_bytes + 1 bytes)
    and replayed to the app, so the limit holds either way.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _too_large(send) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(TOO_LARGE)).encode())]})
    await send({"type": "http.response.body", "body": TOO_LARGE})


class AccessLog:
    """One JSON line per request on the `lowbit.server.access` logger, written when the response ends
    (or the client goes away): method, path, status, bytes sent, duration, client, and route facts."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, record = time.perf_counter(), {"status": None, "bytes": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            elif message["type"] == "http.response.body":
                record["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client")
            entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "method": scope["method"], "path": scope["path"], **record,
                     "duration_ms": round(1000 * (time.perf_counter() - start), 1),
                     "client": f"{client[0]}:{client[1]}" if client else None,
                     **scope.get("state", {}).get("log", {})}
            access_log.info(json.dumps(entry))
