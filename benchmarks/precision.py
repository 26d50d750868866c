"""Precision and quantization on the CPU (`python -m benchmarks.precision`): the embedded SmolLM2 in
float32, bfloat16, int8 and int4 (weight-only, bfloat16 activations), each in its own process:

- decode tokens/s of one static batch at batch 1, 4 and 16 (best of three), bare and with 8 mixed
  adapters of four families ((IA)3, LoRA, DoRA, bottlenecks: rows cycle over them);
- resident memory after loading, and the bytes of the model's weights;
- drift from float32: the base model's next-token distribution on the benchmark prompts, teacher
  forced (greedy agreement with float32, and |logprob difference| of float32's chosen token);
- llama.cpp (llama-cpp-python, optional: `pip install -r loadtests/requirements.txt`) on the same
  model's GGUF (Q4_1) with the same threads, batches decoded together through its batch API.

Then resident memory over 1,500 batches of random shapes on a tiny random Llama, in float32 and in
bfloat16 (oneDNN's per-shape caches, bounded in server/__init__.py). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
           "int4": ("bfloat16", "int4")}
MIXED = ["ia3", "lora", "dora", "seq_bn", "ia3", "lora", "par_bn", "seq_bn"]  # 8 adapters, 4 families
ROOT = Path(__file__).resolve().parent.parent  # the repository root: where `-m benchmarks.precision` imports from


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _prompts(tok: Any) -> list[list[int]]:
    from benchmarks.bench import PROMPTS

    return [tok(p).input_ids for p in PROMPTS]


def speed(name: str, batches: list[int], new: int, model_name: str = "smollm2") -> dict[str, Any]:
    """Decode tokens/s per batch size, bare and on 8 mixed adapters; memory; the drift logits."""
    import torch

    from benchmarks.bench import decode_rate, make_engine
    from server.adapters.methods import write_demo
    from server.config import ModelConfig
    from server.engine.model_loader import load_base_model

    dtype, quant = CONFIGS[name]
    rss0 = _rss_mb()
    loaded = load_base_model(ModelConfig(model_name, "cpu", dtype, Path(".cache/models"), quant))  # type: ignore[arg-type]
    model = loaded.model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    out: dict[str, Any] = {"weights_mb": weights / 2**20, "rss_after_load_mb": _rss_mb(), "rss_before_load_mb": rss0}
    eng = make_engine(loaded, Path(tempfile.mkdtemp()) / "store", merge="never")
    src = Path(tempfile.mkdtemp())
    for i, kind in enumerate(MIXED):
        eng.registry.add_folder(f"m{i}", write_demo(kind, src / f"m{i}", model.config, seed=i))
    prompts = _prompts(eng.tokenizer)

    def run(adapters: list[str | None], n: int) -> float:
        return decode_rate(eng, prompts, adapters, n)

    for label, pick in (("bare", lambda i: None), ("8 mixed adapters", lambda i: f"m{i % 8}")):
        rates = {}
        for B in batches:
            rows = [pick(i) for i in range(B)]
            run(rows, 4)
            rates[B] = max(run(rows, new) for _ in range(3))
        out[f"decode_tok_s ({label})"] = rates
    out["rss_after_runs_mb"] = _rss_mb()
    with torch.inference_mode():  # the base model's own distribution over each prompt, for the drift
        out["logprobs"] = [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1).tolist() for p in prompts]
    out["threads"] = torch.get_num_threads()
    return out


def llama_cpp_speed(batches: list[int], new: int, threads: int) -> dict[str, Any]:
    """llama.cpp on the embedded GGUF: each batch's sequences prefilled, then decoded together, greedy,
    one llama_decode per step (its batch API), best of three."""
    import ctypes

    import llama_cpp
    import numpy as np

    from server.engine.model_loader import embedded_gguf

    rss0 = _rss_mb()
    nmax = max(batches)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(embedded_gguf()).encode(), llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()  # the high-level Llama() sets no n_seq_max: one sequence only
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = nmax * 256, 2048, 512, nmax, True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(model))
    from transformers import AutoTokenizer

    from server.engine.model_loader import embedded_folder

    prompts = _prompts(AutoTokenizer.from_pretrained(embedded_folder(Path(".cache/models"))))
    batch = llama_cpp.llama_batch_init(4096, 0, nmax)

    def put(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for k, (tok, pos, seq, want) in enumerate(items):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
            batch.seq_id[k][0], batch.logits[k] = seq, want
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(k: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, k)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,)).argmax())

    def run(B: int, n: int) -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        seqs = [prompts[i % len(prompts)] for i in range(B)]
        nxt, pos = [], []
        for s, p in enumerate(seqs):  # prefill, one sequence per call
            put([(t, j, s, j == len(p) - 1) for j, t in enumerate(p)])
            nxt.append(argmax(len(p) - 1))
            pos.append(len(p))
        t0 = time.perf_counter()
        for _ in range(n - 1):
            put([(nxt[s], pos[s], s, True) for s in range(B)])
            nxt = [argmax(s) for s in range(B)]
            pos = [p + 1 for p in pos]
        return B * (n - 1) / (time.perf_counter() - t0)

    rates = {}
    for B in batches:
        run(B, 4)
        rates[B] = max(run(B, new) for _ in range(3))
    out = {"decode_tok_s (bare)": rates, "rss_after_load_mb": _rss_mb(), "rss_before_load_mb": rss0,
           "weights_mb": embedded_gguf().stat().st_size / 2**20, "threads": threads, "version": llama_cpp.__version__}
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


def memory(dtype: str, batches: int, every: int = 250) -> list[tuple[int, float]]:
    """Resident MB every `every` batches of random sizes and prompt lengths (a tiny random Llama, the
    engine driven inline)."""
    import gc

    import torch

    from benchmarks.gpu import build_model, engine_for, word_tokenizer
    from server.engine.model_loader import LoadedModel
    from server.engine.types import GenerationRequest, GenerationResult, SamplingParams

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
        if it % every == 0:
            gc.collect()
            out.append((it, _rss_mb()))
    return out


def child(name: str, batches: list[int], new: int, mem_batches: int, threads: int, model: str = "smollm2",
          mem_every: int = 250) -> dict[str, Any]:
    if name == "llama.cpp":
        return llama_cpp_speed(batches, new, threads)
    if name.startswith("memory "):
        return {"rss_mb": memory(name.split()[1], mem_batches, mem_every)}
    return speed(name, batches, new, model)


def drift(ref: list[list[list[float]]], got: list[list[list[float]]]) -> dict[str, float]:
    """Greedy agreement with float32 over every position of the prompts, and |logprob| differences of
    float32's chosen token (mean, max)."""
    import torch

    agree, diffs = [], []
    for r, g in zip(ref, got, strict=True):
        rt, gt = torch.tensor(r), torch.tensor(g)
        top = rt.argmax(-1)
        agree.append((gt.argmax(-1) == top).float())
        diffs.append((gt.gather(-1, top[:, None]) - rt.gather(-1, top[:, None])).abs()[:, 0])
    a, d = torch.cat(agree), torch.cat(diffs)
    return {"greedy_agreement": a.mean().item(), "positions": a.numel(), "mean_abs_logprob_diff": d.mean().item(),
            "max_abs_logprob_diff": d.max().item()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--memory-batches", type=int, default=1500)
    ap.add_argument("--memory-every", type=int, default=250, help="batches between resident-memory samples")
    ap.add_argument("--model", default="smollm2", help="the model of the dtype/quantization runs (llama.cpp always "
                    "runs the embedded SmolLM2's GGUF)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison (llama-cpp-python)")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: torch's)")
    ap.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("bench_results/precision.json"))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        import torch

        threads = args.threads or torch.get_num_threads()
        res = child(args.child, batches, args.new, args.memory_batches, threads, args.model, args.memory_every)
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        return
    names = [*CONFIGS, "llama.cpp", "memory float32", "memory bfloat16"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    if args.no_llama_cpp:
        names = [n for n in names if n != "llama.cpp"]
    speed_model = "SmolLM2-135M-Instruct" if args.model == "smollm2" else args.model
    report: dict[str, Any] = {"model": f"{speed_model} (speed, drift), a tiny random Llama (memory soak)",
                              "command": "python -m benchmarks.precision " + " ".join(argv or sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d"), "runs": {}}
    # `benchmarks` is not installed: the children import it from the repository root, from any directory
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    for name in names:
        p = subprocess.run([sys.executable, "-m", "benchmarks.precision", "--child", name, "--batches", args.batches,
                            "--new", str(args.new), "--memory-batches", str(args.memory_batches),
                            "--memory-every", str(args.memory_every), "--model", args.model,
                            "--threads", str(args.threads)], capture_output=True, text=True, env=env)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            report["runs"][name] = {"error": (p.stderr or p.stdout)[-800:]}
            sys.stdout.write(f"{name}: failed ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})\n")
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        report["runs"][name] = res
        sys.stdout.write(f"{name:16s} " + "; ".join(f"{k} {v}" for k, v in res.items() if k != "logprobs") + "\n")
    ref = report["runs"].get("float32", {}).get("logprobs")
    for name, res in report["runs"].items():
        if ref and "logprobs" in res:
            res["drift_from_float32"] = drift(ref, res.pop("logprobs"))
            sys.stdout.write(f"{name:16s} drift from float32: {res['drift_from_float32']}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
