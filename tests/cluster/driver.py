"""Run inside a network namespace holding only loopback (see test_cluster.py): a 2-replica cluster of
the tiny model and a plain single-process server, the checks, one JSON line of results on stdout."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.helpers import TINY, LiveServer, fixture_dir, upload_files  # noqa: E402

# one adapter of every family (fixtures written by the real libraries), two AdapterHub bottlenecks; None: the bare model
FAMILIES = {"bare": None, "ia3": "ia3_default", "seq_bn": "seq_bn", "double_seq_bn": "double_seq_bn", "lora": "lora_qv",
            "dora": "dora_qv", "prompt": "prompt_tuning", "prefix": "prefix_tuning", "compacter": "compacter"}


def affinity(c: httpx.Client, body: dict) -> dict[str, list]:
    """For each family in turn: its adapter uploaded, then six single requests one after another, three
    straight away (no report shows the load yet) and three after a few stats periods (every report is in);
    the replica that answered each. Each adapter is deleted after its turn."""
    out: dict[str, list] = {}
    for name, fixture in FAMILIES.items():
        adapter = None if fixture is None else f"fam-{name}"
        if fixture is not None:
            r = c.post("/adapters", data={"adapter_id": adapter}, files=upload_files(fixture_dir(fixture)))
            assert r.status_code == 201, r.text
        ids = []
        for pause in (0, 0, 0, 0.6, 0, 0):
            time.sleep(pause)
            r = c.post("/generate", json={**body, "adapter_id": adapter, "max_new_tokens": 4})
            ids.append(r.headers.get("x-replica-id") if r.status_code == 200 else r.status_code)
        out[name] = ids
        if adapter is not None:
            assert c.delete(f"/adapters/{adapter}").status_code == 204
    return out


def main() -> None:
    import ray
    from ray import serve

    from server.cluster.app import ClusterConfig, build
    from server.config import Settings

    tmp = Path(tempfile.mkdtemp())
    out: dict = {}
    plain = LiveServer(tmp / "plain")
    settings = Settings(model=str(TINY), store=tmp / "store", host="127.0.0.1", port=18321, device="cpu",
                        dtype="float32", max_new_tokens_limit=256, max_batch_size=4, device_slots=4)  # as LiveServer
    t0 = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 18321})
    serve.run(build(settings, ClusterConfig(replicas=2, cpus_per_replica=1.0)), name="adapter-server", route_prefix="/")
    out["start_s"] = time.time() - t0
    url = "http://127.0.0.1:18321"
    with httpx.Client(base_url=url, timeout=120) as c, httpx.Client(base_url=plain.url, timeout=120) as p:
        out["health"] = c.get("/health").json()
        for cl in (c, p):
            r = cl.post("/adapters", data={"adapter_id": "lo"}, files=upload_files(fixture_dir("lora_qv")))
            out.setdefault("upload", []).append(r.status_code)
        body = {"prompt": "the quick brown fox", "max_new_tokens": 8, "ignore_eos": True, "logprobs": True}
        want = {a: p.post("/generate", json={**body, "adapter_id": a}).json()["token_ids"] for a in (None, "lo")}
        c.post("/generate", json={**body, "adapter_id": "lo"})  # loads it on one replica
        time.sleep(1.0)  # a few stats periods: the router has seen where it is resident
        replicas: dict[str, list] = {"lo": [], "base": []}
        same: list[bool] = []
        for _ in range(6):
            for a, key in (("lo", "lo"), (None, "base")):
                r = c.post("/generate", json={**body, "adapter_id": a})
                replicas[key].append(r.headers.get("x-replica-id"))
                same.append(r.json().get("token_ids") == want[a])
            time.sleep(0.3)  # past a stats period: the router has seen where "lo" is resident
        out["same_tokens"] = all(same)
        out["replicas"] = {k: Counter(v) for k, v in replicas.items()}
        comp = {"model": "lo", "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0}
        oa = [cl.post("/v1/completions", json=comp) for cl in (c, p)]
        out["openai"] = [oa[0].status_code, oa[0].json()["choices"][0]["text"] == oa[1].json()["choices"][0]["text"],
                         oa[0].headers.get("x-replica-id") in replicas["lo"]]
        with c.stream("POST", "/generate", json={**body, "adapter_id": "lo", "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data:")]
        out["sse"] = [s.status_code, len(events), events[-1] if events else None]
        def burst() -> list[httpx.Response]:
            """16 long requests for "lo", 50 ms apart."""
            with ThreadPoolExecutor(16) as pool:
                futs = []
                for _ in range(16):
                    futs.append(pool.submit(c.post, "/generate", json={**body, "adapter_id": "lo", "max_new_tokens": 200}))
                    time.sleep(0.05)
                return [f.result() for f in futs]

        # spill-over: a burst for the adapter saturates its replica (4 rows); once the router sees that,
        # the rest go to the other replica, which loads it
        warm = replicas["lo"][-1]
        got = burst()
        ids = [r.headers.get("x-replica-id") for r in got]
        out["spill"] = {"ok": all(r.status_code == 200 for r in got), "replicas": len(set(ids)),
                        "spilled": sum(i != warm for i in ids)}
        # replace: both replicas now hold "lo"; after a replace through the ingress, a burst that reaches both
        # answers with the new version everywhere (the plain server replaced the same way gives the reference)
        new = upload_files(fixture_dir("ia3_default"))
        out["replace"] = [cl.post("/adapters?replace=true", data={"adapter_id": "lo"}, files=new).status_code for cl in (c, p)]
        want_new = p.post("/generate", json={**body, "adapter_id": "lo"}).json()["token_ids"]
        got = burst()
        out["after_replace"] = {"ok": all(r.status_code == 200 for r in got),
                                "replicas": len({r.headers.get("x-replica-id") for r in got}),
                                "new_version": all(r.json()["token_ids"][:8] == want_new for r in got),
                                "old_differs": want_new != want["lo"]}
        out["delete"] = c.delete("/adapters/lo").status_code
        out["after_delete"] = [c.post("/generate", json={**body, "adapter_id": "lo"}).status_code for _ in range(4)]
        out["models"] = sorted(m["id"] for m in c.get("/v1/models").json()["data"])
        out["affinity"] = affinity(c, body)
        time.sleep(1.5)  # a push period: every replica's latest counts are at the hub
        from prometheus_client.parser import text_string_to_metric_families

        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        ok = [s for s in fams["adapter_server_requests"].samples if s.labels.get("status") == "ok"]
        cluster = sum(s.value for s in ok if "replica" not in s.labels)
        out["metrics"] = {"cluster_ok": cluster, "replicas_ok": sum(s.value for s in ok if "replica" in s.labels),
                          "replica_labels": len({s.labels["replica"] for s in ok if "replica" in s.labels}),
                          "vllm": "vllm:num_requests_running" in fams}
        # a replica dies: requests meanwhile get 200 or a retryable 503, never another error; Ray
        # replaces it, and the store has lost nothing
        assert c.post("/adapters", data={"adapter_id": "kept"}, files=upload_files(fixture_dir("seq_bn"))).status_code == 201
        victim = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                      if "EngineReplica" in n["name"] and "SERVE_REPLICA" in n["name"])
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        victim_id = victim.rsplit("#", 1)[-1]
        codes, seen = [], set()
        t1 = time.time()
        while time.time() - t1 < 120 and not (len(seen) == 2 and victim_id not in seen):
            for adapter in ("kept", None):
                r = c.post("/generate", json={**body, "adapter_id": adapter})
                codes.append(r.status_code)
                if r.status_code == 200:
                    seen.add(r.headers.get("x-replica-id"))
            seen.discard(victim_id)
            time.sleep(0.3)
        spread = seen
        out["after_kill"] = {"codes": codes[-1:] + sorted(set(codes)), "replaced": len(spread) == 2,
                             "kept": [a["adapter_id"] for a in c.get("/adapters").json()["adapters"]]}
    serve.shutdown()
    ray.shutdown()
    plain.close()
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
