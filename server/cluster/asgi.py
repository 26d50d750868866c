"""Running one HTTP request through an ASGI app in process, its response as a stream of messages.

A replica hosts the whole single-node app (every route of the contract) and the ingress hands it each
request as plain data; this is the in-process client between them. The first item is the status and
headers, then the body's chunks as they are sent (SSE included). Closing the stream early tells the
app the client went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


async def call(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
               extra_headers: list[tuple[str, str]]) -> AsyncIterator[dict[str, Any] | bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while (msg := await out.get()) is not None:
            if msg["type"] == "http.response.start":
                hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                yield {"status": msg["status"], "headers": hdrs + extra_headers}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    break
    finally:
        gone.set()
        await asyncio.wait({task}, timeout=30)
