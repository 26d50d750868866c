"""`adapter-server cluster` on Ray Serve: two replicas of the tiny model behind the ingress.

Ray opens listening sockets on every interface, so the whole cluster runs in a child process inside a
network namespace of its own that holds only loopback (`unshare --net`, then `lo` up); the test skips,
saying why, where Ray is not installed or the namespace cannot be made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.netns import ROOT, run_driver


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install adapter-server[cluster])")
    ray_cli = Path(sys.executable).with_name("ray")  # stops whatever a failed run left behind
    return run_driver("driver.py", after=f"{ray_cli} stop --force >/dev/null 2>&1")


def test_the_cluster_serves_the_contract_like_one_server(results):
    assert results["health"] == {"status": "ok"} and results["upload"] == [201, 201]
    assert results["same_tokens"]  # native /generate, with and without the adapter, token for token
    assert results["openai"] == [200, True, True]  # OpenAI route: same text, routed to the adapter's replica
    status, events, last = results["sse"]
    assert status == 200 and events == 10 and last == "data: [DONE]"  # 8 tokens, the result, [DONE]


def test_adapter_requests_stick_to_a_replica_and_base_requests_spread(results):
    lo, base = results["replicas"]["lo"], results["replicas"]["base"]
    assert len(lo) == 1 and sum(lo.values()) == 6  # every request for the adapter on the replica that holds it
    assert len(base) == 2  # the base model is not pinned


def test_a_replace_through_the_ingress_is_seen_by_every_replica(results):
    assert results["replace"] == [201, 201]
    r = results["after_replace"]
    assert r["ok"] and r["replicas"] == 2  # the burst reached both replicas
    assert r["old_differs"] and r["new_version"]  # and every answer is the new version's


def test_a_delete_through_the_ingress_is_seen_by_every_replica(results):
    assert results["delete"] == 204 and results["after_delete"] == [404] * 4
    assert results["models"] == ["tiny_llama"]


def test_the_single_node_server_never_imports_ray():
    code = ("import sys, server.main, server.cli, server.engine.engine; server.main.create_app; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_ingress_reads_only_which_adapter_a_request_names():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from server.cluster.ingress import adapter_of

    assert adapter_of("/generate", b'{"prompt": "x", "adapter_id": "a"}') == "a"
    assert adapter_of("/v1/chat/completions", b'{"model": "b", "messages": []}') == "b"
    assert adapter_of("/generate", b'{"prompt": "x"}') == "" == adapter_of("/generate", b"not json")
    assert adapter_of("/adapters", b'{"adapter_id": "a"}') == "" == adapter_of("/generate", b'["a"]')


def test_a_killed_replica_is_replaced_and_nothing_stored_is_lost(results):
    r = results["after_kill"]
    last, *codes = r["codes"]
    assert set(codes) <= {200, 503} and last == 200
    assert r["replaced"] and r["kept"] == ["kept"]


def test_the_ingress_metrics_are_the_clusters(results):
    m = results["metrics"]
    assert m["cluster_ok"] >= 15 and m["cluster_ok"] == m["replicas_ok"]  # 15 generations so far, summed
    assert m["replica_labels"] == 2 and m["vllm"]


def test_metrics_merge_sums_families_and_keeps_each_replica():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from prometheus_client.parser import text_string_to_metric_families

    from server.cluster.metrics import merge
    from server.metrics import Metrics

    a, b = Metrics(), Metrics()
    a.requests.labels("lora", "ok").inc(3)
    b.requests.labels("lora", "ok").inc(2)
    a.duration.labels("lora").observe(0.3)
    b.duration.labels("lora").observe(3.0)
    a.vllm_kv_usage.set(0.5)
    b.vllm_kv_usage.set(0.1)
    a.set_lora_info(4, ["x"], [])
    b.set_lora_info(4, [], ["y"])
    fams = {f.name: f for f in text_string_to_metric_families(merge({"r1": a.render().decode(), "r2": b.render().decode()}))}
    assert set(fams) == {f.name for f in text_string_to_metric_families(a.render().decode()) if not f.name.endswith("_created")}

    def values(family, suffix="", **labels):
        return {s.labels.get("replica"): s.value for s in fams[family].samples
                if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())}

    assert values("adapter_server_requests", adapter_type="lora", status="ok") == {None: 5.0, "r1": 3.0, "r2": 2.0}
    assert values("adapter_server_request_duration_seconds", "_count", adapter_type="lora")[None] == 2.0  # summed
    assert values("vllm:kv_cache_usage_perc")[None] == pytest.approx(0.3)  # a fraction: averaged
    assert None not in values("vllm:lora_requests_info")  # per replica only


def test_a_saturated_replica_spills_a_hot_adapter_to_another(results):
    s = results["spill"]
    assert s["ok"] and s["replicas"] == 2 and 1 <= s["spilled"] < 16  # the warm replica kept some


def test_consecutive_requests_for_an_adapter_of_any_family_stay_on_its_replica(results):
    got = results["affinity"]
    assert set(got) >= {"ia3", "seq_bn", "double_seq_bn", "lora", "dora", "prompt", "prefix", "compacter"}
    spread = {name: ids for name, ids in got.items() if name != "bare" and len(set(ids)) != 1}
    assert not spread, spread  # one replica per adapter (a status code in place of an id: a failed request)
    assert len(set(got["bare"])) == 2  # the bare model is not pinned
