"""Native routes: /generate, /adapters, /health, /metrics (docs/api.md §4, §5, §8). Handlers validate, delegate, shape."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile

from ..adapters.store import safe_filename
from ..engine.service import Generation
from ..engine.types import GenerationResult, SamplingParams
from ..errors import (
    AdapterExistsError,
    InvalidAdapterError,
    InvalidRequestError,
    UnsupportedAdapterError,
)
from ..threads import in_own_thread
from .deps import AdminAuth, Ready, ReadyDep, ServicesDep, UserAuth
from .disconnect import until_disconnected
from .errors import inband_error
from .schemas import AdapterInfo, AdapterList, GenerateIn, GenerateOut, Health
from .shape import result_json
from .sse import event_stream

log = logging.getLogger(__name__)
router = APIRouter()


def params_of(body: GenerateIn) -> SamplingParams:
    """The engine checks lengths: an explicit max_new_tokens over the limit is refused, the default capped."""
    asked = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else None
    return SamplingParams(
        max_new_tokens=asked, default_new_tokens=GenerateIn.model_fields["max_new_tokens"].default,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=tuple(body.stop),
        ignore_eos=body.ignore_eos, logprobs=body.logprobs, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, grammar=_grammar(body))


def _grammar(body: GenerateIn) -> tuple[str, str] | None:
    try:
        return body.grammar()
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


@router.post("/generate", response_model=GenerateOut, dependencies=[UserAuth],
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate(body: GenerateIn, request: Request, s: ReadyDep) -> Any:
    """Generate from the base model or one adapter; `stream: true` for server-sent events."""
    voc = await asyncio.to_thread(s.generation.vocabulary, body.adapter_id)  # the adapter's own tokenizer, or the base's
    ids = await asyncio.to_thread(s.generation.encode, body.prompt, voc)
    g: Generation = await s.generation.start(ids, body.adapter_id, params_of(body), vocabulary=voc.key)
    if body.stream:
        return event_stream(_sse(g))
    return await until_disconnected(request, g)


async def _sse(g: Generation):  # noqa: ANN202
    try:
        async for ev in g.events():
            if isinstance(ev, GenerationResult):
                yield {"data": json.dumps(result_json(ev))}
            else:
                yield {"data": json.dumps({"token_id": ev.token_id, "text": ev.text, "logprob": ev.logprob})}
    except Exception as e:  # headers are gone: report in-band, then end the stream
        yield {"data": json.dumps(inband_error(e))}
    yield {"data": "[DONE]"}


# -- adapters ---------------------------------------------------------------------------------
@router.post("/adapters", status_code=201, response_model=AdapterInfo, response_model_exclude_none=True,
             dependencies=[AdminAuth])
async def upload_adapter(request: Request, s: ReadyDep, replace: bool = False) -> dict[str, Any]:
    """Multipart upload: `adapter_id` and one or more `files` (a saved adapter folder's files)."""
    form = await request.form(max_files=64, max_fields=16)
    try:
        adapter_id = form.get("adapter_id")
        if not isinstance(adapter_id, str):
            raise InvalidRequestError("the form needs a text field 'adapter_id'")
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            raise InvalidRequestError("the form needs one or more 'files' parts")
        return await in_own_thread(_stage_and_add, s, adapter_id, uploads, replace)
    finally:
        await form.close()


@router.post("/adapters/demo", status_code=201, response_model=AdapterList, response_model_exclude_none=True,
             dependencies=[AdminAuth])
async def add_demo_adapters(s: ReadyDep) -> dict[str, Any]:
    """Untrained demo adapters for the served model ((IA)3, LoRA, a bottleneck: `adapter-server
    demo-adapters` writes the same), registered as demo-ia3, demo-lora, demo-seq-bn where those ids are
    free. The playground's "add demo adapters" button; they change outputs, they teach nothing."""
    return {"adapters": await in_own_thread(_add_demo, s)}


def _add_demo(s: Ready) -> list[dict[str, Any]]:
    from ..adapters.methods import DEMO, write_demo  # torch: the upload path, never at import

    out = []
    taken = {a["adapter_id"] for a in s.registry.infos()}
    for adapter_id, (kind, seed) in DEMO.items():
        if adapter_id in taken:
            continue
        staging = s.registry.store.staging_dir()
        try:
            write_demo(kind, staging, s.model_config, seed=seed)
            out.append(s.registry.add(adapter_id, staging, False))
        except AdapterExistsError:
            continue  # taken meanwhile (a second click): left as it is
        except (InvalidAdapterError, UnsupportedAdapterError) as e:
            # the synthetic layouts are Llama's module names: a base whose layers differ (fused projections,
            # routed MLPs, a multimodal folder) or a family it does not serve gets the demos that fit
            log.info("demo adapter %s skipped on this base: %s", adapter_id, e)
            continue
        finally:
            s.registry.store.discard(staging)
    return out


def _stage_and_add(s: Ready, adapter_id: str, uploads: list[UploadFile], replace: bool) -> dict[str, Any]:
    registry = s.registry
    staging = registry.store.staging_dir()
    try:
        seen: set[str] = set()
        for up in uploads:
            name = safe_filename(up.filename or "")
            if name is None:
                continue  # hidden files and path tricks are dropped, never written
            if name in seen:
                raise InvalidAdapterError(f"file {name!r} was sent twice", key=name)
            seen.add(name)
            up.file.seek(0)
            with open(staging / name, "wb") as out:
                shutil.copyfileobj(up.file, out, 1 << 20)
        return registry.add(adapter_id, staging, replace)  # validates before anything is registered
    finally:
        registry.store.discard(staging)


@router.get("/adapters", response_model=AdapterList, response_model_exclude_none=True, dependencies=[UserAuth])
async def list_adapters(s: ReadyDep) -> dict[str, Any]:
    return {"adapters": s.registry.infos()}


@router.get("/adapters/{adapter_id}", response_model=AdapterInfo, response_model_exclude_none=True,
            dependencies=[UserAuth])
async def get_adapter(adapter_id: str, s: ReadyDep) -> dict[str, Any]:
    return s.registry.info(adapter_id)


@router.delete("/adapters/{adapter_id}", status_code=204, dependencies=[AdminAuth])
async def delete_adapter(adapter_id: str, s: ReadyDep) -> Response:
    await asyncio.to_thread(s.registry.delete, adapter_id)
    return Response(status_code=204)


# -- operations -------------------------------------------------------------------------------
@router.get("/health", response_model=Health, responses={503: {"description": "not ready"}})
async def health(s: ReadyDep) -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(s: ServicesDep) -> Response:
    return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)
