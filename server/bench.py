"""`make bench`: in-process engine benchmarks on the embedded model. Prints a table, writes JSON.

Throughput of a batch of 16 prompts x 64 new tokens with 0, 1 and 8 distinct adapters, next to
plain transformers `generate` on the same static batch; and the per-decode-step cost of each
adapter kind against the bare model at batch 1 and 16.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .adapters.registry import Registry
from .adapters.spec import BaseModelInfo
from .adapters.store import AdapterStore
from .adapters.synth import linear_dims, write_adapterhub_bn, write_peft_ia3
from .config import EngineConfig, ModelConfig, RegistryConfig
from .engine.engine import Engine
from .engine.model_loader import LoadedModel, load_base_model
from .engine.types import GenerationRequest, GenerationResult, SamplingParams
from .metrics import Metrics

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn leaves.", "What is a transformer model?",
    "List three uses of copper.", "Summarise the plot of Hamlet in two sentences.", "How do vaccines work?",
    "Give me a recipe for pancakes.", "What is the capital of Australia and why?", "Describe a sunset at sea.",
    "Why do cats purr?", "Translate 'good morning' into French and Spanish.", "What causes earthquakes?",
    "Name the planets of the solar system.", "How does a bicycle stay upright?", "Tell a short joke.",
    "What is photosynthesis?",
]


def make_engine(loaded: LoadedModel, store: Path, slots: int = 16, merge: str = "auto") -> Engine:
    reg = Registry(AdapterStore(store), BaseModelInfo.from_model(loaded.model), RegistryConfig(store, slots, 64))
    reg.scan()
    cfg = EngineConfig(max_batch_size=32, max_model_len=1024, merge_policy=merge)  # type: ignore[arg-type]
    return Engine(loaded, reg, cfg, Metrics())


def synth_store(loaded: LoadedModel, root: Path) -> list[str]:
    """8 adapters over the real model: (IA)3 and the three bottleneck presets, two of each."""
    cfg = loaded.model.config  # type: ignore[attr-defined]
    L, H, dims = cfg.num_hidden_layers, cfg.hidden_size, linear_dims(loaded.model)
    store = AdapterStore(root)
    reg = Registry(store, BaseModelInfo.from_model(loaded.model), RegistryConfig(root, 16, 64))
    names = []
    for i in range(2):
        for kind in ("ia3", "seq_bn", "double_seq_bn", "par_bn"):
            name = f"{kind}-{i}"
            src = Path(tempfile.mkdtemp())
            if kind == "ia3":
                write_peft_ia3(src, L, dims, seed=i)
            else:
                write_adapterhub_bn(src, L, H, kind, seed=i)
            reg.add_folder(name, src)
            names.append(name)
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


def best(fn, repeats: int) -> float:  # noqa: ANN001
    return min(fn() for _ in range(repeats))


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
    ]
    n_tok = 16 * max_new
    t_hf = best(lambda: hf_generate(loaded, max_new), repeats)
    rows.append({"case": "transformers generate (static batch, base)", "seconds": t_hf, "tokens_per_s": n_tok / t_hf})
    for label, adapters, e in cases:
        run_batch(e, adapters, 4)  # warm: adapters resident, plans built
        t = best(lambda e=e, adapters=adapters: run_batch(e, adapters, max_new), repeats)
        rows.append({"case": label, "seconds": t, "tokens_per_s": n_tok / t, "vs_generate": t_hf / t})
    return rows


# -- per decode step ----------------------------------------------------------------------------
def _decode_timer(eng: Engine, slots: list[int], ctx: int = 64) -> Callable[[], float]:
    """A function timing one decode forward pass over len(slots) rows at context length ctx."""
    runner, B = eng.runner, len(slots)
    dev = runner.device
    runner.cache.fit(ctx + 1, 0)
    ids = torch.randint(100, 1000, (B, ctx), device=dev)
    zeros = torch.zeros(B, dtype=torch.long, device=dev)
    plan = eng.slots.plan(slots)
    runner.forward(ids, zeros, torch.full((B,), ctx, device=dev), 0, plan)
    one = torch.randint(100, 1000, (B, 1), device=dev)
    start, ones = torch.full((B,), ctx, device=dev), torch.ones(B, dtype=torch.long, device=dev)
    eng.timer.enabled = False  # time the pass itself, not our instrumentation

    def step() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        runner.forward(one, start, ones, 0, eng.slots.plan(slots))
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
    g = eng.registry.assign_slot(ref)
    assert g is not None
    if g.write is not None:
        eng.slots.write(g.slot, g.write)
    return g.slot


def decode_overhead(loaded: LoadedModel, store: Path, names: list[str], n: int) -> dict[str, Any]:
    """Per-decode-step cost of each adapter kind against the bare model, and of mixing adapters."""
    eng = make_engine(loaded, store)
    slot = {name: _grant(eng, name) for name in names}
    kinds = {"ia3 (unmerged)": "ia3-0", "seq_bn": "seq_bn-0", "double_seq_bn": "double_seq_bn-0", "par_bn": "par_bn-0"}
    out: dict[str, Any] = {"per_kind": [], "mixed": []}
    for B in (1, 16):
        base = median_time(_decode_timer(eng, [0] * B), n)
        floor = matmul_floor(loaded, B, n)
        row = {"batch": B, "base_s": base, "matmul_floor_s": floor, "base_over_floor": base / floor}
        for label, name in kinds.items():
            t = median_time(_decode_timer(eng, [slot[name]] * B), n)
            row[label] = t / base - 1
        eng.slots.merge(slot["ia3-0"])
        t = median_time(_decode_timer(eng, [slot["ia3-0"]] * B), n)
        eng.slots.unmerge()
        row["ia3 (merged)"] = t / base - 1
        out["per_kind"].append(row)
    one = median_time(_decode_timer(eng, [slot["seq_bn-0"]] * 16), n)
    order = ["seq_bn-0", "ia3-0", "double_seq_bn-0", "par_bn-0", "seq_bn-1", "ia3-1", "double_seq_bn-1", "par_bn-1"]
    extra = _more_adapters(eng, loaded, store, 8)
    order += extra
    for k in (1, 4, 8, 16):
        rows = [slot.get(order[i % k]) or _grant(eng, order[i % k]) for i in range(16)]
        t = median_time(_decode_timer(eng, rows), n)
        out["mixed"].append({"distinct": k, "step_s": t, "throughput_vs_one_adapter": one / t})
    return out


def _more_adapters(eng: Engine, loaded: LoadedModel, store: Path, k: int) -> list[str]:
    """k more seq_bn adapters so 16 distinct ones exist."""
    cfg = loaded.model.config
    names = []
    for i in range(k):
        src = Path(tempfile.mkdtemp())
        write_adapterhub_bn(src, cfg.num_hidden_layers, cfg.hidden_size, "seq_bn", seed=10 + i)
        name = f"extra-seq_bn-{i}"
        eng.registry.add_folder(name, src)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_results/bench.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_base_model(ModelConfig(args.model, "auto", "auto"))
    store = Path(tempfile.mkdtemp()) / "store"
    names = synth_store(loaded, store)
    rows = throughput(loaded, store, names, args.max_new, args.repeats)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch_threads": torch.get_num_threads(), "device": str(loaded.device),
                          "dtype": str(loaded.dtype), "torch": torch.__version__},
              "model": loaded.name, "batch": 16, "max_new_tokens": args.max_new, "throughput": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    w = max(len(r["case"]) for r in rows)
    lines = [f"{'case':<{w}}  {'seconds':>8}  {'tok/s':>8}  {'vs generate':>11}"]
    for r in rows:
        ratio = f"{r['vs_generate']:.2f}x" if "vs_generate" in r else "1.00x"
        lines.append(f"{r['case']:<{w}}  {r['seconds']:>8.2f}  {r['tokens_per_s']:>8.1f}  {ratio:>11}")
    import sys

    sys.stdout.write("\n".join(lines) + f"\n\nwrote {args.out}\n")


if __name__ == "__main__":
    main()
