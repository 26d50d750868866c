"""Why torch work off the engine thread runs on threads that end (server/threads.py): the same bfloat16
products at batch 1 (SmolLM2's gate/up shape, 60 of them), timed on the thread that made the tensors,
on a second thread while the first one lives on with its OpenMP team, and on one new thread that does
everything; then on the main thread after a request-like pooled thread parsed an adapter from disk (and
kept an OpenMP team), against after that parse ran on a thread that ended, as the registry runs it. Each
case in its own process, best of five rounds of ten.

    .venv/bin/python -m benchmarks.omp_teams
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

CASES = {"main": "made and run on the main thread", "second": "made on the main thread, run on a second one",
         "own": "made and run on one new thread",
         "pooled-parse": "on the main thread, after an adapter was parsed on a pooled thread that lives on",
         "own-parse": "on the main thread, after an adapter was parsed on a thread that ended (the registry's way)"}


def _bench(W: list[torch.Tensor], x: torch.Tensor) -> float:
    for _ in range(3):
        for w in W:
            torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            for w in W:
                torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t0) / 10)
    return best * 1e3


def _make() -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.randn(3072, 576).bfloat16() for _ in range(60)], torch.randn(1, 576).bfloat16()


def child(case: str) -> float:
    out: list[float] = []
    if case == "main":
        out.append(_bench(*_make()))
    elif case == "second":
        W, x = _make()
        t = threading.Thread(target=lambda: out.append(_bench(W, x)))
        t.start()
        t.join()
    elif case == "own":
        t = threading.Thread(target=lambda: out.append(_bench(*_make())))
        t.start()
        t.join()
    else:  # a request thread that reads an adapter from disk (Registry.acquire), then the engine's products
        from concurrent.futures import ThreadPoolExecutor

        from server.threads import on_own_thread

        W, x = _make()
        parse = _adapter_parse()
        pool = ThreadPoolExecutor(1)  # as asyncio's: its thread lives on
        pool.submit(parse if case == "pooled-parse" else lambda: on_own_thread(parse)).result()
        out.append(_bench(W, x))
    return out[0]


def _adapter_parse():  # noqa: ANN202
    """A parse of a rank-64 PEFT LoRA on every Linear of a 4-layer model of hidden size 2,048."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig

    from server.adapters.formats import parse_adapter
    from server.adapters.spec import BaseModelInfo
    from server.adapters.synth import linear_dims_from_config, write_peft_lora

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=1000)
    folder = write_peft_lora(Path(tempfile.mkdtemp()), cfg.num_hidden_layers, linear_dims_from_config(cfg), r=64)
    base = BaseModelInfo.from_model(AutoModelForCausalLM.from_config(cfg))
    return lambda: parse_adapter({p.name: p for p in folder.iterdir()}, base)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.stdout.write(f"{child(sys.argv[2])}\n")
        return
    for _ in range(2):
        for case, what in CASES.items():
            ms = float(subprocess.run([sys.executable, "-m", "benchmarks.omp_teams", "--child", case],
                                      capture_output=True, text=True, check=True).stdout)
            sys.stdout.write(f"{what}: {ms:.2f} ms\n")


if __name__ == "__main__":
    main()
