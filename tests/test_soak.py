"""Soak: minutes of mixed generation (streamed and not, 8 clients) while adapters are uploaded,
replaced and deleted, with fewer device slots than adapters. Ends with zero failed requests that
should have succeeded, and resident memory after warm-up growing by less than RSS_BOUND_MB.

SOAK_SECONDS (default 120) sets the length. Figures go to bench_results/soak.json.
"""

from __future__ import annotations

import gc
import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import LiveServer, fixture_dir, upload_files

pytestmark = pytest.mark.soak
SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
RSS_BOUND_MB = 150
STABLE = {"s-ia3": "ia3_default", "s-seq": "seq_bn", "s-par": "par_bn", "s-double": "double_seq_bn"}
CHURN_SOURCES = ["ia3_ff_in", "seq_bn_ln", "par_bn_mh", "scaled_par_bn", "ia3_bin", "seq_bn_channel"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_soak_mixed_traffic_with_adapter_churn(tmp_path):
    # dtype auto: the default, bfloat16 on a CPU that computes it, whose oneDNN caches once grew without bound
    s = LiveServer(tmp_path / "store", device_slots=4, host_capacity=4, max_new_tokens_limit=32, max_queue=512,
                   dtype="auto")
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"requests": 0, "ok": 0, "expected_404": 0, "failures": [], "uploads": 0, "deletes": 0}
    churn_present: dict[str, bool] = {}
    try:
        for aid, src in STABLE.items():
            assert httpx.post(s.url + "/adapters", data={"adapter_id": aid}, files=upload_files(fixture_dir(src))).status_code == 201

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=s.url, timeout=120) as c:
                while not stop.is_set():
                    aid = rng.choice([None, *STABLE, "c0", "c1", "c2"])
                    body = {"prompt": " ".join(rng.choice(["the", "quick", "fox", "adapter", "batch"]) for _ in range(rng.randint(1, 30))),
                            "adapter_id": aid, "max_new_tokens": rng.randint(4, 24), "ignore_eos": True,
                            "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 100)}
                    stream = rng.random() < 0.4
                    try:
                        if stream:
                            with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                                status = r.status_code
                                text = "".join(r.iter_lines()) if status == 200 else r.read().decode()
                                ok = status == 200 and "[DONE]" in text and '"error"' not in text
                        else:
                            r = c.post("/generate", json=body)
                            status, text, ok = r.status_code, r.text, r.status_code == 200
                    except httpx.HTTPError as e:
                        status, text, ok = 0, repr(e), False
                    with lock:
                        stats["requests"] += 1
                        if ok:
                            stats["ok"] += 1
                        elif status == 404 and aid is not None and aid.startswith("c"):
                            stats["expected_404"] += 1  # a churned adapter that was deleted or not yet uploaded
                        else:
                            stats["failures"].append(f"{aid} {status} {text[:200]}")

        def churn() -> None:
            rng = random.Random(99)
            with httpx.Client(base_url=s.url, timeout=120) as c:
                while not stop.is_set():
                    aid = rng.choice(["c0", "c1", "c2"])
                    if rng.random() < 0.6:
                        r = c.post("/adapters?replace=true", data={"adapter_id": aid},
                                   files=upload_files(fixture_dir(rng.choice(CHURN_SOURCES))))
                        if r.status_code != 201:
                            with lock:
                                stats["failures"].append(f"upload {aid} {r.status_code} {r.text[:200]}")
                        stats["uploads"] += 1
                        churn_present[aid] = True
                    else:
                        r = c.delete(f"/adapters/{aid}")
                        if r.status_code not in (204, 404):
                            with lock:
                                stats["failures"].append(f"delete {aid} {r.status_code}")
                        stats["deletes"] += 1
                        churn_present[aid] = False
                    time.sleep(rng.uniform(0.05, 0.3))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)] + [threading.Thread(target=churn)]
        t0 = time.time()
        for t in threads:
            t.start()
        time.sleep(min(20.0, SECONDS * 0.2))  # warm-up: every code path allocated once
        gc.collect()
        rss_start = rss_mb()
        time.sleep(max(0.0, SECONDS - (time.time() - t0)))
        stop.set()
        for t in threads:
            t.join(timeout=180)
        gc.collect()
        rss_end = rss_mb()
        eng = s.services.engine
        deadline = time.time() + 10
        while time.time() < deadline and (eng.rows.running or eng.rows.waiting):
            time.sleep(0.05)
        leaked_pins = {i["adapter_id"]: s.services.registry.record(i["adapter_id"]).pins for i in s.services.registry.infos()}
        report = {k: (len(v) if k == "failures" else v) for k, v in stats.items()}
        report.update(seconds=SECONDS, rss_start_mb=rss_start, rss_end_mb=rss_end, rss_growth_mb=rss_end - rss_start,
                      rss_bound_mb=RSS_BOUND_MB, kv_cache_mb=eng.runner.cache.nbytes() / 2**20,
                      first_failures=stats["failures"][:5])
        out = Path(__file__).resolve().parent.parent / "bench_results"
        out.mkdir(exist_ok=True)
        (out / "soak.json").write_text(json.dumps(report, indent=1))
        assert stats["failures"] == [], stats["failures"][:10]
        assert stats["requests"] >= SECONDS, report  # the soak really ran traffic
        assert stats["uploads"] > 5 and stats["deletes"] > 2
        assert eng.rows.running == [] and not eng.rows.waiting
        assert all(p == 0 for p in leaked_pins.values()), leaked_pins
        assert rss_end - rss_start < RSS_BOUND_MB, report
    finally:
        stop.set()
        s.close()
