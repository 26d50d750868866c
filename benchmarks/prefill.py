"""Prefill on the CPU against the model's own products: prompt tokens per second of one request of L
random tokens through the engine (time to its first token: embedding, every layer with its attention,
masks, casts and copies, the last position's logits, sampling), against the same model's Linear
products alone for the same L tokens (every decoder Linear as the engine runs it, q/k/v and gate/up
packed, in the model's dtype, then the LM head on the last position), timed in the same process.
Best of three each; random prompts, so the prefix cache never serves one.

    .venv/bin/python -m benchmarks.prefill            # --lengths 128,512,1000,2048 --dtype bfloat16
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
import torch.nn.functional as F

from server.adapters.registry import Registry
from server.adapters.spec import BaseModelInfo
from server.adapters.store import AdapterStore
from server.config import EngineConfig, ModelConfig, RegistryConfig
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from server.metrics import Metrics
from server.threads import on_own_thread


def products(model: Any, L: int, dtype: torch.dtype) -> float:
    """Seconds for the decoder's Linear products over L tokens (sibling projections packed, as the
    engine runs them) and the LM head over the last token."""
    inner = model.model
    groups: list[torch.Tensor] = []
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        groups.append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        groups.append(a.o_proj.weight)
        groups.append(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
        groups.append(m.down_proj.weight)
    head = model.get_output_embeddings().weight
    xs = {w.shape[1]: torch.randn(L, w.shape[1]).to(dtype) for w in groups}

    def once() -> float:
        t0 = time.perf_counter()
        for w in groups:
            F.linear(xs[w.shape[1]], w)
        F.linear(xs[head.shape[1]][-1:], head)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(3))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,512,1000,2048")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None, help="merge the results into this JSON (by dtype)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    lengths = [int(x) for x in a.lengths.split(",")]

    def setup() -> Engine:
        from server.engine.model_loader import load_base_model

        loaded = load_base_model(ModelConfig("smollm2", "cpu", a.dtype))  # type: ignore[arg-type]
        reg = Registry(AdapterStore(Path(tempfile.mkdtemp())), BaseModelInfo.from_model(loaded.model), RegistryConfig(8))
        cfg = EngineConfig(max_batch_size=4, max_model_len=max(lengths) + 16, prefill_token_budget=max(lengths) + 16)
        return Engine(loaded, reg, cfg, Metrics())

    eng = on_own_thread(setup)
    model, dtype = eng.runner.model, eng.runner.dtype
    rng = random.Random(0)
    n = 0

    def prefill(L: int) -> float:
        nonlocal n
        n += 1
        done: list[Any] = []
        eng.submit(GenerationRequest(f"p{n}", tuple(rng.randint(100, 30000) for _ in range(L)), None,
                                     SamplingParams(max_new_tokens=1, ignore_eos=True)),
                   lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
        t0 = time.perf_counter()
        while not done:
            eng.step()
        dt = time.perf_counter() - t0
        if not isinstance(done[0], GenerationResult):
            raise RuntimeError(str(done[0]))
        return dt

    out: dict[str, Any] = {"dtype": a.dtype, "date": time.strftime("%Y-%m-%d"),
                           "command": f"python -m benchmarks.prefill --lengths {a.lengths} --dtype {a.dtype}"}
    with torch.inference_mode():
        for L in lengths:
            prefill(L)
            ours = min(prefill(L) for _ in range(3))
            prod = products(model, L, dtype)
            out[str(L)] = {"prefill_s": ours, "prompt_tok_s": L / ours, "products_s": prod,
                           "products_tok_s": L / prod, "ratio": prod / ours}
            sys.stdout.write(f"{L} tokens: prefill {L / ours:.0f} tok/s ({ours * 1e3:.0f} ms), products alone "
                             f"{L / prod:.0f} tok/s ({prod * 1e3:.0f} ms): {prod / ours:.2f} of the products' speed\n")
    if a.out is not None:
        old = json.loads(a.out.read_text()) if a.out.exists() else {}
        old[a.dtype] = out
        a.out.write_text(json.dumps(old, indent=1))
    return out


if __name__ == "__main__":
    main()
