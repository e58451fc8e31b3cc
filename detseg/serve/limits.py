"""The server's limits, and the ASGI middleware that enforces the request-body cap."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from detseg.errors import DetsegError

Scope = dict[str, Any]
Receive = Any
Send = Any


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts.

    Attributes:
        max_body_bytes: largest request body (413 beyond it).
        max_pixels: largest decoded image, width x height (422 beyond it).
        queue_size: requests that may wait per model beside those running (503 beyond it).
        workers: inference threads per model.
        timeout_s: seconds a request may wait and run before it is answered 504.
    """

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    queue_size: int = 8
    workers: int = 1
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_pixels < 1 or self.workers < 1:
            raise DetsegError("body and pixel limits and --workers must be positive.")
        if self.queue_size < 0 or self.timeout_s <= 0:
            raise DetsegError("--queue-size must be >= 0 and --timeout positive.")


def error_body(status: int, message: str) -> bytes:
    """The JSON error every route answers: ``{"error": {"status": 413, "message": "..."}}``."""
    return json.dumps({"error": {"status": status, "message": message}}).encode()


class BodyLimitMiddleware:
    """Answers 413 to bodies above ``max_bytes``: from Content-Length before reading, or while
    streaming a chunked body, so no more than ``max_bytes`` of a request is ever held."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (
            f"the request body exceeds the limit of {self.max_bytes:,} bytes; "
            "send a smaller image (or start the server with a larger --max-body-mb)."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = error_body(413, self._message())
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the cap."""
