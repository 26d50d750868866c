"""The affinity router's choices, offline: fake replicas with the reports the engines would give, no
cluster. The end-to-end check over a real cluster is test_cluster.py's."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install adapter-server[cluster])")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID  # noqa: E402

from server.cluster import router as router_module  # noqa: E402
from server.cluster.router import SENT_TRUSTED_S, AffinityRouter  # noqa: E402

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="adapter-server")


def replica(name: str, resident: tuple[str, ...] = (), load: int = 0) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT),
                           routing_stats={"resident": list(resident), "load": load, "capacity": 4})


def make_router() -> AffinityRouter:
    r = AffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    r.initialize_state()
    return r


def send(router: AffinityRouter, replicas: list[SimpleNamespace], adapter: str) -> str:
    """Route one request as Ray Serve does: rank, send to the first, tell the router where it went."""
    pending = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=adapter))
    ranks = asyncio.run(router.choose_replicas(replicas, pending))  # type: ignore[arg-type]
    chosen = ranks[0][0]
    router.on_request_routed(pending, chosen.replica_id, None)  # type: ignore[arg-type]
    return chosen.replica_id.unique_id


def test_a_request_right_after_a_load_goes_where_the_adapter_was_sent_before_any_report_shows_it():
    router, a, b = make_router(), replica("a"), replica("b")
    first = send(router, [a, b], "bn")
    assert [send(router, [a, b], "bn") for _ in range(5)] == [first] * 5  # no report lists it yet


def test_an_adapter_both_replicas_hold_stays_on_the_one_it_was_last_sent_to():
    router, a, b = make_router(), replica("a", ("bn",)), replica("b", ("bn",))
    first = send(router, [a, b], "bn")
    assert [send(router, [a, b], "bn") for _ in range(5)] == [first] * 5  # ties no longer rotate


def test_a_saturated_home_spills_to_another_that_holds_it_then_to_one_that_loads_it():
    router = make_router()
    a, b, c = replica("a", ("bn",)), replica("b", ("bn",), load=2), replica("c")
    assert send(router, [a, b, c], "bn") == "a"
    a.routing_stats["load"] = 4  # saturated: the warm one next, then the cold
    assert send(router, [a, b, c], "bn") == "b"
    b.routing_stats["load"] = 4
    assert send(router, [a, b, c], "bn") == "c"


def test_a_send_stops_standing_for_residency_once_the_reports_have_caught_up(monkeypatch):
    router, a, b = make_router(), replica("a"), replica("b")
    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    home = send(router, [a, b], "bn")
    now[0] += SENT_TRUSTED_S  # the home's reports never listed it (evicted): it no longer attracts the adapter
    other = next(r for r in (a, b) if r.replica_id.unique_id != home)
    other.routing_stats["resident"] = ["bn"]
    assert send(router, [a, b], "bn") == other.replica_id.unique_id


def test_base_model_requests_are_never_pinned():
    router, a, b = make_router(), replica("a", ("bn",)), replica("b")
    assert {send(router, [a, b], "") for _ in range(4)} == {"a", "b"}
