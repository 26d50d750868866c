"""Waiting for non-streaming results while watching for the client to go away."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request

from ..engine.service import Generation
from ..engine.types import GenerationResult
from .shape import result_json

log = logging.getLogger(__name__)


class ClientDisconnected(Exception):  # noqa: N818 (not an error: the client left)
    """The client went away before its result; its generations are cancelled (answered 499, unseen)."""


async def results_or_disconnect(request: Request, gens: list[Generation], poll_s: float = 0.25) -> list[GenerationResult]:
    """Every generation's result, in order; cancels them all if the client disconnects first."""
    tasks = [asyncio.ensure_future(g.result()) for g in gens]
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=poll_s)
            if not pending:
                return [t.result() for t in tasks]
            if any(t.done() and t.exception() is not None for t in tasks):
                next(t for t in tasks if t.done() and t.exception() is not None).result()  # raises its error
            if await request.is_disconnected():
                for g in gens:
                    g.cancel()
                log.info("client disconnected from %s %s before its result; cancelled %s", request.method,
                         request.url.path, ", ".join(g.req.request_id for g in gens))
                raise ClientDisconnected
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


async def until_disconnected(request: Request, g: Generation, poll_s: float = 0.25) -> dict[str, Any]:
    """One result as the contract's JSON; cancels the generation if the client disconnects first."""
    return result_json((await results_or_disconnect(request, [g], poll_s))[0])
