"""The composition root: settings in, model loaded, registry scanned, engine started, routers mounted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .api import errors as api_errors
from .api.deps import Services
from .api.limits import BodySizeLimit
from .api.openai import router as openai_router
from .api.routes import router
from .api.vllm import router as vllm_router
from .config import Settings
from .metrics import Metrics
from .threads import in_own_thread

PLAYGROUND = Path(__file__).parent / "static" / "playground"

log = logging.getLogger(__name__)
JSON_BODY_LIMIT = 4 * 1024 * 1024


def build(services: Services) -> None:
    """Load everything heavy (runs in a worker thread); sets the services' fields when done."""
    from .adapters.registry import Events, Registry
    from .adapters.spec import BaseModelInfo
    from .adapters.store import AdapterStore
    from .engine.engine import Engine
    from .engine.model_loader import load_base_model
    from .engine.service import GenerationService

    st, m = services.settings, services.metrics
    loaded = load_base_model(st.model_cfg())
    events = Events.for_metrics(m)
    registry = Registry(AdapterStore(st.store), BaseModelInfo.from_model(loaded.model, loaded.tokenizer),
                        st.registry_cfg(), events)
    registry.scan()
    for adapter_id, why in registry.skipped.items():
        log.error("adapter %s in the store is corrupt and was skipped: %s", adapter_id, why)
    engine = Engine(loaded, registry, st.engine_cfg(), m)
    engine.start()
    services.registry, services.model_name = registry, loaded.name
    services.generation = GenerationService(engine, loaded.name)
    services.engine = engine
    log.info("ready: %s on %s (%s), %d adapters in the store", loaded.name, loaded.device, loaded.dtype,
             len(registry.infos()))


def create_app(settings: Settings | None = None, services: Services | None = None,
               on_load_failed: Callable[[str], None] | None = None) -> FastAPI:
    """The app. If loading fails, /health answers 503 saying why, and `on_load_failed` hears why (`run`
    ends the process then: a supervisor must not read "loading failed" as "still starting")."""
    settings = settings or Settings()
    services = services or Services(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await in_own_thread(build, services)
            except Exception as e:  # /health stays 503 and says why
                log.exception("loading failed")
                services.load_error = f"loading failed: {e}"
                if on_load_failed is not None:
                    on_load_failed(services.load_error)

        task = None if services.engine is not None else asyncio.create_task(load())
        yield
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=120)
        if services.engine is not None:
            await asyncio.to_thread(services.engine.stop)

    app = FastAPI(title="adapter-server", version="1", lifespan=lifespan,
                  description="One frozen base model; (IA)3, bottleneck, LoRA, DoRA, prompt, P- and prefix tuning adapters, "
                  "with their own embeddings, LM heads and tokenizers, mixed per row in shared batches.")
    app.state.services = services
    api_errors.install(app)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(vllm_router)
    # the playground page: static files shipped in the package, no build step, nothing from a CDN
    app.mount("/playground", StaticFiles(directory=PLAYGROUND, html=True), name="playground")
    upload_limit = settings.max_upload_bytes

    def limit_for(scope: MutableMapping[str, Any]) -> int:
        return upload_limit if scope.get("path") == "/adapters" else JSON_BODY_LIMIT

    app.add_middleware(BodySizeLimit, limit_for=limit_for)
    return app


def run(settings: Settings) -> None:
    """Serve until stopped; a model that cannot be loaded ends the process with exit status 1 and says why."""
    import uvicorn

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop(why: str) -> None:
        failed.append(why)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failed=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           timeout_graceful_shutdown=10))
    server.run()
    if failed:
        raise SystemExit(f"adapter-server: {failed[0]}")
