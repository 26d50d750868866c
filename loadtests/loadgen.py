"""An asyncio load generator in the style of vLLM's serving benchmark, over HTTP with streaming.

Arrivals are Poisson at a given rate or closed-loop with a given concurrency; each request names an
adapter drawn uniformly or by Zipf over N adapters (or none); prompt and output lengths come from a
seeded distribution. Reports throughput, TTFT, time per output token and end-to-end latency
(p50/p90/p99) and errors; writes JSON, a Markdown summary and PNG plots.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --adapters a,b,c --requests 200 \\
        --rate 4 --popularity zipf --out bench_results/load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

WORDS = ["the", "model", "serves", "many", "adapters", "on", "one", "frozen", "base", "while", "requests", "share", "every", "forward", "pass", "and", "each", "row", "is", "routed", "by", "an", "index", "to", "its", "own", "weights", "so", "that", "nothing", "waits", "for", "anything", "else"]


@dataclass
class Workload:
    requests: int = 100
    rate: float | None = None  # requests/s (Poisson); None: closed loop
    concurrency: int = 16  # closed loop: clients in flight
    adapters: list[str | None] = field(default_factory=lambda: [None])
    popularity: str = "uniform"  # or "zipf"
    zipf_s: float = 1.0
    prompt_words: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (32, 64)
    seed: int = 0
    endpoint: str = "generate"  # "generate" (ours) or "baseline" (same body, no streaming)
    stream: bool = True
    timeout_s: float = 300.0


@dataclass
class Result:
    adapter: str | None
    ok: bool
    status: int
    error: str
    start: float
    ttft: float
    e2e: float
    output_tokens: int
    prompt_words: int


def plan_requests(w: Workload) -> list[dict]:
    """The seeded request list: adapter, prompt, output length, arrival offset."""
    rng = random.Random(w.seed)
    n = len(w.adapters)
    zipf = w.popularity == "zipf"
    weights = [1.0 / (i + 1) ** w.zipf_s if zipf else 1.0 for i in range(n)]
    out, t = [], 0.0
    for i in range(w.requests):
        adapter = rng.choices(w.adapters, weights)[0]
        words = rng.randint(*w.prompt_words)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        if w.rate:
            t += rng.expovariate(w.rate)
        out.append({"i": i, "adapter": adapter, "prompt": prompt, "words": words,
                    "max_new_tokens": rng.randint(*w.output_tokens), "at": t})
    return out


async def one(client: httpx.AsyncClient, w: Workload, r: dict) -> Result:
    body = {"prompt": r["prompt"], "adapter_id": r["adapter"], "max_new_tokens": r["max_new_tokens"],
            "ignore_eos": True, "stream": w.stream}
    t0 = time.perf_counter()
    ttft, n_tok = 0.0, 0
    try:
        if w.stream:
            async with client.stream("POST", "/" + w.endpoint, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:200]
                    return Result(r["adapter"], False, resp.status_code, text, t0, 0, time.perf_counter() - t0, 0, r["words"])
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        return Result(r["adapter"], False, 200, ev["error"]["message"], t0, ttft, time.perf_counter() - t0, n_tok, r["words"])
                    if "token_id" in ev:
                        if n_tok == 0:
                            ttft = time.perf_counter() - t0
                        n_tok += 1
        else:
            resp = await client.post("/" + w.endpoint, json=body)
            if resp.status_code != 200:
                return Result(r["adapter"], False, resp.status_code, resp.text[:200], t0, 0, time.perf_counter() - t0, 0, r["words"])
            j = resp.json()
            n_tok = len(j["token_ids"])
            ttft = j.get("timings", {}).get("time_to_first_token_seconds", float("nan"))  # unseen without streaming
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return Result(r["adapter"], False, 0, repr(e)[:200], t0, ttft, time.perf_counter() - t0, n_tok, r["words"])
    return Result(r["adapter"], True, 200, "", t0, ttft, time.perf_counter() - t0, n_tok, r["words"])


async def run(url: str, w: Workload, progress: bool = True) -> tuple[list[Result], float]:
    reqs = plan_requests(w)
    limits = httpx.Limits(max_connections=max(w.concurrency, 64), max_keepalive_connections=max(w.concurrency, 64))
    results: list[Result] = []
    bar = tqdm(total=len(reqs), desc="requests", disable=not progress, leave=False)
    async with httpx.AsyncClient(base_url=url, timeout=w.timeout_s, limits=limits) as client:
        t_start = time.perf_counter()
        if w.rate:
            async def fire(r: dict) -> None:
                await asyncio.sleep(max(0.0, r["at"] - (time.perf_counter() - t_start)))
                results.append(await one(client, w, r))
                bar.update()

            await asyncio.gather(*(fire(r) for r in reqs))
        else:
            queue = list(reversed(reqs))

            async def worker() -> None:
                while queue:
                    r = queue.pop()
                    results.append(await one(client, w, r))
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(w.concurrency)))
        wall = time.perf_counter() - t_start
    bar.close()
    return results, wall


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    seen = [r for r in ok if r.ttft == r.ttft]  # NaN where the server does not stream
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in seen if r.output_tokens > 1]
    out_tok = sum(r.output_tokens for r in ok)

    def stats(xs: list[float]) -> dict:
        return {"mean": float(np.mean(xs)) if xs else float("nan"), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99)}

    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.status}: {r.error[:80]}"
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tok / wall, "output_tokens": out_tok,
        "ttft_s": stats([r.ttft for r in seen]), "tpot_s": stats(tpot), "e2e_s": stats([r.e2e for r in ok]),
        "errors": errors,
    }


def markdown(name: str, s: dict) -> str:
    rows = [f"### {name}", "", f"{s['ok']}/{s['requests']} ok in {s['wall_s']:.1f} s: "
            f"**{s['requests_per_s']:.2f} req/s**, **{s['output_tokens_per_s']:.1f} output tok/s**", "",
            "| metric | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for k, label in (("ttft_s", "TTFT (s)"), ("tpot_s", "time per output token (s)"), ("e2e_s", "end-to-end (s)")):
        v = s[k]
        rows.append(f"| {label} | {v['mean']:.3f} | {v['p50']:.3f} | {v['p90']:.3f} | {v['p99']:.3f} |")
    if s["errors"]:
        rows += ["", "errors: " + "; ".join(f"{k} x{v}" for k, v in s["errors"].items())]
    return "\n".join(rows) + "\n"


def plots(results: list[Result], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    t0 = min((r.start for r in ok), default=0.0)
    ax[0].scatter([r.start - t0 for r in ok], [r.e2e for r in ok], s=6)
    ax[0].set(xlabel="request start (s)", ylabel="end-to-end latency (s)", title="latency over the run")
    ax[1].hist([r.ttft for r in ok if r.ttft == r.ttft], bins=40)
    ax[1].set(xlabel="TTFT (s)", ylabel="requests", title="time to first token")
    tp = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.ttft == r.ttft]
    ax[2].hist(tp, bins=40)
    ax[2].set(xlabel="s per output token", ylabel="requests", title="time per output token")
    fig.suptitle(title)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(out: Path, name: str, w: Workload, results: list[Result], wall: float) -> dict:
    s = summarize(results, wall)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"name": name, "workload": asdict(w), "summary": s,
                                                    "results": [asdict(r) for r in results]}, indent=1))
    out.with_suffix(".md").write_text(markdown(name, s))
    plots(results, out, name)
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--adapters", default="", help="comma-separated ids; 'none' for the base model")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second; omit for closed loop")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--prompt-words", default="16,64")
    ap.add_argument("--output-tokens", default="32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--endpoint", default="generate")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_results/load"))
    a = ap.parse_args(argv)
    names = [None if x in ("", "none") else x for x in a.adapters.split(",")] if a.adapters else [None]
    w = Workload(a.requests, a.rate, a.concurrency, names, a.popularity, a.zipf_s,
                 tuple(int(x) for x in a.prompt_words.split(",")), tuple(int(x) for x in a.output_tokens.split(",")),  # type: ignore[arg-type]
                 a.seed, a.endpoint, not a.no_stream)
    results, wall = asyncio.run(run(a.url, w))
    s = write(a.out, a.out.name, w, results, wall)
    print(markdown(a.out.name, s))


if __name__ == "__main__":
    main()
