"""Server-sent events framed as the OpenAI API and vLLM frame them: each event one `data: ...` line, a
blank line after it (`\n\n`), and nothing else in the stream (no comment lines as keep-alive pings).
Clients parse exactly that: vLLM's load generator (`vllm bench serve`) splits the body on `\n\n` and reads
every event as `data: ` + JSON, so a `\r\n\r\n` separator or a `: ping` comment derailed it (it counted
complete streams as failed)."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

from sse_starlette.sse import EventSourceResponse


def event_stream(events: AsyncIterable[Any]) -> EventSourceResponse:
    """A streaming response of `events` (dicts with a "data" string), `\n\n` between them, no pings."""
    return EventSourceResponse(events, sep="\n", ping=0)
