"""The load generator: seeded workloads, Zipf popularity, and a real run against a live server."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx

from loadtests.loadgen import Workload, plan_requests, run, write
from tests.helpers import LiveServer, fixture_dir, upload_files


def test_workload_is_seeded_and_zipf_is_skewed():
    w = Workload(requests=2000, adapters=[f"a{i}" for i in range(20)], popularity="zipf", seed=3, rate=10.0)
    a, b = plan_requests(w), plan_requests(w)
    assert a == b
    counts = Counter(r["adapter"] for r in a)
    assert counts["a0"] > 3 * counts["a9"] > 0  # Zipf(1): rank 1 about 10x rank 10
    arrivals = [r["at"] for r in a]
    assert arrivals == sorted(arrivals) and 150 < arrivals[-1] < 250  # Poisson at 10/s over 2000 requests
    uniform = Counter(r["adapter"] for r in plan_requests(Workload(requests=2000, adapters=["x", "y"], seed=1)))
    assert abs(uniform["x"] - uniform["y"]) < 200


def test_run_against_live_server_writes_reports(tmp_path):
    s = LiveServer(tmp_path / "store")
    try:
        httpx.post(s.url + "/adapters", data={"adapter_id": "lg"}, files=upload_files(fixture_dir("seq_bn")))
        w = Workload(requests=12, concurrency=4, adapters=[None, "lg", "missing"], output_tokens=(4, 8), seed=2)
        results, wall = asyncio.run(run(s.url, w, progress=False))
        summary = write(tmp_path / "out" / "run", "run", w, results, wall)
    finally:
        s.close()
    missing = sum(1 for r in results if r.adapter == "missing")
    assert summary["requests"] == 12 and summary["failed"] == missing and summary["ok"] == 12 - missing
    assert all(r.output_tokens in range(4, 9) and r.ttft <= r.e2e for r in results if r.ok)
    assert summary["output_tokens_per_s"] > 0 and summary["ttft_s"]["p50"] > 0
    assert all(k.startswith("404") for k in summary["errors"])
    assert json.loads((tmp_path / "out" / "run.json").read_text())["summary"]["ok"] == summary["ok"]
    assert "req/s" in (tmp_path / "out" / "run.md").read_text()
    assert (tmp_path / "out" / "run.png").read_bytes()[:4] == b"\x89PNG"
