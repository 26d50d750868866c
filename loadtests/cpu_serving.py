"""The CPU serving table of issue 25, measured with vLLM's own load generator against a running server.

Uploads eight rank-16 PEFT LoRAs on every Linear (synthetic: `python -m server demo-adapters`) to the server
if it lacks them, then runs `vllm bench serve --backend openai` (loadtests/vllm_bench.py, from the environment
loadtests/vllm_env.sh makes) for each case: random 128-token prompts, 64 new tokens, --ignore-eos.
Results are merged into loadtests/results/cpu_serving.json under --name (the server measured).

    .venv/bin/adapter-server serve --port 8000 &
    .venv/bin/python -m loadtests.cpu_serving --url http://127.0.0.1:8000 --name adapter-server
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LORAS = [f"lora16-{i}" for i in range(1, 9)]
# case -> (clients, prompts, model ids: one, or several that each request draws from)
CASES = {
    "bare model, 1 client": (1, 16, None),
    "bare model, 16 clients": (16, 64, None),
    "one LoRA, 16 clients": (16, 64, LORAS[:1]),
    "8 distinct LoRAs, 16 clients": (16, 64, LORAS),
    "8 distinct LoRAs, 1 client": (1, 16, LORAS),
}
METRICS = {"output_tok_s": r"Output token throughput \(tok/s\):\s+([\d.]+)", "ttft_p50_ms": r"Median TTFT \(ms\):\s+([\d.]+)",
           "tpot_p50_ms": r"Median TPOT \(ms\):\s+([\d.]+)", "ok": r"Successful requests:\s+(\d+)",
           "failed": r"Failed requests:\s+(\d+)"}


def upload_loras(url: str, folder: Path) -> None:
    """The eight LoRAs, written by `python -m server demo-adapters` (this module imports no server code)."""
    with httpx.Client(base_url=url, timeout=300) as c:
        have = {a["adapter_id"] for a in c.get("/adapters").json()["adapters"]}
        if all(name in have for name in LORAS):
            return
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "server", "demo-adapters", "--out", tmp, "--model", str(folder),
                            "--count", "8", "--kinds", "lora16", "--seed", "1"], check=True, cwd=ROOT, capture_output=True)
            made = sorted(p for p in Path(tmp).iterdir() if p.is_dir())
            for name, src in zip(LORAS, made, strict=True):
                if name not in have:
                    files = [("files", (p.name, p.read_bytes())) for p in src.iterdir() if p.is_file()]
                    c.post("/adapters", data={"adapter_id": name}, files=files).raise_for_status()


def bench(url: str, model: str, tokenizer: Path, clients: int, prompts: int, loras: list[str] | None,
          python: str) -> dict[str, float]:
    cmd = [python, "-m", "loadtests.vllm_bench", "--backend", "openai", "--base-url", url, "--model", model,
           "--tokenizer", str(tokenizer.relative_to(ROOT) if tokenizer.is_relative_to(ROOT) else tokenizer), "--dataset-name", "random", "--random-input-len", "128",
           "--random-output-len", "64", "--ignore-eos", "--num-prompts", str(prompts),
           "--max-concurrency", str(clients), "--seed", "0"]
    if loras:
        cmd += ["--lora-modules", *loras]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800).stdout
    got = {k: float(m.group(1)) for k, rx in METRICS.items() if (m := re.search(rx, out))}
    if "output_tok_s" not in got:
        raise RuntimeError(f"vllm bench serve printed no result:\n{out[-2000:]}")
    return {**got, "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--name", default="adapter-server", help="the server measured (a key of the results)")
    ap.add_argument("--model-folder", type=Path, default=ROOT / ".cache/models/SmolLM2-135M-Instruct")
    ap.add_argument("--python", default=str(ROOT / ".venv-vllm/bin/python"), help="the vLLM environment's python")
    ap.add_argument("--cases", default=";".join(CASES), help="case names separated by ;")
    ap.add_argument("--no-upload", action="store_true", help="the server already serves the LoRAs (a peer)")
    ap.add_argument("--out", type=Path, default=ROOT / "loadtests/results/cpu_serving.json")
    a = ap.parse_args()
    if not a.no_upload:
        upload_loras(a.url, a.model_folder)
    model = httpx.get(a.url + "/v1/models").json()["data"][0]["id"]
    res: dict[str, dict[str, float]] = {}
    for case in a.cases.split(";"):
        clients, prompts, loras = CASES[case]
        res[case] = bench(a.url, model, a.model_folder, clients, prompts, loras, a.python)
        print(case, json.dumps({k: v for k, v in res[case].items() if k != "command"}), flush=True)  # noqa: T201
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    old[a.name] = {"date": time.strftime("%Y-%m-%d"), "cases": {**old.get(a.name, {}).get("cases", {}), **res}}  # cases run before stay
    a.out.write_text(json.dumps(old, indent=1))


if __name__ == "__main__":
    main()
