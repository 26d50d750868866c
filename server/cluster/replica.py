"""One engine replica: the whole single-node app (model, engine, registry over the shared store), run
in process for every request the ingress hands it, each response naming the replica.

It reports what the router needs every stats period: the adapters resident on its device (from the
engine's own slot table: the one authority on residency) and how loaded it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ..config import Settings
from ..main import create_app
from .asgi import call
from .metrics import PUSH_PERIOD_S, hub

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0


class EngineReplica:
    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.settings = Settings(**settings)
        self.app = create_app(self.settings)
        self.services = self.app.state.services
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model in a worker thread, starts the engine
        t0 = time.monotonic()
        while not self.services.ready:
            if self.services.load_error or time.monotonic() - t0 > READY_TIMEOUT_S:
                raise RuntimeError(self.services.load_error or "the model did not load in time")
            await asyncio.sleep(0.1)
        self._hub = hub()
        self._pusher = asyncio.create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        """This replica's metrics to the cluster's hub, every period, for the ingress to merge."""
        while True:
            try:
                await self._hub.put.remote(self.replica_id, self.services.metrics.render().decode())
            except Exception as e:  # the hub restarting: try again next period
                log.warning("metrics push failed: %s", e)
            await asyncio.sleep(PUSH_PERIOD_S)

    async def handle(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                     body: bytes) -> AsyncIterator[dict[str, Any] | bytes]:
        """One HTTP request through this replica's app: the status and headers, then the body's chunks."""
        async for item in call(self.app, method, path, query, headers, body, [("x-replica-id", self.replica_id)]):
            yield item

    def record_routing_stats(self) -> dict[str, Any]:
        engine, registry = self.services.engine, self.services.registry
        if engine is None or registry is None:
            return {"resident": [], "load": 0, "capacity": 1}
        running, waiting = engine.load()
        return {"resident": registry.resident_ids(), "load": running + waiting, "capacity": engine.max_rows}

    async def __del__(self) -> None:
        self._pusher.cancel()
        await self._lifespan.__aexit__(None, None, None)
