"""Waiting for a non-streaming result while watching for the client to go away."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from ..engine.service import Generation
from .shape import result_json


async def until_disconnected(request: Request, g: Generation, poll_s: float = 0.25) -> dict[str, Any]:
    """The result as the contract's JSON; cancels the generation if the client disconnects first."""
    task = asyncio.ensure_future(g.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return result_json(task.result())
            if await request.is_disconnected():
                g.cancel()
                task.cancel()
                raise asyncio.CancelledError
    finally:
        if not task.done():
            task.cancel()
