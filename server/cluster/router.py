"""Adapter affinity with spill-over, as a Ray Serve request router.

A request for an adapter goes first to the replica this router last sent that adapter to, then to the
other replicas that hold it, least loaded first, each only while it is not saturated (requests running
and queued below what the replica batches at once); then, spilling, to the least loaded others, which
load it. A request for the base model (no multiplexed id) goes to any replica, least loaded first: never
pinned. Load is the larger of the engine's report and Ray Serve's own count of this router's requests
in flight on the replica (updated at every send and completion): a burst of short requests saturates a
replica between two reports.

Residency comes from the engines' own reports (`EngineReplica.record_routing_stats`), so an adapter the
engine evicted stops attracting requests; and, for `SENT_TRUSTED_S` after this router sent a replica a
request for an adapter, from that send. The replica loads the adapter when the request arrives, but its
report shows it only a stats period and the controller's broadcast later: without the send, the next
request in that window went by load to another replica, which loaded it too, and once both reported it
the tie between them rotated, so consecutive requests alternated between the replicas for good.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

STATS_PERIOD_S = 0.2  # how often Ray Serve asks each replica for its report (app.py configures it)
SENT_TRUSTED_S = 10 * STATS_PERIOD_S  # a send stands for residency until a report has surely caught up
MAX_KEYS = 4096  # adapters remembered per table; past it the table starts afresh


def _stats(r: RunningReplica) -> dict[str, Any]:
    return r.routing_stats or {}


class AffinityRouter(RequestRouter):
    """Returns one rank per replica, in order of preference: Ray Serve tries them in turn and passes
    over one whose queue is full. Among equally loaded replicas that do not hold the adapter, the choice
    rotates."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Ray Serve calls it once, right after construction."""
        self._turns: dict[str, int] = {}  # per adapter: interleaved traffic does not lock the rotation
        self._home: dict[str, tuple[str, float]] = {}  # adapter -> (replica last sent it, monotonic time)

    def _load(self, r: RunningReplica) -> float:
        s = _stats(r)
        in_flight = self.replica_queue_len_cache.get(r.replica_id) or 0
        return max(s.get("load", 0), in_flight) / max(1, s.get("capacity", 1))

    def _by_load(self, replicas: list[RunningReplica], key: str) -> list[RunningReplica]:
        if len(self._turns) > MAX_KEYS:
            self._turns.clear()
        self._turns[key] = self._turns.get(key, -1) + 1
        k = self._turns[key] % max(1, len(replicas))
        rotated = replicas[k:] + replicas[:k]  # ties: a different one first each time
        return sorted(rotated, key=self._load)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        ordered = self._by_load(sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id), adapter)
        if adapter:
            home, sent = self._home.get(adapter, ("", -math.inf))
            sent_holds = time.monotonic() - sent < SENT_TRUSTED_S  # past it, the reports alone say who holds it

            def warm(r: RunningReplica) -> bool:
                holds = adapter in _stats(r).get("resident", ()) or (sent_holds and r.replica_id.unique_id == home)
                return holds and self._load(r) < 1.0

            first = [r for r in ordered if warm(r)]
            first.sort(key=lambda r: r.replica_id.unique_id != home)  # stable: home first, the rest by load
            ordered = first + [r for r in ordered if r not in first]
        return [[r] for r in ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Ray Serve calls it when a replica accepted a request: that replica is its adapter's home now."""
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            if len(self._home) > MAX_KEYS:
                self._home.clear()
            self._home[adapter] = (replica_id.unique_id, time.monotonic())
