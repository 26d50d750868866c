"""`make bench`: in-process engine benchmarks on the embedded model. Prints a table, writes JSON.

Throughput of a batch of 16 prompts x 64 new tokens with 0, 1 and 8 distinct adapters, next to
plain transformers `generate` on the same static batch; and the per-decode-step cost of each
adapter kind against the bare model at batch 1 and 16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from server.adapters.methods import write_demo
from server.adapters.registry import Registry
from server.adapters.spec import BaseModelInfo
from server.adapters.store import AdapterStore
from server.config import EngineConfig, ModelConfig, RegistryConfig
from server.engine.engine import Engine
from server.engine.model_loader import LoadedModel, load_base_model
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from server.metrics import Metrics

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn leaves.", "What is a transformer model?",
    "List three uses of copper.", "Summarise the plot of Hamlet in two sentences.", "How do vaccines work?",
    "Give me a recipe for pancakes.", "What is the capital of Australia and why?", "Describe a sunset at sea.",
    "Why do cats purr?", "Translate 'good morning' into French and Spanish.", "What causes earthquakes?",
    "Name the planets of the solar system.", "How does a bicycle stay upright?", "Tell a short joke.",
    "What is photosynthesis?",
]


def make_engine(loaded: LoadedModel, store: Path, slots: int = 16, merge: str = "auto") -> Engine:
    reg = Registry(AdapterStore(store), BaseModelInfo.from_model(loaded.model), RegistryConfig(64))
    reg.scan()
    cfg = EngineConfig(max_batch_size=32, max_model_len=1024, merge_policy=merge, device_slots=slots)  # type: ignore[arg-type]
    return Engine(loaded, reg, cfg, Metrics())


LORA_RANKS = (8, 16, 24, 32, 40, 48, 56, 64)  # eight LoRAs of mixed ranks, on every Linear


def synth_store(loaded: LoadedModel, root: Path) -> list[str]:
    """Adapters over the real model: (IA)3 and the three bottleneck presets, two of each (the throughput
    runs use these 8); LoRA and DoRA rank 16 on every Linear, prompt and prefix tuning of 20 virtual
    tokens, one or two of each; eight LoRAs of ranks 8 to 64."""
    cfg = loaded.model.config  # type: ignore[attr-defined]
    store = AdapterStore(root)
    reg = Registry(store, BaseModelInfo.from_model(loaded.model), RegistryConfig(64))
    names = []

    def add(name: str, kind: str, seed: int) -> None:
        src = Path(tempfile.mkdtemp())
        write_demo(kind, src, cfg, seed=seed)
        reg.add_folder(name, src)
        names.append(name)

    for i in range(2):
        for kind in ("ia3", "seq_bn", "double_seq_bn", "par_bn"):
            add(f"{kind}-{i}", kind, i)
    for i in range(2):
        for kind in ("lora", "dora", "prompt", "prefix", "compacter"):
            add(f"{kind}-{i}", kind, i)
    for i, r in enumerate(LORA_RANKS):
        add(f"lora-r{r}", f"lora{r}", 20 + i)
    add("tokens-0", "tokens16", 40)  # 16 trained embedding rows (PEFT trainable tokens)
    add("head-0", "head", 41)  # a whole trained LM head of its own
    return names


def run_batch(engine: Engine, adapters: list[str | None], max_new: int) -> float:
    """Seconds to generate max_new tokens for every prompt, all submitted at once."""
    done: list[object] = []
    tok: Any = engine.tokenizer
    for i, (p, a) in enumerate(zip(PROMPTS, adapters, strict=True)):
        ids = tuple(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"])
        engine.submit(GenerationRequest(f"b{i}", ids, a, SamplingParams(max_new_tokens=max_new, ignore_eos=True)),
                      lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
    t0 = time.perf_counter()
    while len(done) < len(adapters):
        engine.step()
    return time.perf_counter() - t0


def decode_rate(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new: int) -> float:
    """Tokens/s of one static batch's decode steps: row i on prompts[i % len] and adapters[i], `new` tokens
    each, all submitted at once; the first step (admission and prefill) and the last token not counted."""
    done: list[object] = []
    for i, a in enumerate(adapters):
        engine.submit(GenerationRequest(f"d{next(_ids)}", tuple(prompts[i % len(prompts)]), a,
                                        SamplingParams(max_new_tokens=new, ignore_eos=True)),
                      lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
    engine.step()  # admit and prefill
    t0, steps = time.perf_counter(), 0
    while len(done) < len(adapters):
        engine.step()
        steps += 1
    bad = [d for d in done if not isinstance(d, GenerationResult)]
    if bad:
        raise RuntimeError(f"a request failed: {bad[0]}")
    return len(adapters) * (steps - 1) / (time.perf_counter() - t0)


_ids = itertools.count()


def hf_generate(loaded: LoadedModel, max_new: int) -> float:
    tok = loaded.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def throughput(loaded: LoadedModel, store: Path, names: list[str], max_new: int, repeats: int) -> list[dict]:
    ia3, bns = names[0], [n for n in names if not n.startswith("ia3")]
    eng = make_engine(loaded, store)
    rows = []
    cases: list[tuple[str, list[str | None], Engine]] = [
        ("0 adapters (base)", [None] * 16, eng),
        ("1 adapter: (IA)3, merged", [ia3] * 16, eng),
        ("1 adapter: (IA)3, unmerged", [ia3] * 16, make_engine(loaded, store, merge="never")),
        ("1 adapter: seq_bn", [bns[0]] * 16, eng),
        ("8 distinct adapters", [names[i % 8] for i in range(16)], eng),
        ("1 adapter: LoRA r16 on every Linear, merged", ["lora-0"] * 16, eng),
        ("8 adapters of 8 families", [["ia3-0", "seq_bn-0", "double_seq_bn-0", "par_bn-0", "lora-0", "dora-0", "prompt-0",
                                       "prefix-0"][i % 8] for i in range(16)], eng),
    ]
    n_tok = 16 * max_new
    hf_generate(loaded, 4)
    for _, adapters, e in cases:
        run_batch(e, adapters, 4)  # warm: adapters resident, plans built
    best_s = {"generate": float("inf"), **{label: float("inf") for label, _, _ in cases}}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every case alike
        best_s["generate"] = min(best_s["generate"], hf_generate(loaded, max_new))
        for label, adapters, e in cases:
            best_s[label] = min(best_s[label], run_batch(e, adapters, max_new))
    t_hf = best_s["generate"]
    rows.append({"case": "transformers generate (static batch, base)", "seconds": t_hf, "tokens_per_s": n_tok / t_hf})
    for label, _, _ in cases:
        t = best_s[label]
        rows.append({"case": label, "seconds": t, "tokens_per_s": n_tok / t, "vs_generate": t_hf / t})
    return rows


# -- per decode step ----------------------------------------------------------------------------
def _decode_timer(eng: Engine, slots: list[int], ctx: int = 64) -> Callable[[], float]:
    """A function timing one decode forward pass over len(slots) rows at context length ctx (prompt
    tokens; a row of a prompt or prefix adapter holds its virtual positions before them)."""
    runner, B = eng.runner, len(slots)
    dev = runner.device
    # random token ids in 100..999, or in as much of that range as a smaller vocabulary has
    hi = min(1000, int(eng.loaded.model.config.vocab_size))  # type: ignore[union-attr]
    lo = min(100, hi // 2)
    prefixes = [eng.slots.prefix(s) for s in slots]
    pre = [0 if p is None else p.length for p in prefixes]
    shift = [0 if p is None else p.rope_shift for p in prefixes]
    for b, p in enumerate(prefixes):
        if p is not None:
            runner.write_prefix(b, p.keys, p.values)
    ids = torch.randint(lo, hi, (B, ctx), device=dev)
    rope = torch.tensor(shift, device=dev) if any(shift) else None
    plan = eng.slots.plan(slots)
    runner.forward(ids, start=torch.tensor(pre, device=dev), lengths=torch.full((B,), ctx, device=dev), row0=0, plan=plan,
                   rope_shift=rope)
    one = torch.randint(lo, hi, (B, 1), device=dev)
    start, ones = torch.tensor([a + ctx for a in pre], device=dev), torch.ones(B, dtype=torch.long, device=dev)
    eng.timer.enabled = False  # time the pass itself, not our instrumentation

    def step() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        runner.forward(one, start=start, lengths=ones, row0=0, plan=eng.slots.plan(slots), kv_len=max(pre) + ctx + 1,
                       rope_shift=rope)
        _sync(dev)
        return time.perf_counter() - t0

    return step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], float], n: int) -> float:
    for _ in range(3):
        fn()
    return statistics.median(fn() for _ in range(n))


def interleaved_min(fns: dict[str, Callable[[], float]], n: int) -> dict[str, float]:
    """Each function timed n times, round-robin, keeping the minimum: drift and noise hit all alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(2):
        for f in fns.values():
            f()
    for _ in range(n):
        for k, f in fns.items():
            best[k] = min(best[k], f())
    return best


def matmul_floor(loaded: LoadedModel, B: int, n: int) -> float:
    """Seconds of the model's own matrix products for one decode step of B rows, measured alone."""
    model: Any = loaded.model
    dev, dt = loaded.device, loaded.dtype
    lins = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    lins.append(model.lm_head)
    xs = [torch.randn(B, 1, m.in_features, device=dev, dtype=dt) for m in lins]

    def run() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for m, x in zip(lins, xs, strict=True):
                torch.nn.functional.linear(x, m.weight, m.bias)
        _sync(dev)
        return time.perf_counter() - t0

    return median_time(run, n)


def _grant(eng: Engine, name: str) -> int:
    ref = eng.registry.acquire(name)
    g = eng.adapters.grant((ref.adapter_id, ref.version), lambda: eng.registry.weights(ref))
    assert g is not None
    return g[0]


def decode_overhead(loaded: LoadedModel, store: Path, names: list[str], n: int) -> dict[str, Any]:
    """Per-decode-step cost of each adapter kind against the bare model, and of mixing adapters."""
    eng = make_engine(loaded, store, slots=48)
    slot = {name: _grant(eng, name) for name in names}
    for name in _more_adapters(eng, loaded, 14):
        slot[name] = _grant(eng, name)
    kinds = {"ia3 (unmerged)": "ia3-0", "seq_bn": "seq_bn-0", "double_seq_bn": "double_seq_bn-0", "par_bn": "par_bn-0",
             "lora r16 (unmerged)": "lora-0", "dora r16 (unmerged)": "dora-0", "prompt 20": "prompt-0",
             "prefix 20": "prefix-0", "compacter": "compacter-0", "trained rows 16": "tokens-0",
             "trained LM head": "head-0"}
    out: dict[str, Any] = {"per_kind": [], "mixed": [], "mixed_lora": []}
    for B in (1, 16):
        fns = {"base": _decode_timer(eng, [0] * B)}
        fns.update({label: _decode_timer(eng, [slot[name]] * B) for label, name in kinds.items()})
        t = interleaved_min(fns, n)
        row: dict[str, Any] = {"batch": B, "base_s": t["base"], "matmul_floor_s": matmul_floor(loaded, B, n)}
        row["base_over_floor"] = t["base"] / row["matmul_floor_s"]
        row["overhead"] = {label: t[label] / t["base"] - 1 for label in kinds}
        for label, name in (("ia3 (merged)", "ia3-0"), ("lora r16 (merged)", "lora-0"), ("dora r16 (merged)", "dora-0")):
            eng.slots.merge(slot[name])
            merged = interleaved_min({"base": _decode_timer(eng, [0] * B), "m": _decode_timer(eng, [slot[name]] * B)}, n)
            eng.slots.unmerge()
            row["overhead"][label] = merged["m"] / merged["base"] - 1
        out["per_kind"].append(row)
    loras = [f"lora-r{r}" for r in LORA_RANKS]
    fns = {f"one rank {r}": _decode_timer(eng, [slot[f"lora-r{r}"]] * 16) for r in (8, 32, 64)}
    fns["8 ranks 8-64"] = _decode_timer(eng, [slot[loras[i % 8]] for i in range(16)])
    fns["2 rank-16 LoRAs, mixed"] = _decode_timer(eng, [slot[["lora-0", "lora-1"][i % 2]] for i in range(16)])
    t = interleaved_min(fns, n)
    for label, v in t.items():
        out["mixed_lora"].append({"rows": 16, "adapters": label, "step_s": v, "throughput_vs_one_rank_32": t["one rank 32"] / v})
    seqs = ["seq_bn-0", "seq_bn-1"] + [f"extra-seq_bn-{i}" for i in range(14)]
    hetero = ["seq_bn-0", "ia3-0", "double_seq_bn-0", "par_bn-0", "seq_bn-1", "ia3-1", "double_seq_bn-1", "par_bn-1"]
    fns = {"one": _decode_timer(eng, [slot["seq_bn-0"]] * 16)}
    for k in (1, 4, 8, 16):
        fns[f"seq_bn x{k}"] = _decode_timer(eng, [slot[seqs[i % k]] for i in range(16)])
    for k in (4, 8):
        fns[f"mixed kinds x{k}"] = _decode_timer(eng, [slot[hetero[i % k]] for i in range(16)])
    families = ["ia3-0", "seq_bn-0", "double_seq_bn-0", "par_bn-0", "lora-0", "dora-0", "prompt-0", "prefix-0"]
    fns["8 families x8"] = _decode_timer(eng, [slot[families[i % 8]] for i in range(16)])
    fns["1 row of 16 with a trained LM head"] = _decode_timer(eng, [slot["head-0"]] + [slot["seq_bn-0"]] * 15)
    t = interleaved_min(fns, n)
    for label, v in t.items():
        if label != "one":
            out["mixed"].append({"rows": 16, "adapters": label, "step_s": v, "throughput_vs_one_adapter": t["one"] / v})
    return out


def flops_share(loaded: LoadedModel) -> dict[str, float]:
    """Each bottleneck preset's multiply-adds per token as a share of the model's (Linear layers and head)."""
    model: Any = loaded.model
    cfg = model.config
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    base = sum(m.in_features * m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n) + model.lm_head.in_features * model.lm_head.out_features
    r16, r2 = H // 16, H // 2
    lora16 = 16 * sum(m.in_features + m.out_features for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layers." in n)
    return {"seq_bn": L * 2 * H * r16 / base, "double_seq_bn": L * 2 * 2 * H * r16 / base, "par_bn": L * 2 * H * r2 / base,
            "compacter": L * 2 * 2 * H * r16 / base,  # rebuilt dense at load: double_seq_bn's shape
            "lora r16 (unmerged)": lora16 / base}


def cold_start(loaded: LoadedModel, reps: int = 3) -> list[dict[str, Any]]:
    """Upload (parse, validate, store) to first token, and the host-to-device slot write alone."""
    cfg = loaded.model.config
    rows = []
    for kind in ("ia3", "seq_bn", "par_bn"):
        up, first, swap = [], [], []
        for r in range(reps):
            root = Path(tempfile.mkdtemp())
            src = root / "src"
            write_demo(kind, src, cfg, seed=r)
            eng = make_engine(loaded, root / "store")
            t0 = time.perf_counter()
            eng.registry.add_folder("cold", src)
            t1 = time.perf_counter()
            got: list[object] = []
            eng.submit(GenerationRequest("c", (1, 2, 3, 4, 5, 6, 7, 8), "cold", SamplingParams(max_new_tokens=1)), got.append)
            while not got:
                eng.step()
            t2 = time.perf_counter()
            rec = eng.registry.record("cold")
            assert rec is not None and rec.weights is not None
            t3 = time.perf_counter()
            eng.slots.write(5, rec.weights)  # the raw host-to-device copy, outside the slot table
            _sync(loaded.device)
            swap.append(time.perf_counter() - t3)
            up.append(t1 - t0)
            first.append(t2 - t0)
        rows.append({"kind": kind, "upload_s": statistics.median(up), "upload_to_first_token_s": statistics.median(first),
                     "host_to_device_s": statistics.median(swap)})
    return rows


def _more_adapters(eng: Engine, loaded: LoadedModel, k: int) -> list[str]:
    """k more seq_bn adapters, so 16 distinct ones exist."""
    cfg = loaded.model.config
    names = []
    for i in range(k):
        src = Path(tempfile.mkdtemp())
        write_demo("seq_bn", src, cfg, seed=10 + i)
        name = f"extra-seq_bn-{i}"
        eng.registry.add_folder(name, src)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    ap.add_argument("--out", type=Path, default=Path("bench_results/bench.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_base_model(ModelConfig(args.model, "auto", "auto"))
    store = Path(tempfile.mkdtemp()) / "store"
    names = synth_store(loaded, store)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(loaded.device),
                    "device_name": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
                    "dtype": str(loaded.dtype), "torch": torch.__version__},
        "model": loaded.name, "batch": 16, "max_new_tokens": args.max_new,
        "command": "make bench  (python -m benchmarks.bench " + " ".join(argv or sys.argv[1:]) + ")",
    }
    report["flops_share"] = flops_share(loaded)
    report["decode"] = decode_overhead(loaded, store, names, args.steps)
    report["cold_start"] = cold_start(loaded)
    report["throughput"] = throughput(loaded, store, names, args.max_new, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    sys.stdout.write(render(report) + f"\nwrote {args.out}\n")


def render(r: dict[str, Any]) -> str:
    """Plain-text tables of a bench report."""
    out = [f"{r['model']} on {r['machine']['device_name']} ({r['machine']['dtype']}), torch {r['machine']['torch']}", ""]
    out.append("Adapter overhead per decode step, against the bare model (same batch)")
    kinds = list(r["decode"]["per_kind"][0]["overhead"])
    out.append(f"{'batch':>5}  {'base ms':>8}  {'floor ms':>8}  " + "  ".join(f"{k:>15}" for k in kinds))
    for row in r["decode"]["per_kind"]:
        out.append(f"{row['batch']:>5}  {row['base_s'] * 1e3:>8.2f}  {row['matmul_floor_s'] * 1e3:>8.2f}  "
                   + "  ".join(f"{row['overhead'][k] * 100:>14.1f}%" for k in kinds))
    out += ["", "Mixed batches: 16 rows, throughput against 16 rows of one seq_bn adapter"]
    for m in r["decode"]["mixed"]:
        out.append(f"  {m['adapters']:<18} {m['step_s'] * 1e3:8.2f} ms/step  {m['throughput_vs_one_adapter'] * 100:6.1f}%")
    out += ["", "LoRA on every Linear, 16 rows, throughput against 16 rows of one rank-32 LoRA"]
    for m in r["decode"].get("mixed_lora", []):
        out.append(f"  {m['adapters']:<18} {m['step_s'] * 1e3:8.2f} ms/step  {m['throughput_vs_one_rank_32'] * 100:6.1f}%")
    out += ["", "Cold start (median)"]
    for c in r["cold_start"]:
        out.append(f"  {c['kind']:<8} upload {c['upload_s'] * 1e3:7.1f} ms   upload->first token "
                   f"{c['upload_to_first_token_s'] * 1e3:7.1f} ms   host->device {c['host_to_device_s'] * 1e3:6.2f} ms")
    out += ["", f"Batch of 16 prompts x {r['max_new_tokens']} new tokens"]
    for t in r["throughput"]:
        ratio = f"{t['vs_generate']:.2f}x" if "vs_generate" in t else "1.00x"
        out.append(f"  {t['case']:<44} {t['seconds']:7.2f} s  {t['tokens_per_s']:7.1f} tok/s  {ratio} generate")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
