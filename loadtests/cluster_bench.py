"""What routing does in `adapter-server cluster`: adapter slot loads per 1,000 requests and the
device-cache hit rate under Zipf traffic over many adapters, with adapter affinity against Ray Serve's
default router. Starts the cluster with its command line (this package never imports the server) inside
a network namespace of its own holding only loopback, as Ray listens on every interface.

    .venv/bin/python -m loadtests.cluster_bench            # about 3 minutes here
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
ADAPTER = ROOT / "tests" / "fixtures" / "peft" / "ia3_default"


def counts(url: str) -> dict[str, float]:
    """Cluster-wide slot loads (host to device) and cache hits and misses, from the ingress's /metrics."""
    out = {"loads": 0.0, "hit": 0.0, "miss": 0.0}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if "replica" in s.labels:
                continue
            if s.name == "adapter_server_adapter_load_seconds_count" and s.labels.get("source") == "host":
                out["loads"] += s.value
            if s.name == "adapter_server_adapter_cache_total" and s.labels.get("event") in ("hit", "miss"):
                out[s.labels["event"]] += s.value
    return out


def run(routing: str, store: Path, port: int, n_adapters: int, n_requests: int, slots: int, upload: bool) -> dict:
    cmd = [str(Path(sys.executable).with_name("adapter-server")), "cluster", "--model", str(TINY), "--device", "cpu",
           "--replicas", "2", "--port", str(port), "--store", str(store), "--device-slots", str(slots),
           "--max-batch-size", "8", "--routing", routing, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        files = [(p.name, p.read_bytes()) for p in sorted(ADAPTER.iterdir()) if p.is_file()]
        if upload:
            for i in range(n_adapters):
                r = httpx.post(url + "/adapters", data={"adapter_id": f"z{i}"}, files=[("files", f) for f in files], timeout=60)
                assert r.status_code == 201, r.text
        time.sleep(2.0)  # a metrics push period: the starting counts are at the hub
        before = counts(url)
        rng = random.Random(7)
        weights = [1.0 / (r + 1) for r in range(n_adapters)]
        picks = rng.choices(range(n_adapters), weights, k=n_requests)

        def one(a: int) -> tuple[int, str | None]:
            r = httpx.post(url + "/generate", json={"prompt": "the quick brown fox", "adapter_id": f"z{a}",
                                                    "max_new_tokens": 4, "ignore_eos": True}, timeout=120)
            return r.status_code, r.headers.get("x-replica-id")

        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, picks))
        dt = time.time() - t0
        time.sleep(2.0)
        after = counts(url)
        hits, misses = after["hit"] - before["hit"], after["miss"] - before["miss"]
        return {"routing": routing, "requests": n_requests, "ok": sum(s == 200 for s, _ in results),
                "seconds": dt, "requests_per_s": n_requests / dt,
                "slot_loads_per_1000_requests": 1000 * (after["loads"] - before["loads"]) / n_requests,
                "device_hit_rate": hits / max(1.0, hits + misses),
                "per_replica": dict(Counter(r for _, r in results))}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=8, help="device slots per replica")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "cluster.json")
    args = ap.parse_args()
    if os.environ.get("CLUSTER_BENCH_NETNS") != "1":  # re-run inside a namespace holding only loopback
        env = {**os.environ, "CLUSTER_BENCH_NETNS": "1"}
        inner = f"ip link set lo up && {sys.executable} -m loadtests.cluster_bench " + " ".join(sys.argv[1:])
        raise SystemExit(subprocess.run(["unshare", "--net", "sh", "-c", inner], env=env, cwd=ROOT).returncode)
    store = Path(tempfile.mkdtemp()) / "store"
    rows = [run("affinity", store, 18500, args.adapters, args.requests, args.slots, upload=True),
            run("ray-default", store, 18501, args.adapters, args.requests, args.slots, upload=False)]
    shutil.rmtree(store.parent, ignore_errors=True)
    report = {"adapters": args.adapters, "zipf_s": 1.0, "replicas": 2, "device_slots_per_replica": args.slots,
              "concurrency": 8, "max_new_tokens": 4, "rows": rows,
              "command": "python -m loadtests.cluster_bench " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    sys.stdout.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
