"""What routing does in `adapter-server cluster`, and what the ingress hop costs:
- adapter slot loads per 1,000 requests and the device-cache hit rate under Zipf traffic over many
  adapters, with adapter affinity against Ray Serve's default router;
- the share of a hot adapter's requests that spill to the second replica, by concurrency (one
  replica runs 8 rows at once);
- time to first token and time per output token of streamed requests one at a time, through a
  cluster of one replica against the plain single-process server.
Starts the servers with their command line (this package never imports the server) inside a network
namespace of its own holding only loopback, as Ray listens on every interface.

    .venv/bin/python -m loadtests.cluster_bench            # about 5 minutes here
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
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


@contextlib.contextmanager
def started(args: list[str], port: int) -> Iterator[str]:
    """`adapter-server ARGS` (the tiny model on the CPU) on 127.0.0.1:port, up until /health answers;
    stopped afterwards, with whatever Ray left behind."""
    cmd = [str(Path(sys.executable).with_name("adapter-server")), *args, "--model", str(TINY), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)


def upload(url: str, adapter_id: str) -> None:
    files = [(p.name, p.read_bytes()) for p in sorted(ADAPTER.iterdir()) if p.is_file()]
    r = httpx.post(url + "/adapters", data={"adapter_id": adapter_id}, files=[("files", f) for f in files], timeout=60)
    assert r.status_code == 201, r.text


def run(routing: str, store: Path, port: int, n_adapters: int, n_requests: int, slots: int, upload_all: bool) -> dict:
    args = ["cluster", "--replicas", "2", "--store", str(store), "--device-slots", str(slots), "--max-batch-size", "8",
            "--routing", routing]
    with started(args, port) as url:
        if upload_all:
            for i in range(n_adapters):
                upload(url, f"z{i}")
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


def spill(store: Path, port: int, levels: list[int], per_level: int) -> list[dict]:
    """One hot adapter, `per_level` requests of 32 new tokens at each concurrency: the share answered by a
    replica other than the one that first held it."""
    rows = []
    with started(["cluster", "--replicas", "2", "--store", str(store), "--max-batch-size", "8"], port) as url:
        upload(url, "hot")
        body = {"prompt": "the quick brown fox", "adapter_id": "hot", "max_new_tokens": 32, "ignore_eos": True}
        home = httpx.post(url + "/generate", json=body, timeout=120).headers.get("x-replica-id")
        time.sleep(1.0)  # the router has seen where it is resident
        for conc in levels:
            def one(_: int) -> tuple[int, str | None]:
                r = httpx.post(url + "/generate", json=body, timeout=300)
                return r.status_code, r.headers.get("x-replica-id")

            t0 = time.time()
            with ThreadPoolExecutor(conc) as pool:
                got = list(pool.map(one, range(per_level)))
            dt = time.time() - t0
            rows.append({"concurrency": conc, "requests": per_level, "ok": sum(s == 200 for s, _ in got),
                         "spill_share": sum(r != home for _, r in got) / per_level, "seconds": dt,
                         "tokens_per_s": per_level * 32 / dt})
    return rows


def stream_latency(url: str, n: int, new_tokens: int) -> dict:
    """Streamed /generate requests one at a time: time to first token and per output token, p50 and p90."""
    body = {"prompt": "the quick brown fox jumps over", "max_new_tokens": new_tokens, "ignore_eos": True, "stream": True}
    ttft, tpot = [], []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(n + 3):
            t0 = time.perf_counter()
            stamps = []
            with c.stream("POST", "/generate", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and '"token_id":' in line:
                        stamps.append(time.perf_counter())
            if i < 3 or len(stamps) < 2:  # warm-up
                continue
            ttft.append(stamps[0] - t0)
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[int(p) - 1] * 1e3

    return {"requests": len(ttft), "ttft_p50_ms": statistics.median(ttft) * 1e3, "ttft_p90_ms": q(ttft, 90),
            "tpot_p50_ms": statistics.median(tpot) * 1e3, "tpot_p90_ms": q(tpot, 90)}


def ingress_hop(store: Path, port: int, n: int, new_tokens: int) -> dict:
    with started(["serve", "--store", str(store)], port) as url:
        plain = stream_latency(url, n, new_tokens)
    with started(["cluster", "--replicas", "1", "--store", str(store)], port + 1) as url:
        cluster = stream_latency(url, n, new_tokens)
    return {"new_tokens": new_tokens, "plain_serve": plain, "cluster_of_one": cluster,
            "added_ttft_p50_ms": cluster["ttft_p50_ms"] - plain["ttft_p50_ms"],
            "added_tpot_p50_ms": cluster["tpot_p50_ms"] - plain["tpot_p50_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=8, help="device slots per replica")
    ap.add_argument("--spill-levels", default="2,8,16", help="concurrencies of the hot-adapter case")
    ap.add_argument("--spill-requests", type=int, default=96)
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "cluster.json")
    args = ap.parse_args()
    if os.environ.get("CLUSTER_BENCH_NETNS") != "1":  # re-run inside a namespace holding only loopback
        env = {**os.environ, "CLUSTER_BENCH_NETNS": "1"}
        inner = f"ip link set lo up && {sys.executable} -m loadtests.cluster_bench " + " ".join(sys.argv[1:])
        raise SystemExit(subprocess.run(["unshare", "--net", "sh", "-c", inner], env=env, cwd=ROOT).returncode)
    tmp = Path(tempfile.mkdtemp())
    store = tmp / "store"
    rows = [run("affinity", store, 18500, args.adapters, args.requests, args.slots, upload_all=True),
            run("ray-default", store, 18501, args.adapters, args.requests, args.slots, upload_all=False)]
    spills = spill(tmp / "spill", 18502, [int(x) for x in args.spill_levels.split(",")], args.spill_requests)
    hop = ingress_hop(tmp / "hop", 18503, args.latency_requests, 16)
    shutil.rmtree(tmp, ignore_errors=True)
    report = {"adapters": args.adapters, "zipf_s": 1.0, "replicas": 2, "device_slots_per_replica": args.slots,
              "concurrency": 8, "max_new_tokens": 4, "rows": rows, "spill": spills, "ingress_hop": hop,
              "command": "python -m loadtests.cluster_bench " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    sys.stdout.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
