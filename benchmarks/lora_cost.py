"""What eight LoRAs cost inside the engine on the CPU, against the bare model in the same process: the
decode step (static batches of 1 and 16 rows, best of three runs of 48 steps) and one prefill pass (16
prompts of 128 random tokens), with the time inside the LoRA hooks measured around them. `--no-native`
runs the PyTorch products instead of the native LoRA kernel (server/kernels/lora_rows.cpp; the paged
decode kernel stays). The engine is built on a thread that ends and stepped from this one
(see server/threads.py for why that matters).

    .venv/bin/python -m benchmarks.lora_cost              # or --no-native, --dtype float32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench import PROMPTS
from server import kernels
from server.adapters.methods import lora as lora_method
from server.adapters.methods import write_demo
from server.adapters.registry import Registry
from server.adapters.spec import BaseModelInfo
from server.adapters.store import AdapterStore
from server.config import EngineConfig, ModelConfig, RegistryConfig
from server.engine.engine import Engine
from server.engine.model_loader import load_base_model
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from server.metrics import Metrics
from server.threads import on_own_thread

HOOK = {"s": 0.0, "depth": 0}


def _timed(fn: Any) -> Any:
    """The LoRA plan's hook, timed from its outermost call (linear_out may call linear_out_group)."""

    def wrapped(self: Any, *a: Any) -> Any:
        if HOOK["depth"]:
            return fn(self, *a)
        HOOK["depth"], t0 = 1, time.perf_counter()
        try:
            return fn(self, *a)
        finally:
            HOOK["s"] += time.perf_counter() - t0
            HOOK["depth"] = 0

    return wrapped


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-native", action="store_true", help="PyTorch's products for the LoRA deltas")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", type=Path, default=None, help="merge the results into this JSON (by dtype and path)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.no_native:  # only the LoRA kernel: the paged decode kernel and packed projections stay
        load = kernels.load
        kernels.load = lambda name, *x: None if name == "lora_rows" else load(name, *x)  # type: ignore[assignment]
    lora_method.LoRAPlan.linear_out = _timed(lora_method.LoRAPlan.linear_out)  # type: ignore[method-assign]
    lora_method.LoRAPlan.linear_out_group = _timed(lora_method.LoRAPlan.linear_out_group)  # type: ignore[method-assign]

    def setup() -> tuple[Engine, Any]:
        loaded = load_base_model(ModelConfig("smollm2", "cpu", a.dtype))  # type: ignore[arg-type]
        reg = Registry(AdapterStore(Path(tempfile.mkdtemp())), BaseModelInfo.from_model(loaded.model), RegistryConfig(64))
        for i in range(8):
            reg.add_folder(f"m{i}", write_demo("lora16", Path(tempfile.mkdtemp()) / f"m{i}", loaded.model.config, seed=i))
        cfg = EngineConfig(max_batch_size=32, max_model_len=1024, merge_policy="never", device_slots=16)
        return Engine(loaded, reg, cfg, Metrics()), loaded.tokenizer

    eng, tok = on_own_thread(setup)
    prompts = [tok(p).input_ids for p in PROMPTS]
    rng = random.Random(0)
    n = 0

    def submit(B: int, use: bool, ids: Any, new: int) -> list[Any]:
        nonlocal n
        done: list[Any] = []
        for i in range(B):
            n += 1
            eng.submit(GenerationRequest(f"r{n}", tuple(ids(i)), f"m{i % 8}" if use else None,
                                         SamplingParams(max_new_tokens=new, ignore_eos=True)),
                       lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
        return done

    def decode(B: int, use: bool, new: int) -> tuple[float, float]:
        """(tok/s, hook ms per step) of B rows decoding together."""
        done = submit(B, use, lambda i: prompts[i % len(prompts)], new)
        eng.step()  # admit and prefill
        HOOK["s"], t0, steps = 0.0, time.perf_counter(), 0
        while len(done) < B:
            eng.step()
            steps += 1
        dt = time.perf_counter() - t0
        return B * (steps - 1) / dt, 1e3 * HOOK["s"] / steps

    def prefill(use: bool) -> tuple[float, float]:
        """(seconds, hook seconds) of one prefill pass of 16 prompts of 128 random tokens."""
        done = submit(16, use, lambda i: [rng.randint(100, 30000) for _ in range(128)], 1)
        HOOK["s"], t0 = 0.0, time.perf_counter()
        eng.step()
        dt, hook = time.perf_counter() - t0, HOOK["s"]
        while len(done) < 16:
            eng.step()
        return dt, hook

    out: dict[str, Any] = {"dtype": a.dtype, "native": not a.no_native}
    for B in [int(b) for b in a.batches.split(",")]:
        decode(B, False, 4), decode(B, True, 4)
        runs = [(decode(B, False, 48), decode(B, True, 48)) for _ in range(3)]
        bare, lora = max(r[0] for r in runs), max((r[1] for r in runs), key=lambda x: x[0])
        out[f"decode batch {B}"] = {"bare_tok_s": bare[0], "lora_tok_s": lora[0], "ratio": lora[0] / bare[0],
                                    "lora_hook_ms_per_step": lora[1]}
    prefill(False), prefill(True)
    runs = [(prefill(False), prefill(True)) for _ in range(3)]
    bare_s, (lora_s, hook_s) = min(r[0][0] for r in runs), min((r[1] for r in runs), key=lambda x: x[0])
    out["prefill 16 x 128"] = {"bare_s": bare_s, "lora_s": lora_s, "ratio": bare_s / lora_s, "lora_hook_s": hook_s}
    for k, v in out.items():
        sys.stdout.write(f"{k}: {v}\n")
    if a.out is not None:
        old = json.loads(a.out.read_text()) if a.out.exists() else {}
        cmd = "python -m benchmarks.lora_cost" + (f" --dtype {a.dtype}" if a.dtype != "bfloat16" else "") + (" --no-native" if a.no_native else "")
        old[f"{a.dtype}, {'native kernel' if not a.no_native else 'PyTorch products'}"] = {
            **out, "date": time.strftime("%Y-%m-%d"), "command": cmd}
        a.out.write_text(json.dumps(old, indent=1))
    return out


if __name__ == "__main__":
    main()
