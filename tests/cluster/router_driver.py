"""Run inside a network namespace holding only loopback (see test_vllm_router.py): two plain `serve`
processes' apps, each holding one adapter, behind vLLM's router (`vllm-router`, the PyPI wheel) in its
multi-model mode; the checks, one JSON line of results on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.helpers import LiveServer, fixture_dir, free_port, upload_files  # noqa: E402


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    servers = {"alpha": LiveServer(tmp / "a"), "beta": LiveServer(tmp / "b")}
    for (name, srv), fixture in zip(servers.items(), ("lora_qv", "seq_bn"), strict=True):
        r = httpx.post(f"{srv.url}/adapters", data={"adapter_id": name}, files=upload_files(fixture_dir(fixture)))
        assert r.status_code == 201, r.text
    port = free_port()
    exe = Path(sys.executable).with_name("vllm-router")
    log = open(tmp / "router.log", "w")  # noqa: SIM115
    router = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port), "--enable-igw",
                               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
                              stdout=log, stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(100):
                try:
                    c.get("/workers")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            # the router reads a worker's model from the first entry of its /v1/models (the base model), so
            # each worker is registered under the adapter it serves
            regs = [c.post("/workers", json={"url": s.url, "model_id": name}) for name, s in servers.items()]
            out["register"] = [r.status_code for r in regs]
            out["register_errors"] = [r.text[:300] for r in regs if r.status_code != 200]
            out["models"] = sorted(c.get("/v1/models").json().get("models", []))
            comp = {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0}
            direct = {n: httpx.post(f"{s.url}/v1/completions", json={**comp, "model": n}).json()["choices"][0]["text"]
                      for n, s in servers.items()}
            routed: dict[str, list] = {}
            for _ in range(4):
                for name in servers:
                    r = c.post("/v1/completions", json={**comp, "model": name})
                    routed.setdefault(name, []).append(
                        [r.status_code, r.status_code == 200 and r.json()["choices"][0]["text"] == direct[name]])
            out["routed"] = routed
            with c.stream("POST", "/v1/completions", json={**comp, "model": "beta", "stream": True}) as s:
                lines = [x for x in s.iter_lines() if x.startswith("data:")]
            out["stream"] = [s.status_code, len(lines), lines[-1] if lines else None]
    finally:
        router.terminate()
        router.wait(10)
        for s in servers.values():
            s.close()
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
