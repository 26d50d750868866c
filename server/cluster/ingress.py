"""The cluster's front door: the whole HTTP contract, each request handed to an engine replica.

It reads only which adapter a request names (`adapter_id` of /generate, `model` of the OpenAI
routes) and passes it to Ray Serve's router as the multiplexed model id; everything else (validation,
errors, streaming) is the replica's own app. `/metrics` is its own: the whole cluster's (metrics.py). Catalogue changes need no broadcast: the replicas share
one store and each takes in the others' changes at its next request.
"""

# no `from __future__ import annotations`: FastAPI must see the handler's Request annotation as a class

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from .metrics import FRESH_S, hub, merge

app = FastAPI(title="adapter-server cluster")
log = logging.getLogger(__name__)
UNAVAILABLE = "the replica serving this request stopped; nothing stored was lost: retry"
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def adapter_of(path: str, body: bytes) -> str:
    """The adapter a request names, or "" for one that names none. (The OpenAI routes' `model` may be
    the base model's name: it is never resident anywhere, so such a request goes by load alone.)"""
    if not body or path not in ("/generate", "/v1/completions", "/v1/chat/completions"):
        return ""
    try:
        j = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(j, dict):
        return ""
    name = j.get("adapter_id") if path == "/generate" else j.get("model")
    return name if isinstance(name, str) else ""


@serve.ingress(app)
class Ingress:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.hub = hub()

    @app.get("/metrics", response_model=None)
    async def metrics(self) -> PlainTextResponse:
        """Every live replica's metrics, summed, and each under its `replica` label."""
        texts = await self.hub.fresh.remote(FRESH_S)
        return PlainTextResponse(merge(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/{path:path}", methods=METHODS, response_model=None)
    async def forward(self, request: Request) -> StreamingResponse | JSONResponse:
        body = await request.body()
        adapter = adapter_of(request.url.path, body)
        handle = self.engine.options(multiplexed_model_id=adapter, stream=True)
        stream = handle.handle.remote(request.method, request.url.path, request.url.query,
                                      [(k, v) for k, v in request.headers.items() if k.lower() != "host"], body)
        try:
            head = await stream.__anext__()
        except Exception as e:  # the replica died (Ray Serve replaces it) or could not take the request
            log.warning("replica failed before answering %s %s: %s", request.method, request.url.path, e)
            return JSONResponse({"error": {"type": "replica_unavailable", "message": UNAVAILABLE}}, status_code=503,
                                headers={"Retry-After": "1"})
        hdrs = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
        sse = hdrs.get("content-type", "").startswith("text/event-stream")

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as e:  # mid-stream: the status is sent; say it in band, as the server does
                log.warning("replica failed mid-response: %s", e)
                if sse:
                    err = {"error": {"type": "replica_unavailable", "message": UNAVAILABLE, "status": 503}}
                    yield f"data: {json.dumps(err)}\n\n".encode()

        return StreamingResponse(rest(), status_code=head["status"], headers=hdrs)
