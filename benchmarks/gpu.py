"""GPU benchmark (`make bench-gpu`, on a machine with CUDA): decode speed of random-initialised models of
real shapes in bfloat16, against HF `generate` and against the weight-read floor.

For each model: decode tokens/s at each batch size through the engine, with CUDA graphs and eagerly;
HF `generate` on the same static batch (same dtype, sdpa), its decode rate taken as the difference of a
long and a one-token run; the floor, the bytes of weights one step reads over the measured
device-to-device copy bandwidth, and the time of the bare graph replayed back to back (the step with no
host work). Then adapter cost at one batch size, against the bare model: every family (LoRA, DoRA, (IA)3,
the bottlenecks; Compacter is served as the bottleneck it is rebuilt into), one adapter, 8 mixed, 8 LoRAs of
mixed ranks, 8 adapters of four families, each beside its parameter share of the base; graph capture time,
GPU memory, and 500 adapters under Zipf with 16 device slots. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from server.adapters.methods import write_demo
from server.adapters.methods.lora import LoRAMethod
from server.adapters.registry import Registry
from server.adapters.spec import BaseModelInfo
from server.adapters.store import AdapterStore
from server.config import EngineConfig, RegistryConfig
from server.engine.engine import Engine
from server.engine.model_loader import LoadedModel, freeze
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from server.metrics import Metrics

LLAMA: dict[str, dict[str, Any]] = {  # the public configs' shapes; weights are random
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # a smoke test
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),
}
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()
log = logging.getLogger(__name__)


def build_model(name: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw: dict[str, Any] = {**LLAMA[name], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}
    cfg = LlamaConfig(**kw)  # attention: sdpa, transformers' default
    torch.manual_seed(0)
    with DEV:
        model: Any = LlamaForCausalLM(cfg)
        model = model.to(dtype)
    for p in model.parameters():  # small weights, so activations stay in range through every layer
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    return freeze(model)


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over `vocab` ids (t0 t1 ...), so the engine can detokenise any id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", unk_token="t0", pad_token="t0")


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written (best of 20)."""
    n = (1 << 30) if DEV.type == "cuda" else (1 << 26)
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    best = float("inf")
    for i in range(23):
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def free_memory() -> None:
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def step_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm, the LM head (not the embedding table)."""
    inner = model.model
    total = sum(p.numel() * p.element_size() for p in inner.layers.parameters())
    total += sum(p.numel() * p.element_size() for p in inner.norm.parameters())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def engine_for(loaded: LoadedModel, store: Path, graphs: str, max_batch: int, max_len: int, fuse: bool = True) -> Engine:
    reg = Registry(AdapterStore(store), BaseModelInfo.from_model(loaded.model), RegistryConfig(64))
    reg.scan()
    cfg = EngineConfig(max_batch_size=max_batch, max_model_len=max_len, kv_cache_tokens=max_batch * max_len,
                       max_new_tokens_limit=max_len, prefill_token_budget=max_batch * max_len,
                       merge_policy="never", cuda_graphs=graphs, compile_kernels=fuse)  # type: ignore[arg-type]
    return Engine(loaded, reg, cfg, Metrics())


def decode_rate(eng: Engine, adapters: list[str | None], prompt: int, new: int, vocab: int) -> float:
    """Decode tokens/s of one static batch: every row admitted and prefilled, then timed steps only."""
    done: list[object] = []
    g = torch.Generator().manual_seed(1)
    for i, a in enumerate(adapters):
        ids = tuple(torch.randint(3, vocab, (prompt,), generator=g).tolist())
        eng.submit(GenerationRequest(f"r{i}", ids, a, SamplingParams(max_new_tokens=new, ignore_eos=True)),
                   lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
    eng.step()  # admit, prefill, first decode step
    sync()
    t0, steps = time.perf_counter(), 0
    while len(done) < len(adapters):
        eng.step()
        steps += 1
    dt = time.perf_counter() - t0
    bad = [d for d in done if not isinstance(d, GenerationResult) or d.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"benchmark requests failed: {bad[:2]}")
    return len(adapters) * (steps - 1) / dt  # the last step only finishes rows


def hf_rate(model: Any, B: int, prompt: int, new: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (B, prompt), device=DEV)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    gen(2)
    return B * (new - 1) / (gen(new) - gen(1))


def kernel_profile(eng: Engine, B: int, kv_len: int, method: str | None = None, top: int = 12) -> dict:
    """Where one decode step's GPU time goes: the fixed-shape step run eagerly under the profiler (a
    replayed graph launches the same kernels). Every row on one resident slot of `method` (None: the bare
    model). Kernel count, summed kernel time, the largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    g = eng.graphs
    assert g is not None
    slot = 0 if method is None else min(s for s, m in eng.slots.slot_method.items() if m == method)
    key = g.key([slot] * B, kv_len - 1)
    assert key is not None
    P = eng.runner.cache.pages_for(g.max_len)
    usable = eng.runner.cache.n_pages - 2  # page 0 (read, never written) and the sink are not handed out
    tables = [[1 + (b * P + j) % usable for j in range(P)] for b in range(B)]  # a whole context per row (no rows run)
    g.fill([3] * B, list(range(g.max_len - B, g.max_len)), [slot] * B, key, tables)
    for _ in range(2):
        g._step(key)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g._step(key)
        sync()
    rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    total = sum(r[2] for r in rows)
    rows.sort(key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "kernel_time_ms": total / 1e3,
            "top": [{"name": n[:80], "count": c, "ms": t / 1e3} for n, c, t in rows[:top]]}


MIXED_RANKS = (4, 8, 8, 16, 16, 16, 32, 32)  # mean 16.5: against eight rank-16 LoRAs


def synth_adapters(loaded: LoadedModel, store: Path, kinds: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Demo adapters into `store`, `kinds` (name -> synthetic kinds; adapter ids name-0, name-1, ...) or by
    default eight of each family's demo adapter, eight LoRAs of mixed ranks, and one of the rest."""
    cfg = loaded.model.config
    reg = Registry(AdapterStore(store), BaseModelInfo.from_model(loaded.model), RegistryConfig(64))
    kinds = kinds or {"ia3": ["ia3"] * 8, "seq_bn": ["seq_bn"] * 8, "lora": ["lora16"] * 8,
                      "lora_mixed": [f"lora{r}" for r in MIXED_RANKS], "dora": ["dora16"], "par_bn": ["par_bn"],
                      "double_seq_bn": ["double_seq_bn"]}
    out: dict[str, list[str]] = {}
    for name, ks in kinds.items():
        for i, kind in enumerate(ks):
            src = Path(tempfile.mkdtemp())
            write_demo(kind, src, cfg, seed=i)
            reg.add_folder(f"{name}-{i}", src)
            out.setdefault(name, []).append(f"{name}-{i}")
    return out


def replay_ms(graphs: Any, B: int, n: int = 100) -> float | None:
    """Milliseconds per replay of the bare graph of batch bucket B, back to back: the GPU's time for a
    step with no host work between steps (the engine's step time minus this is host overhead)."""
    keys = [k for k in graphs.graphs if k[0] == graphs.bucket(B) and not k[2]]
    if not keys or DEV.type != "cuda":
        return None
    graph = graphs.graphs[max(keys, key=lambda k: k[1])][0]
    graph.replay()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    sync()
    return (time.perf_counter() - t0) / n * 1e3


def zipf_case(loaded: LoadedModel, n_adapters: int, n_requests: int, slots: int, max_batch: int, prompt: int,
              new: int, s: float = 1.0) -> dict:
    """Many (IA)3 adapters under Zipf(s) popularity, all requests queued at once, through the graphs
    engine with `slots` device slots: tokens/s, slot loads, distinct adapters per step."""
    cfg = loaded.model.config
    store = Path(tempfile.mkdtemp())
    reg = Registry(AdapterStore(store), BaseModelInfo.from_model(loaded.model),
                   RegistryConfig(n_adapters + 8))
    src = Path(tempfile.mkdtemp())
    for i in range(n_adapters):
        write_demo("ia3", src / str(i), cfg, seed=i)
        reg.add_folder(f"z{i}", src / str(i))
    reg.scan()
    max_len = prompt + new + 8
    ecfg = EngineConfig(max_batch_size=max_batch, max_model_len=max_len, kv_cache_tokens=max_batch * max_len,
                        max_new_tokens_limit=max_len, prefill_token_budget=max_batch * prompt, merge_policy="never",
                        cuda_graphs="on", max_queue=n_requests + 1, device_slots=slots)
    eng = Engine(loaded, reg, ecfg, Metrics())
    g = torch.Generator().manual_seed(3)
    weights = torch.tensor([1.0 / (r + 1) ** s for r in range(n_adapters)])
    picks = torch.multinomial(weights, n_requests, replacement=True, generator=g).tolist()
    done: list[object] = []
    vocab = cfg.vocab_size
    for i, a in enumerate(picks):
        ids = tuple(torch.randint(3, vocab, (prompt,), generator=g).tolist())
        eng.submit(GenerationRequest(f"z{i}", ids, f"z{a}", SamplingParams(max_new_tokens=new, ignore_eos=True)),
                   lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
    sync()
    t0 = time.perf_counter()
    while len(done) < n_requests:
        eng.step()
    dt = time.perf_counter() - t0
    ok = sum(isinstance(d, GenerationResult) and d.finish_reason == "length" for d in done)
    loads = next(x.value for x in list(eng.metrics.load.collect())[0].samples if x.name.endswith("_count"))
    distinct = list(eng.metrics.distinct.collect())[0].samples
    d_sum = next(x.value for x in distinct if x.name.endswith("_sum"))
    d_cnt = next(x.value for x in distinct if x.name.endswith("_count"))
    return {"slots": slots, "adapters": n_adapters, "requests": n_requests, "ok": ok, "seconds": dt,
            "tok_s": ok * new / dt, "slot_loads": loads, "loads_per_1000_requests": 1000 * loads / n_requests,
            "distinct_per_pass": d_sum / max(d_cnt, 1), "distinct_used": len(set(picks))}


def bench_model(name: str, batches: list[int], prompt: int, new: int, adapter_batch: int, bw: float,
                zipf: tuple[int, int] | None, res: dict[str, Any], save: Callable[[], None]) -> None:
    """Fills `res` stage by stage, calling `save` after each, so a run cut by its time limit keeps what it measured."""
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(name, torch.bfloat16 if DEV.type == "cuda" else torch.float32)
    vocab = model.config.vocab_size
    loaded = LoadedModel(model, word_tokenizer(vocab), name, DEV, next(model.parameters()).dtype)
    nbytes = step_bytes(model)
    floor_s = nbytes / bw
    res.update({"model": name, "weight_bytes_per_step": nbytes, "floor_step_ms": floor_s * 1e3, "rows": []})
    max_len, max_batch = prompt + new + 8, max([*batches, adapter_batch])
    store = Path(tempfile.mkdtemp())
    names = synth_adapters(loaded, store)
    engines = {"on": engine_for(loaded, store, "on", max_batch, max_len),
               "nofuse": engine_for(loaded, store, "on", max_batch, max_len, fuse=False),
               "off": engine_for(loaded, store, "off", max_batch, max_len)}
    graphs = engines["on"].graphs
    assert graphs is not None
    with torch.inference_mode():
        nofuse = engines["nofuse"].graphs
        assert nofuse is not None
        res["capture_s"] = nofuse.warmup()
        try:
            res["capture_and_compile_s"] = graphs.warmup()
        except Exception as e:  # keep measuring what works; say why
            log.exception("graphs with compiled kernels failed")
            res["fused_failed"] = f"{type(e).__name__}: {e}"[:500]
            engines["on"] = engines["nofuse"]
            graphs = nofuse
    res["graphs_captured"] = len(graphs.graphs)
    fused = engines["on"].runner.fused
    res["compile_errors"] = fused.errors() if fused is not None else "not enabled"
    for B in batches:
        row: dict[str, Any] = {"batch": B}
        for eng in engines.values():
            decode_rate(eng, [None] * B, prompt, 4, vocab)  # warm
        runs: dict[str, list[float]] = {"graphs_tok_s": [], "graphs_unfused_tok_s": [], "eager_tok_s": [],
                                        "hf_generate_tok_s": []}
        for _ in range(2):  # interleaved, best of two
            runs["graphs_tok_s"].append(decode_rate(engines["on"], [None] * B, prompt, new, vocab))
            runs["graphs_unfused_tok_s"].append(decode_rate(engines["nofuse"], [None] * B, prompt, new, vocab))
            runs["eager_tok_s"].append(decode_rate(engines["off"], [None] * B, prompt, new, vocab))
            runs["hf_generate_tok_s"].append(hf_rate(model, B, prompt, new, vocab))
        row.update({k: max(v) for k, v in runs.items()})
        row["graphs_step_ms"] = B / row["graphs_tok_s"] * 1e3
        row["replay_only_ms"] = replay_ms(graphs, B)
        row["floor_tok_s"] = B / floor_s
        row["graphs_vs_floor"] = row["graphs_tok_s"] / row["floor_tok_s"]
        row["graphs_vs_hf"] = row["graphs_tok_s"] / row["hf_generate_tok_s"]
        res["rows"].append(row)
        log.info("%s %s", name, row)
        save()
    B = adapter_batch
    families8 = [names[k][0] for k in ("ia3", "seq_bn", "par_bn", "double_seq_bn", "lora", "dora")]
    families8 += [names["lora_mixed"][0], names["ia3"][1]]
    cases: dict[str, list[str | None]] = {
        "bare": [None] * B,
        "ia3 x1": [names["ia3"][0]] * B,
        "ia3 x8 mixed": [names["ia3"][i % 8] for i in range(B)],
        "seq_bn x1": [names["seq_bn"][0]] * B,
        "seq_bn x8 mixed": [names["seq_bn"][i % 8] for i in range(B)],
        "par_bn x1": [names["par_bn"][0]] * B,
        "double_seq_bn x1": [names["double_seq_bn"][0]] * B,
        "lora r16 x1": [names["lora"][0]] * B,
        "lora r16 x8 mixed": [names["lora"][i % 8] for i in range(B)],
        "lora 8 mixed ranks": [names["lora_mixed"][i % 8] for i in range(B)],
        "dora r16 x1": [names["dora"][0]] * B,
        "ia3+seq_bn 8 mixed": [(names["ia3"][:4] + names["seq_bn"][:4])[i % 8] for i in range(B)],
        "8 adapters of 4 families": [families8[i % 8] for i in range(B)],
    }
    if DEV.type == "cuda":
        res["profile_b1"] = kernel_profile(engines["on"], 1, prompt + new)
        res["profile_b1_unfused"] = kernel_profile(engines["nofuse"], 1, prompt + new)
        res["profile_b16"] = kernel_profile(engines["on"], 16, prompt + new)
    res["graph_replays"], res["graph_eager_steps"] = graphs.replays, graphs.eager_steps
    base_params = nbytes // 2
    reg = engines["on"].registry
    res["adapter_params_share"] = {k: reg.info(v[0])["num_parameters"] / base_params for k, v in names.items()}
    engines.clear()  # one engine at a time from here: each holds its own slot layouts and graphs
    del graphs, nofuse
    free_memory()
    ad: dict[str, Any] = {}
    modes = {"on": "graphs", "nofuse": "graphs, eager hooks", "off": "eager"}
    if DEV.type == "cuda":  # the A/B of LoRA's compiled hooks: routed products, against each row's block in gathers-and-sums
        modes["lora_routed"] = "graphs, LoRA routed hooks"
    res["adapters_batch"] = B
    res["adapters_tok_s"] = ad
    prof: dict[str, Any] = {}
    for mode, how in modes.items():
        LoRAMethod.fused_hooks = mode != "lora_routed"
        try:
            eng = engine_for(loaded, store, "off" if mode == "off" else "on", B, max_len, fuse=mode != "nofuse")
        finally:
            LoRAMethod.fused_hooks = True
        for label, rows in cases.items():
            if mode == "lora_routed" and not label.startswith(("lora", "dora")):
                continue
            decode_rate(eng, rows, prompt, 4, vocab)  # warm: resident, graphs captured
            ad[f"{label} ({how})"] = decode_rate(eng, rows, prompt, new, vocab)
            log.info("adapters %s (%s): %.1f tok/s", label, how, ad[f"{label} ({how})"])
        if mode == "on" and DEV.type == "cuda":
            res["memory_serving_gib"] = torch.cuda.memory_allocated() / 2**30  # weights, one engine's KV cache, slots, graphs
        for m in ("ia3", "lora", "dora", "bottleneck") if DEV.type == "cuda" and mode != "off" else ():
            if mode == "lora_routed" and m not in ("lora", "dora"):
                continue
            try:  # where an adapter's step time goes, per family (slots still resident from the cases)
                prof.setdefault(m, {})[mode] = p = kernel_profile(eng, B, prompt + new, m, top=8)
                log.info("profile %s %s: %d kernels, %.3f ms", m, mode, p["kernels"], p["kernel_time_ms"])
            except Exception as e:  # keep measuring the rest
                prof.setdefault(m, {})[mode] = f"{type(e).__name__}: {e}"[:300]
        res["profile_adapters"] = prof
        del eng
        free_memory()
        save()
    if zipf is not None:
        n_ad, n_req = zipf
        hot = zipf_case(loaded, n_ad, n_req, n_ad, 64, prompt // 2, 32)
        cold = zipf_case(loaded, n_ad, n_req, 16, 64, prompt // 2, 32)
        res["zipf"] = {"all_hot": hot, "slots_16": cold, "ratio": cold["tok_s"] / hot["tok_s"]}
        log.info("%s zipf %s", name, res["zipf"])
        save()
    res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else None
    save()
    del model, loaded
    free_memory()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--adapter-batch", type=int, default=16)
    ap.add_argument("--zipf", default="500,1024", help="adapters,requests for the Zipf case ('' skips)")
    ap.add_argument("--zipf-model", default="llama-3.2-1b", help="the model the Zipf case runs on")
    ap.add_argument("--out", type=Path, default=Path("bench_results/gpu.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)
    bw = copy_bandwidth()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_gb_s": bw / 1e9, "models": []}
    import transformers

    out["transformers"] = transformers.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(out, indent=1))

    for name in args.models.split(","):
        zipf = tuple(int(x) for x in args.zipf.split(",")) if args.zipf and name == args.zipf_model else None
        res: dict[str, Any] = {}
        out["models"].append(res)
        bench_model(name, [int(b) for b in args.batches.split(",") if b], args.prompt, args.new, args.adapter_batch, bw,
                    zipf, res, save)  # type: ignore[arg-type]
    print(json.dumps(out, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
