"""Adapter affinity with spill-over, as a Ray Serve request router.

A request for an adapter goes first to the replicas whose engines report it resident on the device
and that are not saturated (rows running and queued below what the replica batches at once); then,
spilling, to the least loaded others, which load it. A request for the base model (no multiplexed id)
goes to any replica, least loaded first: never pinned. Residency comes only from the engines' own
reports (`EngineReplica.record_routing_stats`), at most one stats period old, so an adapter the
engine evicted stops attracting requests at the next report.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _stats(r: RunningReplica) -> dict:
    return r.routing_stats or {}


def _load(r: RunningReplica) -> float:
    s = _stats(r)
    return s.get("load", 0) / max(1, s.get("capacity", 1))


class AffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))  # equal loads: any of them
        by_load = sorted(shuffled, key=_load)
        if not adapter:
            return [by_load]
        warm = [r for r in by_load if adapter in _stats(r).get("resident", ()) and _load(r) < 1.0]
        return [warm, [r for r in by_load if r not in warm]] if warm else [by_load]
