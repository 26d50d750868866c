"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

`model` is an adapter id, or the base model's name for no adapter. A request speaks its adapter's
vocabulary (engine/vocab.py): tokenised, templated and shown with the adapter's own tokenizer where its
folder has one (tokens added), the base model's otherwise. Each choice is its own request in
the engine (`n` and `best_of` per prompt, every prompt of a list), so they batch with everyone else's
rows, whatever adapter each uses. Fields that would change the output and that we do not serve are a
400 naming them (schemas.UNSUPPORTED), never ignored.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from ..engine.service import Generation, new_id
from ..engine.types import GenerationResult, GrammarSpec, SamplingParams, TokenEvent, TopLogprobs
from ..errors import AdapterNotFoundError, InvalidRequestError
from .deps import Ready, ReadyDep, UserAuth
from .disconnect import results_or_disconnect
from .errors import inband_error
from .schemas import ChatIn, CompletionIn, Prompt, _OpenAIBase
from .sse import event_stream

if TYPE_CHECKING:  # types only: the HTTP layer never imports torch
    from ..engine.vocab import Vocabulary

router = APIRouter(prefix="/v1", dependencies=[UserAuth])


def _adapter_for(s: Ready, model: str) -> str | None:
    if model == s.model_name:
        return None
    if not s.registry.exists(model):
        raise AdapterNotFoundError(model)
    return model


def _check(body: _OpenAIBase) -> None:
    if bad := body.unsupported():
        raise InvalidRequestError(f"{', '.join(bad)}: not supported by this server (the request would be answered "
                                  "as if it were absent)")


async def _vocabulary(s: Ready, body: _OpenAIBase, adapter: str | None) -> Vocabulary:
    """What the request speaks (its adapter's tokenizer and ids), with the token ids it names checked."""
    voc = await asyncio.to_thread(s.generation.vocabulary, adapter)
    vocab = voc.size
    if out := [t for t, _ in body.bias() if t >= vocab]:
        raise InvalidRequestError(f"logit_bias token {out[0]} is not in the vocabulary (ids 0 to {vocab - 1})")
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None and body.min_tokens > limit:
        raise InvalidRequestError(f"min_tokens {body.min_tokens} is over max_tokens {limit}")
    return voc


def _params(body: _OpenAIBase, default_max: int | None, seed: int | None, logprobs: bool = False,
            top: int = 0, grammar: GrammarSpec | None = None) -> SamplingParams:
    """`default_max`: OpenAI's default when the client sets no limit (16 for completions; None, the server
    limit, for chat). The engine checks the lengths."""
    return SamplingParams(
        max_new_tokens=body.max_completion_tokens or body.max_tokens, default_new_tokens=default_max,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=seed, stop=body.stops(),
        ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=top, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logit_bias=body.bias(), min_tokens=body.min_tokens, grammar=grammar or _response_format(body))


def _response_format(body: _OpenAIBase) -> GrammarSpec | None:
    rf = body.response_format
    if rf is None or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return "json_object", ""
    if rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format json_schema needs json_schema.schema, a JSON Schema object")
        return "json_schema", json.dumps(schema)
    raise InvalidRequestError(f"response_format type {rf.get('type')!r} is not supported (text, json_object, json_schema)")


class _ToolPlan:
    """Tool calls by constrained decoding (as vLLM serves tool_choice "required" and named functions): the
    output is held to the named function's argument schema, or for "required" to one call of any tool,
    {"name": ..., "arguments": {...}}; the answer is then returned as `tool_calls`."""

    def __init__(self, body: ChatIn, template: str) -> None:
        tools, tc = body.tools or [], body.tool_choice
        self.named: str | None = None
        self.spec: GrammarSpec | None = None
        self.auto: set[str] = set()  # tool_choice auto: the tools whose calls are parsed out of free text
        if not tools:
            if tc not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools")
            return
        params: dict[str, dict[str, Any]] = {}
        for t in tools:
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise InvalidRequestError('each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
            params[f["name"]] = f.get("parameters") or {"type": "object"}
        if tc == "none":
            return
        if body.response_format is not None and body.response_format.get("type") != "text":
            raise InvalidRequestError("send tools or response_format, not both")
        if tc is None or tc == "auto":
            if "tools" not in template:
                raise InvalidRequestError(
                    "tool_choice 'auto' (the default when tools are sent) lets the model decide whether to call a "
                    "tool, and this model's chat template does not show it any tools; send tool_choice 'required' or "
                    '{"type": "function", "function": {"name": ...}}, which constrain the output to a call')
            self.auto = set(params)
            return
        if tc == "required":
            self.spec = "json_schema", json.dumps({"anyOf": [
                {"type": "object", "properties": {"name": {"const": n}, "arguments": p}, "required": ["name", "arguments"],
                 "additionalProperties": False} for n, p in params.items()]})
        elif isinstance(tc, dict) and isinstance(tc.get("function"), dict) and tc["function"].get("name") in params:
            self.named = tc["function"]["name"]
            self.spec = "json_schema", json.dumps(params[self.named])
        else:
            raise InvalidRequestError(f"tool_choice {json.dumps(tc)} names no tool of this request")

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The tool calls the text holds: the constrained text (None if it stopped short of one, at
        finish_reason length), or with tool_choice auto the calls written in the common formats."""
        if self.auto:
            found = [(n, a) for n, a in parse_tool_calls(text) if n in self.auto]
            return [_call(n, a) for n, a in found] or None
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        return [_call(self.named, obj) if self.named is not None else _call(obj["name"], obj["arguments"])]


def _call(name: str, args: Any) -> dict[str, Any]:
    return {"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": json.dumps(args, separators=(",", ":"))}}


_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[tuple[str, Any]]:
    """Tool calls a model wrote of its own accord, in the two formats chat templates ask for most: Hermes
    (Qwen, SmolLM3, Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number) and a
    whole message that is one JSON call (Llama 3: `{"name": ..., "parameters": {...}}`)."""
    blocks = _TOOL_CALL.findall(text)
    if not blocks:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        blocks = [body] if body.startswith("{") and body.endswith("}") else []
    out = []
    for b in blocks:
        try:
            obj = json.loads(b)
        except ValueError:
            continue
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(obj.get("name"), str) and isinstance(args, dict):
            out.append((obj["name"], args))
    return out


async def _start_all(s: Ready, prompts: list[tuple[int, ...]], adapter: str | None,
                     params: Callable[[int], SamplingParams], per_prompt: int, prefix: str,
                     voc: Vocabulary) -> list[Generation]:
    """`per_prompt` generations of each prompt, in order, submitted together (all or none): the choices of a
    prompt are admitted together and share its prefill."""
    return await s.generation.start_group([(ids, adapter, params(j), new_id(prefix)) for ids in prompts
                                           for j in range(per_prompt)], voc.key)


def _seed(body: _OpenAIBase, j: int) -> int | None:
    """The j-th sample of a prompt: the client's seed for the first, the next ones after it."""
    return None if body.seed is None else (body.seed + j) % 2**63


def _best(results: list[GenerationResult], n: int) -> list[GenerationResult]:
    """best_of: the n with the highest mean logprob per token, best first (OpenAI's rule)."""
    def score(r: GenerationResult) -> float:
        return sum(r.logprobs or ()) / max(1, len(r.token_ids))

    return sorted(results, key=score, reverse=True)[:n]


def _usage(prompt_tokens: int, results: list[GenerationResult], prompts: int = 1) -> dict[str, Any]:
    """Token counts; `prompt_tokens_details.cached_tokens`: the prompt tokens the prefix cache held, once per
    prompt (its choices are prefilled once: each reports the count of that one prefill)."""
    done = sum(len(r.token_ids) for r in results)
    per = max(1, len(results) // max(1, prompts))  # results per prompt (any order: they report one count)
    cached = sum(r.cached_tokens for r in results) // per
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


@router.get("/models")
async def models(s: ReadyDep) -> dict[str, Any]:
    now = int(time.time())
    return {"object": "list", "data": [_model(s, None, now)] + [_model(s, a["adapter_id"], now) for a in s.registry.infos()]}


@router.get("/models/{model_id:path}")
async def model(model_id: str, s: ReadyDep) -> dict[str, Any]:
    return _model(s, _adapter_for(s, model_id), int(time.time()))


def _model(s: Ready, adapter: str | None, now: int) -> dict[str, Any]:
    if adapter is None:
        return {"id": s.model_name, "object": "model", "created": now, "owned_by": "adapter-server", "root": s.model_name}
    return {"id": adapter, "object": "model", "created": now, "owned_by": "adapter-server", "root": s.model_name,
            "parent": s.model_name}


# -- logprobs, shaped -------------------------------------------------------------------------
class _Tokens:
    """Token strings for logprobs, each decoded after the few tokens before it (a lone token loses the space
    a word-start marker stands for), so a choice's token strings add up to its text."""

    CONTEXT = 6

    def __init__(self, voc: Vocabulary) -> None:
        self.tok = voc.tokenizer

    def piece(self, before: list[int], t: int) -> str:
        ctx = before[-self.CONTEXT :]
        return str(self.tok.decode([*ctx, t]))[len(str(self.tok.decode(ctx))) :] if ctx else str(self.tok.decode([t]))

    def pieces(self, ids: list[int], before: list[int]) -> list[str]:
        seq = list(before)
        out = []
        for t in ids:
            out.append(self.piece(seq, t))
            seq.append(t)
        return out

    @staticmethod
    def offsets(toks: list[str], start: int) -> list[int]:
        """Where each token string begins in a text that has `start` characters before the first."""
        return list(accumulate((len(t) for t in toks[:-1]), initial=start)) if toks else []

    def completion(self, ids: list[int], lps: list[float], tops: list[TopLogprobs] | None, k: int | None,
                   offset: int, before: list[int]) -> dict[str, Any]:
        """Completions `logprobs`: tokens, their logprobs, the top k alternatives (with the chosen token), the
        character offset of each token in the choice's text. `before`: the choice's earlier tokens."""
        toks = self.pieces(ids, before)
        top = None
        if k is not None:
            seq = [*before, *ids]
            at = len(before)
            top = [{**{self.piece(seq[: at + i], a): lp for a, lp in (tops[i] if tops else ())[:k]}, toks[i]: lps[i]}
                   for i in range(len(ids))]
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": top, "text_offset": self.offsets(toks, offset)}

    def echoed(self, prompt: list[int], scores: tuple[tuple[float, TopLogprobs], ...], k: int,
               gen: dict[str, Any]) -> dict[str, Any]:
        """Completions `logprobs` with `echo`: the prompt's tokens first (the first has no logprob), then the
        generated ones (`gen`, whose offsets already count the echoed text)."""
        toks = self.pieces(prompt, [])
        top: list[dict[str, float] | None] = [None]
        top += [{**{self.piece(prompt[: j + 1], a): lp for a, lp in alts[:k]}, toks[j + 1]: p}
                for j, (p, alts) in enumerate(scores)]
        return {"tokens": toks + gen["tokens"], "token_logprobs": [None, *(p for p, _ in scores)] + gen["token_logprobs"],
                "top_logprobs": top + (gen["top_logprobs"] or []), "text_offset": self.offsets(toks, 0) + gen["text_offset"]}

    def chat(self, ids: list[int], lps: list[float], tops: list[TopLogprobs] | None, before: list[int]) -> dict[str, Any]:
        seq = [*before, *ids]
        at = len(before)

        def entry(i: int, t: int, lp: float) -> dict[str, Any]:
            text = self.piece(seq[: at + i], t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**entry(i, t, lp), "top_logprobs": [entry(i, a, alp) for a, alp in (tops[i] if tops else ())]}
                            for i, (t, lp) in enumerate(zip(ids, lps, strict=True))]}


# -- streaming, several choices at once -------------------------------------------------------
async def _events(g: Generation) -> AsyncIterator[tuple[str, Any, list[TokenEvent]]]:
    """('delta', text, the tokens behind it), then ('done', result, tokens whose text never came)."""
    held: list[TokenEvent] = []
    async for ev in g.events():
        if isinstance(ev, GenerationResult):
            yield "done", ev, held
        else:
            held.append(ev)
            if ev.text:
                yield "delta", ev.text, held
                held = []


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, str, Any, list[TokenEvent]]]:
    """Every generation's events as they come, tagged with its choice index; stops at the first error
    (raised), cancelling the rest; leaving early cancels them all."""
    q: asyncio.Queue[tuple[int, str, Any, list[TokenEvent]]] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for kind, x, toks in _events(g):
                await q.put((i, kind, x, toks))
        except Exception as e:
            await q.put((i, "error", e, []))
        await q.put((i, "end", None, []))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    left = len(gens)
    try:
        while left:
            item = await q.get()
            if item[1] == "end":
                left -= 1
            elif item[1] == "error":
                raise item[2]
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            g.cancel()


def _error_chunk(e: Exception) -> dict[str, str]:
    return {"data": json.dumps(inband_error(e))}


# -- /v1/completions ---------------------------------------------------------------------------
@router.post("/completions")
async def completions(body: CompletionIn, request: Request, s: ReadyDep) -> Any:
    _check(body)
    n, best_of = body.n, body.best_of or body.n
    if best_of < n:
        raise InvalidRequestError(f"best_of ({best_of}) must be at least n ({n})")
    if body.stream and best_of > n:
        raise InvalidRequestError("best_of cannot be streamed: the best are known only at the end")
    if body.echo and body.logprobs is not None and body.stream:
        raise InvalidRequestError("echo with logprobs (the prompt's logprobs) is not streamed; send stream: false")
    adapter = _adapter_for(s, body.model)
    voc = await _vocabulary(s, body, adapter)
    prompts = body.prompts()
    vocab = voc.size
    for p in prompts:
        if not isinstance(p, str) and (bad := [t for t in p if not 0 <= t < vocab]):
            raise InvalidRequestError(f"prompt token {bad[0]} is not in the vocabulary (ids 0 to {vocab - 1})")
    ids = [await asyncio.to_thread(s.generation.encode, p, voc) if isinstance(p, str) else tuple(p) for p in prompts]
    k = body.logprobs

    def params(j: int) -> SamplingParams:
        p = _params(body, 16, _seed(body, j), k is not None or best_of > n, k or 0)
        return replace(p, prompt_logprobs=k) if body.echo and k is not None else p

    gens = await _start_all(s, ids, adapter, params, best_of, "cmpl", voc)
    rid, created = new_id("cmpl"), int(time.time())
    echo = [_prompt_text(voc, p) if body.echo else "" for p in prompts]
    if body.stream:
        return event_stream(_stream_completion(voc, gens, body, rid, created, echo, sum(map(len, ids)), len(ids)))
    results = await results_or_disconnect(request, gens)
    toks, choices = _Tokens(voc), list[dict[str, Any]]()
    for i in range(len(prompts)):
        group = results[i * best_of : (i + 1) * best_of]
        for r in _best(group, n) if best_of > n else group:
            lp = None
            if k is not None and r.logprobs is not None:
                lp = toks.completion(list(r.token_ids), list(r.logprobs), list(r.top_logprobs or ()), k, len(echo[i]),
                                     list(ids[i]) if body.echo else [])
                if body.echo:
                    lp = toks.echoed(list(ids[i]), r.prompt_logprobs or (), k, lp)
            choices.append({"index": len(choices), "text": echo[i] + r.text, "logprobs": lp,
                            "finish_reason": r.finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
            "usage": _usage(sum(map(len, ids)), results, len(ids))}


def _prompt_text(voc: Vocabulary, p: Prompt) -> str:
    return p if isinstance(p, str) else str(voc.tokenizer.decode(p))


async def _stream_completion(voc: Vocabulary, gens: list[Generation], body: CompletionIn, rid: str, created: int,
                             echo: list[str], prompt_tokens: int, prompts: int) -> AsyncIterator[dict[str, str]]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    toks, n = _Tokens(voc), body.n
    offsets = [len(echo[i // n]) for i in range(len(gens))]
    seen: list[list[int]] = [[] for _ in gens]
    results: list[GenerationResult] = []

    def chunk(i: int, text: str, finish: str | None, evs: list[TokenEvent]) -> dict[str, str]:
        lp = None
        if body.logprobs is not None and evs:
            ids = [e.token_id for e in evs]
            lp = toks.completion(ids, [e.logprob or 0.0 for e in evs], [e.top_logprobs or () for e in evs],
                                 body.logprobs, offsets[i], seen[i])
            seen[i] += ids
        offsets[i] += len(text)
        return {"data": json.dumps({**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})}

    try:
        for i in range(len(gens)):
            if echo[i // n]:
                yield {"data": json.dumps({**head, "choices": [{"index": i, "text": echo[i // n], "logprobs": None,
                                                                "finish_reason": None}]})}
        async for i, kind, x, evs in _merged(gens):
            if kind == "delta":
                yield chunk(i, x, None, evs)
            else:
                results.append(x)
                yield chunk(i, "", x.finish_reason, evs)
        if body.stream_options and body.stream_options.include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": _usage(prompt_tokens, results)})}
    except Exception as e:
        yield _error_chunk(e)
    yield {"data": "[DONE]"}


# -- /v1/chat/completions ----------------------------------------------------------------------
@router.post("/chat/completions")
async def chat(body: ChatIn, request: Request, s: ReadyDep) -> Any:
    _check(body)
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true")
    adapter = _adapter_for(s, body.model)
    voc = await _vocabulary(s, body, adapter)
    tools = _ToolPlan(body, voc.chat_template)
    if (tools.spec is not None or tools.auto) and body.stream:
        raise InvalidRequestError("streamed tool calls are not supported yet; send stream: false")
    ids = await asyncio.to_thread(s.generation.encode_chat, [m.plain() for m in body.messages], body.tools, voc)

    def params(j: int) -> SamplingParams:
        return _params(body, None, _seed(body, j), body.logprobs, body.top_logprobs or 0, tools.spec)

    gens = await _start_all(s, [ids], adapter, params, body.n, "chatcmpl", voc)
    rid, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        return event_stream(_stream_chat(voc, gens, body, rid, created, len(ids)))
    results = await results_or_disconnect(request, gens)
    toks = _Tokens(voc)
    choices = []
    for i, r in enumerate(results):
        lp = None
        if body.logprobs and r.logprobs is not None:
            lp = toks.chat(list(r.token_ids), list(r.logprobs), list(r.top_logprobs) if r.top_logprobs else None, [])
        calls = tools.calls(r.text) if tools.spec is not None or tools.auto else None
        message = {"role": "assistant", "content": r.text} if calls is None else \
            {"role": "assistant", "content": None, "tool_calls": calls}
        choices.append({"index": i, "message": message, "logprobs": lp,
                        "finish_reason": "tool_calls" if calls else r.finish_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
            "usage": _usage(len(ids), results)}


async def _stream_chat(voc: Vocabulary, gens: list[Generation], body: ChatIn, rid: str, created: int,
                       prompt_tokens: int) -> AsyncIterator[dict[str, str]]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    toks = _Tokens(voc)
    seen: list[list[int]] = [[] for _ in gens]
    results: list[GenerationResult] = []

    def chunk(i: int, delta: dict[str, Any], finish: str | None, evs: list[TokenEvent]) -> dict[str, str]:
        lp = None
        if body.logprobs and evs:
            ids = [e.token_id for e in evs]
            lp = toks.chat(ids, [e.logprob or 0.0 for e in evs],
                           [e.top_logprobs or () for e in evs] if body.top_logprobs else None, seen[i])
            seen[i] += ids
        return {"data": json.dumps({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                                         "finish_reason": finish}]})}

    for i in range(len(gens)):
        yield chunk(i, {"role": "assistant", "content": ""}, None, [])
    try:
        async for i, kind, x, evs in _merged(gens):
            if kind == "delta":
                yield chunk(i, {"content": x}, None, evs)
            else:
                results.append(x)
                yield chunk(i, {}, x.finish_reason, evs)
        if body.stream_options and body.stream_options.include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": _usage(prompt_tokens, results)})}
    except Exception as e:
        yield _error_chunk(e)
    yield {"data": "[DONE]"}
