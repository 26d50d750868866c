"""vLLM's model-server protocol, which Kubernetes gateways route by (the Gateway API Inference Extension
endpoint picker, the production-stack router, AIBrix): runtime load and unload of adapters from a
server-side folder. `GET /v1/models` (with `parent`) is in openai.py; the `vllm:` metrics in metrics.py.

Off unless the operator names `--adapter-load-root`: a path outside it is refused (403), symlinks
resolved first. A loaded adapter is stored like an upload (any family we serve, validated once, in the
store across restarts); unloading it deletes it, as `DELETE /adapters/{id}` does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from ..errors import ForbiddenError, NotEnabledError
from .deps import AdminAuth, ReadyDep

router = APIRouter(prefix="/v1", dependencies=[AdminAuth])


class LoadIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients may send fields we have no use for
    lora_name: str
    lora_path: str


class UnloadIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


def _folder(root: Path | None, path: str) -> Path:
    if root is None:
        raise NotEnabledError("runtime adapter loading is off: start the server with --adapter-load-root DIR")
    base, p = root.resolve(), Path(path).resolve()
    if not p.is_relative_to(base):
        raise ForbiddenError(f"lora_path must lie under the adapter load root {str(base)!r}")
    if not p.is_dir():
        raise NotEnabledError(f"lora_path {path!r} is not a folder under the adapter load root")
    return p


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadIn, s: ReadyDep) -> str:
    folder = _folder(s.settings.adapter_load_root, body.lora_path)
    await asyncio.to_thread(s.registry.add_folder, body.lora_name, folder)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadIn, s: ReadyDep) -> str:
    if s.settings.adapter_load_root is None:
        raise NotEnabledError("runtime adapter loading is off: start the server with --adapter-load-root DIR")
    await asyncio.to_thread(s.registry.delete, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
