"""Adapter affinity with spill-over, as a Ray Serve request router.

A request for an adapter goes first to the replicas whose engines report it resident on the device
and that are not saturated (requests running and queued below what the replica batches at once); then,
spilling, to the least loaded others, which load it. A request for the base model (no multiplexed id)
goes to any replica, least loaded first: never pinned. Residency comes only from the engines' own
reports (`EngineReplica.record_routing_stats`), at most one stats period old, so an adapter the
engine evicted stops attracting requests at the next report. Load is the larger of the engine's report
and Ray Serve's own count of this router's requests in flight on the replica (updated at every send and
completion): a burst of short requests saturates a replica between two reports.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _stats(r: RunningReplica) -> dict[str, Any]:
    return r.routing_stats or {}




class AffinityRouter(RequestRouter):
    """Returns one rank per replica, in order of preference: Ray Serve tries them in turn and passes
    over one whose queue is full. Among equally loaded replicas the choice rotates."""

    _turns: dict[str, int] | None = None

    def _load(self, r: RunningReplica) -> float:
        s = _stats(r)
        in_flight = self.replica_queue_len_cache.get(r.replica_id) or 0
        return max(s.get("load", 0), in_flight) / max(1, s.get("capacity", 1))

    def _by_load(self, replicas: list[RunningReplica], key: str) -> list[RunningReplica]:
        turns = self._turns = self._turns if self._turns is not None else {}
        turns[key] = turns.get(key, -1) + 1  # per adapter: interleaved traffic does not lock the rotation
        if len(turns) > 4096:
            turns.clear()
        k = turns[key] % max(1, len(replicas))
        rotated = replicas[k:] + replicas[:k]  # ties: a different one first each time
        return sorted(rotated, key=self._load)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        ordered = self._by_load(sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id), adapter)
        if adapter:
            warm = [r for r in ordered if adapter in _stats(r).get("resident", ()) and self._load(r) < 1.0]
            ordered = warm + [r for r in ordered if r not in warm]
        return [[r] for r in ordered]
