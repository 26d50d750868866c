"""The engine alone (its own thread, clients as threads, no HTTP) under the serving table's load: N clients,
each sending requests of 128 random token ids one after another, 64 new tokens each (ignore_eos), for
the bare model or eight rank-16 LoRAs on every Linear drawn at random per request. Prints output
tokens per second and the median TTFT; comparing it with `loadtests/cpu_serving.py` over HTTP separates
the engine's cost from the serving path's.

    .venv/bin/python -m benchmarks.engine_mix --adapters lora     # or: --adapters one, --adapters none
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.prefix import adapters, ask, build
from server.config import ModelConfig
from server.engine.model_loader import load_base_model
from server.threads import on_own_thread


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", choices=["lora", "one", "none"], default="lora", help="8 LoRAs, one of them, none")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"

        def setup() -> tuple[Any, list[str | None]]:  # on a thread that ends, as the server loads (server/threads.py)
            loaded = load_base_model(ModelConfig())
            names: list[str | None] = list(adapters(loaded, store, ("lora16",) * 8))
            return build("server", loaded, store), names

        e, names = on_own_thread(setup)
        use = {"lora": names, "one": names[:1], "none": [None]}[a.adapters]
        e.start()
        rng = random.Random(0)

        def client(c: int) -> list:
            return [ask(e, f"r{c}-{k}", tuple(rng.randint(100, 30000) for _ in range(128)), rng.choice(use), 64)
                    for k in range(a.requests)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            res = [r for rs in pool.map(client, range(a.clients)) for r in rs]
        wall = time.perf_counter() - t0
        e.stop()
    out = {"output_tok_s": sum(len(r.token_ids) for r in res) / wall,
           "ttft_p50_s": statistics.median(r.timings.time_to_first_token_seconds for r in res)}
    sys.stdout.write(f"{a.adapters}, {a.clients} clients: {out['output_tok_s']:.1f} output tok/s, "
                     f"TTFT p50 {out['ttft_p50_s']:.2f} s\n")
    return out


if __name__ == "__main__":
    main()
