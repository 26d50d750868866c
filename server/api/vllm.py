"""vLLM's model-server protocol, which Kubernetes gateways route by (the Gateway API Inference Extension
endpoint picker, the production-stack router, AIBrix): runtime load and unload of adapters from a
server-side folder. `GET /v1/models` (with `parent`) is in openai.py; the `vllm:` metrics in metrics.py.

Off unless the operator names `--adapter-load-root`: a path outside it is refused (403), symlinks
resolved first, and a folder holding a symlink is refused whole. A relative `lora_path` is taken under
the root. A loaded adapter is stored like an upload (any family we serve, validated once, in the store
across restarts) and remembered as loaded; unloading removes it. Unload removes only what load added:
an adapter uploaded through `/adapters` is the user's, and stays (409).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from ..errors import AdapterNotFoundError, ConflictError, ForbiddenError, NotEnabledError
from ..threads import in_own_thread
from .deps import AdminAuth, ReadyDep

router = APIRouter(prefix="/v1", dependencies=[AdminAuth])


class LoadIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients may send fields we have no use for
    lora_name: str
    lora_path: str


class UnloadIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


OFF = "runtime adapter loading is off: start the server with --adapter-load-root DIR"
LOADED_FROM = "load_lora_adapter"  # the manifest's origin of an adapter this protocol added


def _folder(root: Path | None, path: str) -> Path:
    if root is None:
        raise NotEnabledError(OFF)
    base = root.resolve()
    p = (base / path).resolve()  # an absolute path stays itself
    if not p.is_relative_to(base):
        raise ForbiddenError(f"lora_path must lie under the adapter load root {str(base)!r}")
    if not p.is_dir():
        raise NotEnabledError(f"lora_path {path!r} is not a folder under the adapter load root")
    if any(f.is_symlink() for f in p.iterdir()):  # a file could lead anywhere: refuse rather than follow
        raise ForbiddenError(f"lora_path {path!r} holds a symbolic link; copy the files in instead")
    return p


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadIn, s: ReadyDep) -> str:
    folder = _folder(s.settings.adapter_load_root, body.lora_path)
    await in_own_thread(s.registry.add_folder, body.lora_name, folder, False, LOADED_FROM)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadIn, s: ReadyDep) -> str:
    if s.settings.adapter_load_root is None:
        raise NotEnabledError(OFF)
    rec = s.registry.record(body.lora_name)
    if rec is None:
        raise AdapterNotFoundError(body.lora_name)
    if rec.manifest.origin != LOADED_FROM:
        raise ConflictError(f"adapter {body.lora_name!r} was uploaded, not loaded by load_lora_adapter: "
                            "remove it with DELETE /adapters/{id}")
    await asyncio.to_thread(s.registry.delete, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
