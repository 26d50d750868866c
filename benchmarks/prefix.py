"""The paged KV cache and prefix caching on the embedded model, in-process (the engine's own thread, clients
as threads): one run of each workload, prefix caching on against off in the same process.

    .venv/bin/python -m benchmarks.prefix               # every workload (about 10 minutes on 2 cores)
    .venv/bin/python -m benchmarks.prefix --only rows   # one of: shared, coldwarm, chat, rows

- shared: a 1,000-token system prompt per adapter over 8 adapters, 16 clients, 2 requests each (the system
  prompt, then a question of its own), 16 new tokens: TTFT p50 / p99 and throughput;
- coldwarm: one request alone with a 1,000-token prefix nobody has sent, then one with the same prefix
  and another question: TTFT of each (the bare model and a LoRA);
- chat: 8 conversations x 5 turns, each turn resending the whole history (system prompt, every user
  message and every reply) plus a new question: TTFT per turn and the wall time;
- rows: rows in flight for three ~1,200-token requests and 12 short ones in a 6,144-token KV cache, pages
  against the layout of the commit `--rev` (one contiguous row per request, sized by the longest).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from server.adapters.methods import write_demo
from server.config import ModelConfig
from server.engine.model_loader import LoadedModel, load_base_model
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams

TEXT = ("The city council met on Tuesday to review the budget for the coming year. Members discussed road "
        "repairs, the library's opening hours, a new bus line to the hospital, and the cost of heating the "
        "schools. Several residents spoke about noise from the night market and asked for stricter rules. ")
KINDS = ("ia3", "seq_bn", "par_bn", "lora", "dora", "compacter", "prompt", "lora")


def ids_of(loaded: LoadedModel, text: str) -> tuple[int, ...]:
    return tuple(loaded.tokenizer(text, add_special_tokens=False).input_ids)


def system_ids(loaded: LoadedModel, n: int = 1000) -> tuple[int, ...]:
    ids = ids_of(loaded, TEXT * (n // 40 + 2))
    return ids[:n]


def build(pkg: str, loaded: LoadedModel, store: Path, **cfg: Any) -> Any:
    """An engine of the package `pkg` (this tree's `server`, or another commit's, see runner_ab)."""
    m = {n: importlib.import_module(f"{pkg}.{n}") for n in
         ("adapters.registry", "adapters.store", "adapters.spec", "config", "engine.engine", "metrics")}
    reg = m["adapters.registry"].Registry(m["adapters.store"].AdapterStore(store),
                                          m["adapters.spec"].BaseModelInfo.from_model(loaded.model),
                                          m["config"].RegistryConfig(64))
    reg.scan()
    ecfg = m["config"].EngineConfig(**{"max_batch_size": 32, "max_model_len": 2048, "device_slots": 16, **cfg})
    return m["engine.engine"].Engine(loaded, reg, ecfg, m["metrics"].Metrics())


def adapters(loaded: LoadedModel, store: Path, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Synthetic adapters of these kinds (default: eight of mixed families) over the real model, in the
    store at `store`, named <kind>-<i> (seed i)."""
    from server.adapters.registry import Registry
    from server.adapters.spec import BaseModelInfo
    from server.adapters.store import AdapterStore
    from server.config import RegistryConfig

    reg = Registry(AdapterStore(store), BaseModelInfo.from_model(loaded.model), RegistryConfig(64))
    names = []
    for i, kind in enumerate(kinds):
        src = Path(tempfile.mkdtemp())
        write_demo(kind, src, loaded.model.config, seed=i)  # type: ignore[attr-defined]
        reg.add_folder(f"{kind}-{i}", src)
        names.append(f"{kind}-{i}")
    return names


def ask(engine: Any, rid: str, prompt: tuple[int, ...], adapter: str | None, new: int) -> GenerationResult:
    """Submit one request and wait for its result (from a client thread)."""
    done = threading.Event()
    box: list[Any] = []

    def sink(ev: object) -> None:
        if isinstance(ev, (GenerationResult, Exception)):
            box.append(ev)
            done.set()

    engine.submit(GenerationRequest(rid, prompt, adapter, SamplingParams(max_new_tokens=new, ignore_eos=True)), sink)
    done.wait()
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def shared(loaded: LoadedModel, store: Path, names: list[str], caching: str) -> dict[str, Any]:
    e = build("server", loaded, store, prefix_caching=caching)
    e.start()
    system = system_ids(loaded)

    def client(c: int) -> list[GenerationResult]:
        out = []
        for k in range(2):
            q = ids_of(loaded, f" Question {c}-{k}: what did the council decide about item {c + k}?")
            out.append(ask(e, f"s{c}-{k}", system + q, names[(c + k) % len(names)], 16))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client, range(16)) for r in rs]
    wall = time.perf_counter() - t0
    e.stop()
    ttft = [r.timings.time_to_first_token_seconds for r in results]
    return {"caching": caching, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(len(r.token_ids) for r in results) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
            "cached_tokens": sum(r.cached_tokens for r in results), "prompt_tokens": sum(r.prompt_tokens for r in results)}


def coldwarm(loaded: LoadedModel, store: Path, names: list[str]) -> list[dict[str, Any]]:
    e = build("server", loaded, store)
    e.start()
    rows = []
    for adapter in (None, names[3]):  # the bare model, a LoRA
        prefix = system_ids(loaded, 1000 + (adapter is not None))  # a prefix nobody has sent
        cold = ask(e, "c", prefix + ids_of(loaded, " First question?"), adapter, 4)
        warm = ask(e, "w", prefix + ids_of(loaded, " Another question, longer?"), adapter, 4)
        c, w = cold.timings.time_to_first_token_seconds, warm.timings.time_to_first_token_seconds
        rows.append({"adapter": adapter or "none", "cold_ttft_s": c, "warm_ttft_s": w, "ratio": w / c,
                     "warm_cached_tokens": warm.cached_tokens, "prompt_tokens": warm.prompt_tokens})
    e.stop()
    return rows


def chat(loaded: LoadedModel, store: Path, names: list[str], caching: str) -> dict[str, Any]:
    e = build("server", loaded, store, prefix_caching=caching)
    e.start()
    system = system_ids(loaded, 300)
    ttft: dict[int, list[float]] = {t: [] for t in range(5)}
    cached: list[int] = []

    def conversation(c: int) -> None:
        history = system
        for turn in range(5):
            prompt = history + ids_of(loaded, f" User: tell me more about point {turn} of item {c}. Assistant:")
            r = ask(e, f"c{c}-{turn}", prompt, names[c % len(names)], 32)
            ttft[turn].append(r.timings.time_to_first_token_seconds)
            cached.append(r.cached_tokens)
            history = prompt + r.token_ids

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(conversation, range(8)))
    wall = time.perf_counter() - t0
    e.stop()
    return {"caching": caching, "wall_s": wall, "ttft_p50_by_turn_s": [statistics.median(ttft[t]) for t in range(5)],
            "cached_tokens": sum(cached)}


def rows_in_flight(loaded: LoadedModel, store: Path, rev: str) -> list[dict[str, Any]]:
    from benchmarks.runner_ab import base_package

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        base = base_package(rev, Path(tmp))
        for name, pkg in ((f"contiguous rows ({rev})", base.__name__), ("pages", "server")):
            e = build(pkg, loaded, store, kv_cache_tokens=6144, max_batch_size=32)
            long = system_ids(loaded, 1200)
            reqs = [(long + (i,), 32) for i in range(3)] + [(ids_of(loaded, f"Short question {i}?"), 32) for i in range(12)]
            done: list[Any] = []
            types = importlib.import_module(f"{pkg}.engine.types")
            def sink(ev: object, done: list[Any] = done, types: Any = types) -> None:
                if isinstance(ev, (types.GenerationResult, Exception)):
                    done.append(ev)

            for i, (p, n) in enumerate(reqs):
                e.submit(types.GenerationRequest(f"q{i}", p, None, types.SamplingParams(max_new_tokens=n, ignore_eos=True)),
                         sink)
            peak = 0
            t0 = time.perf_counter()
            while len(done) < len(reqs):
                e.step()
                peak = max(peak, len(e.rows.running) + (e.rows.chunking is not None))
            out.append({"layout": name, "max_rows_in_flight": peak, "wall_s": time.perf_counter() - t0,
                        "errors": sum(isinstance(d, Exception) for d in done)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["shared", "coldwarm", "chat", "rows"], default=None)
    ap.add_argument("--rev", default="527731e", help="the commit whose contiguous rows `rows` compares against")
    ap.add_argument("--out", default="loadtests/results/prefix.json", help="updated in place: --only replaces one entry")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_base_model(ModelConfig())
    res: dict[str, Any] = {"device": str(loaded.device), "dtype": str(loaded.dtype)}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        names = adapters(loaded, store)
        if a.only in (None, "rows"):
            res["rows"] = rows_in_flight(loaded, Path(tmp) / "bare", a.rev)
            print(json.dumps(res["rows"]), flush=True)  # noqa: T201
        if a.only in (None, "coldwarm"):
            res["coldwarm"] = coldwarm(loaded, store, names)
            print(json.dumps(res["coldwarm"]), flush=True)  # noqa: T201
        if a.only in (None, "shared"):
            res["shared"] = [shared(loaded, store, names, c) for c in ("off", "on")]
            print(json.dumps(res["shared"]), flush=True)  # noqa: T201
        if a.only in (None, "chat"):
            res["chat"] = [chat(loaded, store, names, c) for c in ("off", "on")]
            print(json.dumps(res["chat"]), flush=True)  # noqa: T201
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, **res}, indent=1))  # BENCHMARKS.md renders it (loadtests/report.py)
    sys.stdout.write(f"wrote {a.out}\n")
    return res


if __name__ == "__main__":
    main()
