"""`adapter-server cluster` on Ray Serve: two replicas of the tiny model behind the ingress.

Ray opens listening sockets on every interface, so the whole cluster runs in a child process inside a
network namespace of its own that holds only loopback (`unshare --net`, then `lo` up); the test skips,
saying why, where Ray is not installed or the namespace cannot be made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def netns_available() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    r = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot make a network namespace: {r.stderr.strip()}"


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install adapter-server[cluster])")
    if (why := netns_available()) is not None:
        pytest.skip(why)
    ray_cli = Path(sys.executable).with_name("ray")  # stops whatever a failed run left behind
    cmd = (f"ip link set lo up && {sys.executable} {ROOT / 'tests' / 'cluster' / 'driver.py'}; rc=$?; "
           f"{ray_cli} stop --force >/dev/null 2>&1; exit $rc")
    p = subprocess.run(["unshare", "--net", "sh", "-c", cmd], capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


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
