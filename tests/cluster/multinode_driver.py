"""Run inside a network namespace holding only loopback (see test_multinode.py): a Ray cluster of two
nodes on this machine (one CPU each), `adapter-server cluster --address` joining it with autoscaling
between one and two replicas; sustained load scales it up onto the second node, quiet scales it
back down. One JSON line of results on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.helpers import TINY, fixture_dir, free_port, upload_files  # noqa: E402

REPLICA = "ServeReplica:adapter-server:EngineReplica"


def replicas_by_node() -> dict[str, int]:
    """Live engine replicas per Ray node id, from the cluster's actor table."""
    from ray._private.state import actors

    out: dict[str, int] = {}
    for a in actors().values():
        if a.get("ActorClassName") == REPLICA and a.get("State") == "ALIVE":
            node = a["Address"]["NodeID"]
            out[node] = out.get(node, 0) + 1
    return out


def wait_for(cond, timeout: float, period: float = 0.5) -> bool:  # noqa: ANN001
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(period)
    return False


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    port = free_port()
    exe = Path(sys.executable).with_name("adapter-server")
    cmd = [str(exe), "cluster", "--address", cluster.address, "--model", str(TINY), "--store", str(tmp / "store"),
           "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", "2",
           "--max-new-tokens-limit", "256", "--min-replicas", "1", "--max-replicas", "2", "--cpus-per-replica", "0.8",
           "--upscale-delay-s", "1", "--downscale-delay-s", "3", "--proxy-location", "HeadOnly"]
    log = open(tmp / "cluster.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    out: dict = {}
    url = f"http://127.0.0.1:{port}"
    try:
        ray.init(address=cluster.address, log_to_driver=False)

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        out["up"] = wait_for(healthy, 180)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        out["at_start"] = sorted(replicas_by_node().values())
        body = {"prompt": "the quick brown fox", "max_new_tokens": 8, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=120) as c:
            out["upload"] = c.post("/adapters", data={"adapter_id": "lo"}, files=upload_files(fixture_dir("lora_qv"))).status_code
            # sustained load: 8 clients sending long requests back to back against a target of 2 in flight
            # per replica, until a second replica is up (or 120 s); every request must succeed
            long = {**body, "adapter_id": "lo", "max_new_tokens": 240}
            stop = threading.Event()

            def client() -> list[int]:
                codes = []
                while not stop.is_set():
                    codes.append(c.post("/generate", json=long).status_code)
                return codes

            with ThreadPoolExecutor(8) as pool:
                futs = [pool.submit(client) for _ in range(8)]
                out["scaled_up"] = wait_for(lambda: sum(replicas_by_node().values()) == 2, 120)
                out["during"] = sorted(replicas_by_node().values())
                stop.set()
                codes = [code for f in futs for code in f.result()]
            out["burst_ok"] = bool(codes) and all(code == 200 for code in codes)
            out["scaled_down"] = wait_for(lambda: sum(replicas_by_node().values()) == 1, 90)
            out["after"] = [c.post("/generate", json={**body, "adapter_id": a}).status_code for a in ("lo", None)]
    finally:
        proc.terminate()
        proc.wait(30)
        ray.shutdown()
        cluster.shutdown()
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
