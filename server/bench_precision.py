"""Groundwork for bfloat16 on the CPU (`python -m server.bench_precision`): decode speed of the embedded
model at batch 1, 4 and 16 in float32 and in bfloat16, the latter with torch's oneDNN (mkldnn) kernels
on and off; and resident memory over 1,500 batches of random shapes on the tiny test model, same
three ways. Each configuration runs in a child process (the oneDNN switch and memory are per process).
Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = {"float32": ("float32", True), "bfloat16": ("bfloat16", True), "bfloat16, oneDNN off": ("bfloat16", False)}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def speed(dtype: str, batches: list[int], new: int) -> dict[int, float]:
    """Decode tokens/s of one static batch per size (best of three), the embedded model on the CPU."""
    from .bench import PROMPTS, make_engine
    from .config import ModelConfig
    from .engine.model_loader import load_base_model
    from .engine.types import GenerationRequest, GenerationResult, SamplingParams

    loaded = load_base_model(ModelConfig("smollm2", "cpu", dtype))  # type: ignore[arg-type]
    eng = make_engine(loaded, Path(tempfile.mkdtemp()) / "store")

    def run(B: int, n: int) -> float:
        done: list[object] = []
        for i in range(B):
            ids = tuple(eng.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids)
            eng.submit(GenerationRequest(f"b{i}", ids, None, SamplingParams(max_new_tokens=n, ignore_eos=True)),
                       lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
        eng.step()  # admit and prefill
        t0, steps = time.perf_counter(), 0
        while len(done) < B:
            eng.step()
            steps += 1
        return B * (steps - 1) / (time.perf_counter() - t0)

    out = {}
    for B in batches:
        run(B, 8)
        out[B] = max(run(B, new) for _ in range(3))
    return out


def memory(dtype: str, batches: int) -> list[tuple[int, float]]:
    """Resident MB every 250 batches of random sizes and prompt lengths (a tiny random Llama, the engine
    driven inline)."""
    import gc

    import torch

    from .bench_gpu import build_model, engine_for, word_tokenizer
    from .engine.model_loader import LoadedModel
    from .engine.types import GenerationRequest, GenerationResult, SamplingParams

    dt = getattr(torch, dtype)
    model = build_model("tiny", dt)
    vocab = model.config.vocab_size
    loaded = LoadedModel(model, word_tokenizer(vocab), "tiny", torch.device("cpu"), dt)
    e = engine_for(loaded, Path(tempfile.mkdtemp()), "off", 16, 128)
    rng, out, done = random.Random(0), [], list[object]()

    def sink(ev: object) -> None:
        if isinstance(ev, (GenerationResult, Exception)):
            done.append(ev)

    for it in range(1, batches + 1):
        done.clear()
        n = rng.randint(1, 12)
        for b in range(n):
            ids = tuple(rng.randint(3, vocab - 1) for _ in range(rng.randint(1, 60)))
            e.submit(GenerationRequest(f"r{it}-{b}", ids, None,
                                       SamplingParams(max_new_tokens=rng.randint(2, 12), ignore_eos=True)), sink)
        while len(done) < n:
            e.step()
        if it % 250 == 0:
            gc.collect()
            out.append((it, _rss_mb()))
    return out


def child(name: str, batches: list[int], new: int, mem_batches: int) -> dict[str, Any]:
    import torch

    dtype, onednn = CONFIGS[name]
    torch.backends.mkldnn.enabled = onednn  # type: ignore[assignment]
    return {"decode_tok_s": speed(dtype, batches, new), "rss_mb": memory(dtype, mem_batches),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--memory-batches", type=int, default=1500)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("bench_results/precision.json"))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        sys.stdout.write("RESULT " + json.dumps(child(args.child, batches, args.new, args.memory_batches)) + "\n")
        return
    report: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (speed), a tiny random Llama (memory)",
                              "command": "python -m server.bench_precision " + " ".join(argv or sys.argv[1:]), "runs": {}}
    for name in CONFIGS:
        p = subprocess.run([sys.executable, "-m", "server.bench_precision", "--child", name, "--batches", args.batches,
                            "--new", str(args.new), "--memory-batches", str(args.memory_batches)],
                           capture_output=True, text=True, check=True)
        res = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
        report["runs"][name] = res
        tok = ", ".join(f"b{b} {v:.1f}" for b, v in res["decode_tok_s"].items())
        rss = ", ".join(f"{i}: {m:.0f}" for i, m in res["rss_mb"])
        sys.stdout.write(f"{name:22s} decode tok/s {tok}; resident MB after n batches {rss}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
