"""Same machine, same prompts, same run: plain transformers `generate` (static batch), the
one-request-at-a-time PEFT server, and adapter-server; then 500 adapters under Zipf traffic.

Starts every server itself on 127.0.0.1 (subprocesses; nothing here imports `server`), runs the
workloads with loadgen, writes bench_results/load/*.{json,md,png} and compare.json.

    python -m loadtests.compare            # about ten minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from .loadgen import Workload, plan_requests, run, write

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server subprocess on loopback, stopped on exit."""

    def __init__(self, args: list[str], port: int, log: Path, ready_s: float = 300) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")  # noqa: SIM115
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        t0 = time.time()
        while time.time() - t0 < ready_s:
            if self.p.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {ready_s}s; see {log}")

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def ours(store: Path, port: int, log: Path, **flags: object) -> Proc:
    args = [sys.executable, "-m", "server", "serve", "--store", str(store), "--port", str(port), "--log-level", "warning"]
    for k, v in flags.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return Proc(args, port, log)


def demo_adapters(out: Path, count: int, kinds: str, seed: int = 0) -> list[Path]:
    subprocess.run([sys.executable, "-m", "server", "demo-adapters", "--out", str(out), "--count", str(count),
                    "--kinds", kinds, "--seed", str(seed)], check=True, cwd=ROOT, capture_output=True)
    return sorted(p for p in out.iterdir() if p.is_dir())


def upload(url: str, folder: Path, adapter_id: str) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir() if p.is_file()]
    r = httpx.post(url + "/adapters", data={"adapter_id": adapter_id}, files=files, timeout=120)
    r.raise_for_status()


def static_generate(w: Workload) -> dict:
    """Plain transformers generate over the same prompts, batches of 16, left-padded, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    reqs = plan_requests(w)
    n_new = w.output_tokens[1]
    t0 = time.perf_counter()
    total = 0
    with torch.inference_mode():
        for i in range(0, len(reqs), 16):
            batch = reqs[i : i + 16]
            enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)
            model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            total += n_new * len(batch)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "output_tokens": total, "output_tokens_per_s": total / wall}


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def cache_counts(url: str) -> tuple[float, float]:
    """(hits, misses) of the adapter cache so far, from /metrics."""
    return tuple(metric(url, f'adapter_server_adapter_cache_total{{event="{e}"}}') for e in ("hit", "miss"))  # type: ignore[return-value]


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float:
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / max(1.0, hits + misses)


def load(url: str, w: Workload, out: Path, name: str) -> dict:
    results, wall = asyncio.run(run(url, w))
    return write(out / name, name, w, results, wall)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "load")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--many", type=int, default=500)
    ap.add_argument("--many-requests", type=int, default=128)
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="adapter-loadtest-"))
    report: dict = {}
    try:
        # 0. the model folder (converted once) and 8 PEFT (IA)3 adapters that both servers load
        ia3 = demo_adapters(tmp / "ia3", 8, "ia3")
        names = [p.name for p in ia3]
        base_w = Workload(requests=a.requests, concurrency=16, adapters=[None], output_tokens=(64, 64),
                          prompt_words=(16, 64), seed=1)
        ad_w = replace(base_w, adapters=list(names), seed=2)

        # 1. plain transformers generate, static batches of 16, bare model
        report["static_generate"] = static_generate(base_w)

        # 2. adapter-server: bare model at 16 concurrent clients, then 8 (IA)3 adapters
        with ours(tmp / "store", free_port(), out / "ours.log") as srv:
            for p in ia3:
                upload(srv.url, p, p.name)
            load(srv.url, replace(base_w, requests=16, seed=9), out, "warmup")
            report["ours_base"] = load(srv.url, base_w, out, "ours_base_c16")
            report["ours_ia3"] = load(srv.url, ad_w, out, "ours_8xia3_c16")

        # 3. the PEFT server, one request at a time, same (IA)3 workload
        port = free_port()
        args = [sys.executable, "-m", "loadtests.baseline_server", "--model", str(MODEL_DIR), "--port", str(port)]
        for p in ia3:
            args += ["--adapter", f"{p.name}={p}"]
        with Proc(args, port, out / "baseline.log"):
            report["peft_ia3"] = load(f"http://127.0.0.1:{port}", replace(ad_w, stream=False), out, "peft_8xia3_c16")

        # 4. many adapters: N in the store, 16 device slots, Zipf(1.0); against the same traffic all hot
        many = demo_adapters(tmp / "many", a.many, "ia3,seq_bn")
        store = tmp / "many_store"
        zipf_w = Workload(requests=a.many_requests, concurrency=16, adapters=[p.name for p in many], popularity="zipf",
                          zipf_s=1.0, output_tokens=(32, 32), prompt_words=(16, 48), seed=5)
        with ours(store, free_port(), out / "ours_many.log", device_slots=16, host_capacity=64) as srv:
            t0 = time.perf_counter()
            for p in many:
                upload(srv.url, p, p.name)
            report["many_upload_s"] = time.perf_counter() - t0
            report["many_count"] = len(many)
            load(srv.url, replace(zipf_w, seed=6, requests=32), out, "warmup_many")
            before = cache_counts(srv.url)
            report["many_16_slots"] = load(srv.url, zipf_w, out, "ours_many_zipf_16slots")
            after = cache_counts(srv.url)
            report["many_16_slots"]["cache_hit_rate"] = hit_rate(before, after)
        with ours(store, free_port(), out / "ours_hot.log", device_slots=a.many + 12, host_capacity=a.many + 12) as srv:
            load(srv.url, zipf_w, out, "warmup_hot")  # the same traffic once: every adapter it names is now hot
            before = cache_counts(srv.url)
            report["many_all_hot"] = load(srv.url, zipf_w, out, "ours_many_zipf_all_hot")
            after = cache_counts(srv.url)
            report["many_all_hot"]["cache_hit_rate"] = hit_rate(before, after)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s = report
    s["ratios"] = {
        "ours_base_over_static_generate": s["ours_base"]["output_tokens_per_s"] / s["static_generate"]["output_tokens_per_s"],
        "ours_ia3_over_peft_server": s["ours_ia3"]["output_tokens_per_s"] / s["peft_ia3"]["output_tokens_per_s"],
        "many_zipf_over_all_hot": s["many_16_slots"]["output_tokens_per_s"] / s["many_all_hot"]["output_tokens_per_s"],
        "many_p99_ttft_16_slots_s": s["many_16_slots"]["ttft_s"]["p99"],
        "many_p99_ttft_all_hot_s": s["many_all_hot"]["ttft_s"]["p99"],
    }
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["ratios"], indent=1))


if __name__ == "__main__":
    main()
