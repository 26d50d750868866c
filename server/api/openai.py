"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

`model` is an adapter id, or the base model's name for no adapter.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ..engine.service import Generation, new_id
from ..engine.types import GenerationResult, SamplingParams
from ..errors import AdapterNotFoundError, InvalidRequestError
from .deps import Ready, ReadyDep, UserAuth
from .disconnect import until_disconnected
from .errors import inband_error
from .schemas import ChatIn, CompletionIn, _OpenAIBase

router = APIRouter(prefix="/v1", dependencies=[UserAuth])


def _adapter_for(s: Ready, model: str) -> str | None:
    if model == s.model_name:
        return None
    if not s.registry.exists(model):
        raise AdapterNotFoundError(model)
    return model


def _params(body: _OpenAIBase, logprobs: bool, default_max: int | None) -> SamplingParams:
    """`default_max`: OpenAI's default when the client sets no limit (16 for completions; None, the server
    limit, for chat). The engine checks the lengths."""
    return SamplingParams(body.max_completion_tokens or body.max_tokens, default_max, body.temperature, body.top_p,
                          body.top_k, body.seed, body.stops(), body.ignore_eos, logprobs)


def _usage(r: GenerationResult) -> dict[str, int]:
    n = len(r.token_ids)
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": n, "total_tokens": r.prompt_tokens + n}


@router.get("/models")
async def models(s: ReadyDep) -> dict[str, Any]:
    now = int(time.time())
    data = [{"id": s.model_name, "object": "model", "created": now, "owned_by": "adapter-server", "root": s.model_name}]
    for a in s.registry.infos():
        data.append({"id": a["adapter_id"], "object": "model", "created": now, "owned_by": "adapter-server",
                     "root": s.model_name, "parent": s.model_name})
    return {"object": "list", "data": data}


@router.post("/completions")
async def completions(body: CompletionIn, request: Request, s: ReadyDep) -> Any:
    if body.echo:
        raise InvalidRequestError("echo is not supported")
    adapter = _adapter_for(s, body.model)
    ids = await asyncio.to_thread(s.generation.encode, body.text())
    g = await s.generation.start(ids, adapter, _params(body, bool(body.logprobs), 16), new_id("cmpl"))
    created = int(time.time())
    if body.stream:
        return EventSourceResponse(_stream_completion(g, body, created), ping=15)
    r = await _result(request, g)
    lp = None
    if body.logprobs is not None and r["logprobs"] is not None:
        toks = [s.generation.tokenizer.decode([t]) for t in r["token_ids"]]
        lp = {"tokens": toks, "token_logprobs": r["logprobs"], "top_logprobs": None, "text_offset": None}
    return {
        "id": r["id"], "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "text": r["text"], "logprobs": lp, "finish_reason": r["finish_reason"]}],
        "usage": r["_usage"],
    }


async def _result(request: Request, g: Generation) -> dict[str, Any]:
    r = await until_disconnected(request, g)
    u = r["usage"]
    r["_usage"] = {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
    return r


async def _events(g: Generation) -> AsyncIterator[tuple[str, Any]]:
    """('delta', text) for each piece of text, then ('done', result); errors reported in-band."""
    async for ev in g.events():
        if isinstance(ev, GenerationResult):
            yield "done", ev
        elif ev.text:
            yield "delta", ev.text


def _error_chunk(e: Exception) -> dict[str, str]:
    return {"data": json.dumps(inband_error(e))}


async def _stream_completion(g: Generation, body: CompletionIn, created: int) -> AsyncIterator[dict[str, str]]:
    head = {"id": g.req.request_id, "object": "text_completion", "created": created, "model": body.model}
    try:
        async for kind, x in _events(g):
            if kind == "delta":
                chunk = {**head, "choices": [{"index": 0, "text": x, "logprobs": None, "finish_reason": None}]}
            else:
                chunk = {**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": x.finish_reason}]}
                if body.stream_options and body.stream_options.include_usage:
                    yield {"data": json.dumps(chunk)}
                    chunk = {**head, "choices": [], "usage": _usage(x)}
            yield {"data": json.dumps(chunk)}
    except Exception as e:
        yield _error_chunk(e)
    yield {"data": "[DONE]"}


@router.post("/chat/completions")
async def chat(body: ChatIn, request: Request, s: ReadyDep) -> Any:
    adapter = _adapter_for(s, body.model)
    ids = await asyncio.to_thread(s.generation.encode_chat, [m.plain() for m in body.messages])
    g = await s.generation.start(ids, adapter, _params(body, body.logprobs, None),
                                 new_id("chatcmpl"))
    created = int(time.time())
    if body.stream:
        return EventSourceResponse(_stream_chat(g, body, created), ping=15)
    r = await _result(request, g)
    lp = None
    if body.logprobs and r["logprobs"] is not None:
        tok = s.generation.tokenizer
        lp = {"content": [{"token": tok.decode([t]), "logprob": p, "bytes": None, "top_logprobs": []}
                          for t, p in zip(r["token_ids"], r["logprobs"], strict=True)]}
    return {
        "id": r["id"], "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                     "logprobs": lp, "finish_reason": r["finish_reason"]}],
        "usage": r["_usage"],
    }


async def _stream_chat(g: Generation, body: ChatIn, created: int) -> AsyncIterator[dict[str, str]]:
    head = {"id": g.req.request_id, "object": "chat.completion.chunk", "created": created, "model": body.model}

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, str]:
        return {"data": json.dumps({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish}]})}

    yield chunk({"role": "assistant", "content": ""}, None)
    try:
        async for kind, x in _events(g):
            if kind == "delta":
                yield chunk({"content": x}, None)
            else:
                yield chunk({}, x.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    yield {"data": json.dumps({**head, "choices": [], "usage": _usage(x)})}
    except Exception as e:
        yield _error_chunk(e)
    yield {"data": "[DONE]"}
