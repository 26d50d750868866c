"""LoRA and DoRA on the GPU: the segmented kernels (server/kernels/segments.py) against the graph hooks they
replace (`python -m benchmarks.gpu_lora`, on a machine with CUDA).

1. Kernels alone, Llama-3.1-8B's Linear shapes at batch 16 (and 64): one adapted Linear's delta added to
   its output, each way captured in a CUDA graph of 20 calls (no launch cost): the segmented kernels;
   each row's block in gathers and sums, compiled (`fused_delta`, the compiled default before); the
   routed products over the batch's distinct blocks (`routed_delta`). Microseconds per call, and the
   bandwidth of the adapter bytes each call must read (each distinct adapter's A and s*B once).
2. The engine, decode tokens/s with graphs and compiled kernels, the model's shapes with random weights:
   bare, one rank-16 LoRA on every Linear, eight of them mixed, eight of ranks 4-32, DoRA; the LoRA graph
   hooks by segments, by rows (every row its own segment), as the server dispatches them ("auto"), and as
   the compiled per-row form, interleaved, best of two. With
   `--families bottleneck`: seq_bn (one, eight mixed), par_bn and double_seq_bn, their products by the
   segmented kernels against the routed products.
3. One step's kernels under the profiler, LoRA rows, both ways.

Writes JSON (`--out`) after every stage, so a run cut by its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # a smoke test on the CPU: the kernels in Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.gpu import (
    DEV,
    MIXED_RANKS,
    build_model,
    decode_rate,
    engine_for,
    free_memory,
    kernel_profile,
    synth_adapters,
    word_tokenizer,
)
from server.adapters.methods import route
from server.adapters.methods.bottleneck import BottleneckMethod
from server.adapters.methods.lora import LoRAMethod, fused_delta, routed_delta
from server.compiled import Compiled
from server.engine.model_loader import LoadedModel

log = logging.getLogger(__name__)
SWEEP = [(64, 2, 128), (64, 8, 128), (128, 2, 128), (64, 4, 64)]  # (BLOCK_K, ITERS, BLOCK_N) beside the defaults
SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}  # (in, out)


def graphed_us(fn: Any, calls: int = 20, reps: int = 20) -> float:
    """Microseconds per call of `fn`, captured `calls` times into one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * calls) * 1e6


def kernel_case(inp: int, out: int, B: int, ranks: list[int], fused: Compiled) -> dict[str, Any]:
    """One Linear of 17 slots (as 16 device slots), rows spread over the adapters of `ranks` (slots 1..)."""
    S, R = 17, max(ranks)
    A = torch.zeros(S, R, inp, device=DEV)
    sB = torch.zeros(out, S, R, device=DEV)
    rank = torch.zeros(S, dtype=torch.int32, device=DEV)
    for s, r in enumerate(ranks, start=1):
        A[s, :r] = torch.randn(r, inp, device=DEV) / inp**0.5
        sB[:, s, :r] = torch.randn(out, r, device=DEV) * 0.01
        rank[s] = r
    sb = torch.zeros(S, out, device=DEV)
    slots = [1 + b % len(ranks) for b in range(B)]
    U = 1 << (len(set(slots)) - 1).bit_length()
    uniq, local, order, starts = (torch.tensor(v, device=DEV) for v in route(slots, U))
    i = torch.tensor(slots, device=DEV)
    ident = torch.arange(B + 1, device=DEV)
    x = torch.randn(B, 1, inp, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(B, 1, out, device=DEV, dtype=torch.bfloat16)
    from server.kernels import segments

    ways = {
        "segmented": lambda: segments.lora(x[:, 0], [y[:, 0]], [A], [sB], [sb], [rank], uniq, starts, order),
        "rows": lambda: segments.rows(x[:, 0], [y[:, 0]], [A], [sB], [sb], [rank], i, ident),
        "per_row_compiled": lambda: fused(x, y, A, sB, sb, None, None, i),
        "routed_distinct": lambda: routed_delta(x, y, A, sB, sb, None, None, i, uniq, local),
    }
    want = routed_delta(x, y.clone(), A, sB, sb, None, None, i, None, i)
    y0 = y.clone()
    segments.lora(x[:, 0], [y[:, 0]], [A], [sB], [sb], [rank], uniq, starts, order)
    err = (y.float() - want.float()).abs().max().item()
    y.copy_(y0)
    adapter_bytes = sum(4 * r * (inp + out) for r in ranks)
    row: dict[str, Any] = {"in": inp, "out": out, "batch": B, "ranks": ranks, "max_abs_err_vs_routed": err,
                           "adapter_bytes": adapter_bytes}
    for bk, it, bn in SWEEP:  # the segmented kernels' tile sizes
        old = segments.BLOCK_K, segments.ITERS, segments.BLOCK_N
        segments.BLOCK_K, segments.ITERS, segments.BLOCK_N = bk, it, bn
        try:
            row[f"segmented_{bk}x{it}_{bn}_us"] = graphed_us(ways["segmented"])
        except Exception as e:
            row[f"segmented_{bk}x{it}_{bn}_us"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            segments.BLOCK_K, segments.ITERS, segments.BLOCK_N = old
    for name, fn in ways.items():
        try:
            us = graphed_us(fn)
            row[f"{name}_us"] = us
            row[f"{name}_gb_s"] = adapter_bytes / us / 1e3
        except Exception as e:  # keep measuring the others
            row[f"{name}_us"] = f"{type(e).__name__}: {e}"[:200]
    return row


def group_case(inp: int, outs: list[int], B: int, ranks: list[int]) -> dict[str, Any]:
    """Sibling Linears of one input (q/k/v, gate/up) in one pair of launches, against one pair each."""
    from server.kernels import segments

    S, R = 17, max(ranks)
    slots = [1 + b % len(ranks) for b in range(B)]
    U = 1 << (len(set(slots)) - 1).bit_length()
    uniq, _, order, starts = (torch.tensor(v, device=DEV) for v in route(slots, U))
    x = torch.randn(B, inp, device=DEV, dtype=torch.bfloat16)
    ys = list(torch.randn(B, sum(outs), device=DEV, dtype=torch.bfloat16).split(outs, dim=-1))
    mods = []
    for o in outs:
        A = torch.randn(S, R, inp, device=DEV) / inp**0.5
        sB = torch.randn(o, S, R, device=DEV) * 0.01
        rank = torch.tensor([0] + [ranks[(s - 1) % len(ranks)] for s in range(1, S)], dtype=torch.int32, device=DEV)
        mods.append((A, sB, torch.zeros(S, o, device=DEV), rank))
    def one() -> None:
        segments.lora(x, ys, [m[0] for m in mods], [m[1] for m in mods], [m[2] for m in mods], [m[3] for m in mods],
                      uniq, starts, order)

    def each() -> None:
        for y, (A, sB, sb, rank) in zip(ys, mods, strict=True):
            segments.lora(x, [y], [A], [sB], [sb], [rank], uniq, starts, order)

    return {"in": inp, "outs": outs, "batch": B, "ranks": ranks, "grouped_us": graphed_us(one),
            "each_us": graphed_us(each)}


def _lora_way(seg: bool | None, group: bool, dispatch: str = "auto") -> Callable[[], None]:
    def set_() -> None:
        LoRAMethod.segment_kernels, LoRAMethod.group_segments, LoRAMethod.segment_dispatch = seg, group, dispatch
    return set_


def _bn_way(seg: bool) -> Callable[[], None]:
    def set_() -> None:
        BottleneckMethod.segment_kernels = seg
    return set_


def _defaults() -> None:
    LoRAMethod.segment_kernels, LoRAMethod.group_segments, LoRAMethod.segment_dispatch = None, True, "auto"
    BottleneckMethod.segment_kernels = False


# family -> (synthetic kinds by name, cases (name -> each row's adapter, from the names and the batch), ways
# (name -> what to set before making its engine), the methods to profile, (x8, x1) cases for "eight_vs_one")
FAMILIES: dict[str, tuple[Any, ...]] = {
    "lora": ({"lora": ["lora16"] * 8, "mixed": [f"lora{r}" for r in MIXED_RANKS], "dora": ["dora16"]},
             lambda n, B: {"lora r16 x1": [n["lora"][0]] * B, "lora r16 x8 mixed": [n["lora"][k % 8] for k in range(B)],
                           "lora 8 mixed ranks": [n["mixed"][k % 8] for k in range(B)], "dora r16 x1": [n["dora"][0]] * B},
             {"segmented": _lora_way(True, True, "segments"), "rows": _lora_way(True, True, "rows"),
              "auto": _lora_way(None, True), "per_row_compiled": _lora_way(False, True)},
             ("lora", "dora"), ("lora r16 x8 mixed", "lora r16 x1")),
    "bottleneck": ({"seq_bn": ["seq_bn"] * 8, "par_bn": ["par_bn"], "double": ["double_seq_bn"]},
                   lambda n, B: {"seq_bn x1": [n["seq_bn"][0]] * B, "seq_bn x8 mixed": [n["seq_bn"][k % 8] for k in range(B)],
                                 "par_bn x1": [n["par_bn"][0]] * B, "double_seq_bn x1": [n["double"][0]] * B},
                   {"segmented": _bn_way(True), "routed": _bn_way(False)},
                   ("bottleneck",), ("seq_bn x8 mixed", "seq_bn x1")),
}


def engine_cases(name: str, family: str, B: int, prompt: int, new: int, res: dict[str, Any], save: Any) -> None:
    kinds, make_cases, ways, profiled, (x8, x1) = FAMILIES[family]
    model = build_model(name)
    vocab = model.config.vocab_size
    loaded = LoadedModel(model, word_tokenizer(vocab), name, DEV, torch.bfloat16)
    store = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    names = synth_adapters(loaded, store, kinds)
    res["synth_s"] = time.perf_counter() - t0
    cases: dict[str, list[str | None]] = {"bare": [None] * B, **make_cases(names, B)}
    max_len = prompt + new + 8
    engines = {}
    for way, set_way in ways.items():
        set_way()
        try:
            eng = engines[way] = engine_for(loaded, store, "on", B, max_len)
        finally:
            _defaults()
        assert eng.graphs is not None
        with torch.inference_mode():
            res[f"capture_{way}_s"] = eng.graphs.warmup([eng.graphs.kv_bucket(max_len)])
    tok: dict[str, dict[str, float]] = {}
    res["tok_s"] = tok
    for label, rows in cases.items():
        for eng in engines.values():
            decode_rate(eng, rows, prompt, 4, vocab)  # resident, graphs captured
        runs: dict[str, list[float]] = {w: [] for w in engines}
        for _ in range(2):
            for way, eng in engines.items():
                runs[way].append(decode_rate(eng, rows, prompt, new, vocab))
        tok[label] = {w: max(v) for w, v in runs.items()}
        log.info("%s b%d %s: %s", name, B, label, tok[label])
        save()
    bare = tok["bare"]
    res["cost_vs_bare"] = {label: {w: bare[w] / v[w] - 1 for w in v} for label, v in tok.items() if label != "bare"}
    res["eight_vs_one"] = {w: tok[x8][w] / tok[x1][w] for w in engines}
    save()
    prof: dict[str, Any] = {}
    res["profile"] = prof
    for way, eng in engines.items() if DEV.type == "cuda" else ():
        for m in profiled:
            try:
                prof[f"{m} {way}"] = p = kernel_profile(eng, B, prompt + new, m, top=8)
                log.info("profile %s %s: %d kernels, %.3f ms", m, way, p["kernels"], p["kernel_time_ms"])
            except Exception as e:
                prof[f"{m} {way}"] = f"{type(e).__name__}: {e}"[:300]
        save()
    if DEV.type == "cuda":
        prof["bare"] = kernel_profile(next(iter(engines.values())), B, prompt + new, None, top=4)
    save()
    engines.clear()
    del model, loaded
    free_memory()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="llama-3.1-8b")
    ap.add_argument("--families", default="lora", help="lora, bottleneck, or both (comma-separated)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--kernel-batches", default="16,64", help="batch sizes of the kernels-alone stage ('' skips it)")
    ap.add_argument("--out", type=Path, default=Path("bench_results/gpu_lora.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)
    cuda = DEV.type == "cuda"
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu (a smoke test)", "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "kernels": [], "groups": [], "models": {}}
    import triton

    out["triton"] = triton.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(out, indent=1))

    if cuda and args.kernel_batches:
        fused = Compiled(fused_delta)
        for B in (int(b) for b in args.kernel_batches.split(",")):
            for ranks in ([16], [16] * 8, list(MIXED_RANKS)):
                for label, (inp, o) in SHAPES.items():
                    row = kernel_case(inp, o, B, ranks, fused)
                    row["shape"] = label
                    out["kernels"].append(row)
                    log.info("kernel %s", row)
                    save()
                free_memory()
            for ranks in ([16], [16] * 8):
                for shape, (inp, outs) in {"q/k/v": (4096, [4096, 1024, 1024]), "gate/up": (4096, [14336, 14336])}.items():
                    row = group_case(inp, outs, B, ranks)
                    row["shape"] = shape
                    out["groups"].append(row)
                    log.info("group %s", row)
                    save()
    for name in filter(None, args.models.split(",")):
        for family in filter(None, args.families.split(",")):
            res: dict[str, Any] = {"batch": args.batch}
            out["models"][name if family == "lora" else f"{name} {family}"] = res
            engine_cases(name, family, args.batch, args.prompt, args.new, res, save)
    print(json.dumps({k: v for k, v in out.items() if k != "kernels"}, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
