"""The edge of the HTTP server: a pure ASGI middleware around every request.

For each HTTP request it
- gives it a request id: the client's `X-Request-ID` if it is a plain token (letters, digits,
  `._:/+=-`, at most 128), else a new one; sent back as `X-Request-ID`, written in the access
  log line and in every error logged for the request;
- reads the body itself, counting bytes as they arrive, whatever the transfer encoding: over
  `max_body_bytes` it answers 413 at once (a declared Content-Length over the limit is refused
  before a byte is read) and closes the connection, so an oversized body is never held whole;
- answers an unexpected exception with a 500 in OpenAI's error shape and swallows it: the
  server never sees it, so it never closes the connection (other requests on it go on), and
  only the request that hit it fails;
- records the request's endpoint, model, status and duration in the Prometheus metrics and
  one access log line (logger `retrieval_lora.serving.access`).

The app sets `request.state.model` (the metrics label) and `request.state.tenant` for it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

from retrieval_lora.serving.metrics import RequestMetrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("retrieval_lora.serving.access")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
CLIENT_GONE = 499  # status recorded for a client that disconnected before its answer (nginx's convention)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_body(code: str, message: str) -> dict:
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class EdgeMiddleware:
    """Request ids, the body limit while reading, 500s that keep connections, metrics and access log."""

    def __init__(self, app: Callable, *, max_body_bytes: int, endpoints: frozenset[str],
                 metrics: RequestMetrics | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.endpoints = endpoints
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        answer = {"status": CLIENT_GONE, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.update(status=message["status"], started=True)
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            await self.app(scope, _replay(body, receive), send_with_id)
        except _BodyTooLarge as exc:
            await _answer(send_with_id, 413, "request_too_large", str(exc), close=True)
        except _ClientGone:
            pass
        except Exception:  # noqa: BLE001 - one request's bug must not reach the server (it would drop the connection)
            log.exception("request %s: unexpected error serving %s %s", request_id, scope["method"], scope["path"])
            if not answer["started"]:
                await _answer(send_with_id, 500, "server_error",
                              f"internal error; the server log has the details under request id {request_id}")
        finally:
            self._record(scope, state, request_id, answer["status"], time.perf_counter() - started)

    async def _read_body(self, scope: dict, receive: Receive) -> bytes:
        """The whole body, refused (413) as soon as more than `max_body_bytes` arrived or were declared."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge(f"request body is {declared} bytes; the limit is {limit} (max_body_bytes): "
                                "send fewer or shorter texts per request")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge(f"request body is more than {limit} bytes (max_body_bytes), counted as it "
                                    "arrived: send fewer or shorter texts per request")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _record(self, scope: dict, state: dict, request_id: str, status: int, seconds: float) -> None:
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        model = str(state.get("model", ""))
        if self.metrics is not None:
            self.metrics.observe(endpoint, model, status, seconds)
        access_log.info("%s %s %s %d %.1fms model=%s tenant=%s", request_id, scope["method"], scope["path"], status,
                        1000 * seconds, model or "-", state.get("tenant") or "-")


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _request_id(scope: dict) -> str:
    given = _header(scope, REQUEST_ID_HEADER.encode())
    return given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then passes on what the server sends."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    payload = json.dumps(error_body(code, message)).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:  # the rest of the body is never read, so the connection cannot carry another request
        headers.append((b"connection", b"close"))
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})
    except OSError:  # the client is gone; there is no one to tell
        pass
