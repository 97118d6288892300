"""One HTTP request run through an ASGI app in the same process, as a stream of messages.

A replica answers the ingress with the single server's own app, so routes, errors, auth and
streaming are those of `quiver serve` by construction; only the bytes travel through Ray.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass
class Head:
    """The response's status line and headers, sent before its body."""
    status: int
    headers: list[tuple[bytes, bytes]]


@dataclass
class HttpCall:
    """What the ingress forwards of a request."""
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": self.headers,
                "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}


async def call_asgi(app, call: HttpCall) -> AsyncIterator[Head | bytes]:
    """Yield the response's Head, then its body chunks as the app sends them. Closing the iterator early
    is the client leaving: the app sees http.disconnect (and aborts its engine requests)."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(call.scope(), receive, sent.put)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield Head(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        if task.done() and task.exception() is not None:
            raise task.exception()
    finally:  # the response is complete or the caller has gone: either way the app has nothing left to send
        gone.set()
        task.cancel()
