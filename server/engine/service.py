"""The async face of the engine: text in, events out. The HTTP layer uses only this.

Tokenises (no torch here), submits from a worker thread (pinning an adapter may read it from disk),
bridges the engine thread's callbacks into an asyncio queue, and cancels the request when the
consumer goes away (client disconnect, timeout, error).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from jinja2 import TemplateError

from ..errors import AdapterServerError, InvalidRequestError
from .types import GenerationRequest, GenerationResult, SamplingParams, TokenEvent

if TYPE_CHECKING:  # types only: this module, and the HTTP layer above it, never import torch
    from .engine import Engine
    from .sequence import RequestHandle
    from .vocab import Vocabulary

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid():x}{next(_ids):08x}{int(time.time() * 1000) & 0xFFFFFF:06x}"


class _Bridge:
    """Engine-thread sink -> asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    def __call__(self, ev: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


class GenerationService:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name

    @property
    def vocab_size(self) -> int:
        """Token ids the bare model scores (the logits' width)."""
        return self.engine.vocabularies.base.size

    def vocabulary(self, adapter_id: str | None) -> Vocabulary:
        """What requests for this adapter speak: its own tokenizer and token ids, or the base model's (engine/
        vocab.py). AdapterNotFoundError for an unknown id. May read a tokenizer from disk: call in a thread."""
        return self.engine.vocabulary(adapter_id)

    def encode(self, prompt: str, voc: Vocabulary | None = None) -> tuple[int, ...]:
        return tuple((voc.tokenizer if voc is not None else self.tokenizer)(prompt).input_ids)

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None,
                    voc: Vocabulary | None = None) -> tuple[int, ...]:
        """The chat template's prompt (the adapter's own, where its tokenizer brings one); `tools` are passed to
        templates that render them (others ignore them)."""
        if not messages:
            raise InvalidRequestError("messages must hold at least one message")
        tok = voc.tokenizer if voc is not None else self.tokenizer
        if not getattr(tok, "chat_template", None):
            whose = "the adapter's tokenizer" if voc is not None and voc.key != self.engine.vocabularies.base.key \
                else "the base model's tokenizer"
            raise InvalidRequestError(f"{whose} has no chat template; use /v1/completions")
        try:
            out: Any = tok.apply_chat_template(messages, tools=cast(Any, tools or None), add_generation_prompt=True,
                                               tokenize=True)
        except TemplateError as e:  # the template refuses these messages (raise_exception), or is broken
            raise InvalidRequestError(f"the chat template cannot render these messages: {e}") from e
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out  # a BatchEncoding or a list
        return tuple(int(i) for i in ids)

    async def start(self, prompt_ids: tuple[int, ...], adapter_id: str | None, params: SamplingParams,
                    request_id: str | None = None, vocabulary: str | None = None) -> Generation:
        """Submit; typed errors (unknown adapter, overload, bad lengths) are raised here, before any output.
        `vocabulary`: the key of the vocabulary the prompt was tokenised in (the engine checks the version
        it pins speaks it)."""
        return (await self.start_group([(prompt_ids, adapter_id, params, request_id)], vocabulary))[0]

    async def start_group(self, items: list[tuple[tuple[int, ...], str | None, SamplingParams, str | None]],
                          vocabulary: str | None = None) -> list[Generation]:
        """Submit several requests together, all or none (see Engine.submit_group)."""
        loop = asyncio.get_running_loop()
        reqs = [(GenerationRequest(rid or new_id("gen"), ids, adapter, p, vocabulary), _Bridge(loop))
                for ids, adapter, p, rid in items]
        submitting = asyncio.ensure_future(asyncio.to_thread(self.engine.submit_group, reqs))  # type: ignore[arg-type]
        try:
            handles = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            # The caller went away while the requests were being queued (pinning an adapter may read the
            # disk): the thread queues them all the same, so they are cancelled as soon as it has.
            submitting.add_done_callback(_cancel_submitted)
            raise
        return [Generation(req, h, bridge) for (req, bridge), h in zip(reqs, handles, strict=True)]


def _cancel_submitted(done: asyncio.Future[list[RequestHandle]]) -> None:
    if not done.cancelled() and done.exception() is None:
        for h in done.result():
            h.cancel()


class Generation:
    """One submitted request. Iterate `events()`; leaving early cancels it in the engine."""

    def __init__(self, req: GenerationRequest, handle: RequestHandle, bridge: _Bridge) -> None:
        self.req, self.handle, self.bridge = req, handle, bridge
        self.done = False

    def cancel(self) -> None:
        if not self.done:
            self.handle.cancel()
            self.done = True

    async def events(self) -> AsyncIterator[TokenEvent | GenerationResult]:
        """TokenEvents, then one GenerationResult. A failed request raises the typed error the engine sent."""
        try:
            while True:
                ev = await self.bridge.queue.get()
                if isinstance(ev, Exception):
                    self.done = True
                    raise ev
                if isinstance(ev, GenerationResult):
                    self.done = True
                    yield ev
                    return
                yield ev  # type: ignore[misc]
        finally:
            self.cancel()

    async def result(self) -> GenerationResult:
        async for ev in self.events():
            if isinstance(ev, GenerationResult):
                return ev
        raise AdapterServerError("generation ended without a result")
