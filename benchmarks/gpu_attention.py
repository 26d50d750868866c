"""Decode attention on the GPU: the paged kernel (server/kernels/paged_attention.py) against the gathered
pages and SDPA it can replace (`python -m benchmarks.gpu_attention`, on a machine with CUDA).

1. One layer alone, Llama-3.1-8B's attention shapes (32 query heads, 8 K/V heads, head size 128, pages of
   16), every row at the bucket's length: each way captured 20 times in one CUDA graph and replayed,
   microseconds per call, at batch 1, 16 and 64 and KV buckets of 256, 1,024 and 4,096 positions.
2. The engine, bare decode tokens/s with graphs and compiled kernels at batch 1, 16 and 64: the kernel
   against the gathered path, interleaved, best of two.

Writes JSON (`--out`) after every stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu import DEV, build_model, decode_rate, engine_for, free_memory, word_tokenizer
from benchmarks.gpu_lora import graphed_us
from server.engine.kv_cache import DecodeStep, PagedKVCache
from server.engine.model_loader import LoadedModel

log = logging.getLogger(__name__)


def layer_case(B: int, kv: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    H, kvh, d, ps = 32, 8, 128, 16
    pages = B * (kv // ps) + 2
    cache = PagedKVCache(1, kvh, d, pages, ps, dtype, DEV, native=False)
    cache.k.normal_()
    cache.v.normal_()
    tables = torch.arange(1, 1 + B * (kv // ps), device=DEV).view(B, kv // ps)
    step = DecodeStep(tables, torch.full((B,), kv - 1, device=DEV), kv, ps)
    q = torch.randn(B, H, 1, d, device=DEV, dtype=dtype)
    from server.kernels import paged_attention

    ways = {"paged_kernel": lambda: paged_attention.decode(q[:, :, 0], cache.k[0], cache.v[0], step.tables,
                                                           step.lengths, None, d**-0.5),
            "gathered_sdpa": lambda: cache._gathered_decode(0, q, step, None, d**-0.5)}
    want = ways["gathered_sdpa"]().float()[:, :, 0]
    err = (ways["paged_kernel"]().float() - want).abs().max().item()
    row: dict[str, Any] = {"batch": B, "kv": kv, "max_abs_err": err}
    for name, fn in ways.items():
        try:
            row[f"{name}_us"] = graphed_us(fn)
        except Exception as e:
            row[f"{name}_us"] = f"{type(e).__name__}: {e}"[:200]
    return row


def engine_case(name: str, batches: list[int], prompt: int, new: int, res: dict[str, Any], save: Any) -> None:
    model = build_model(name)
    vocab = model.config.vocab_size
    loaded = LoadedModel(model, word_tokenizer(vocab), name, DEV, torch.bfloat16)
    store = Path(tempfile.mkdtemp())
    max_len, max_batch = prompt + new + 8, max(batches)
    engines = {}
    for way, on in (("paged_kernel", True), ("gathered_sdpa", False)):
        PagedKVCache.triton_decode = on
        try:
            engines[way] = eng = engine_for(loaded, store, "on", max_batch, max_len)
        finally:
            PagedKVCache.triton_decode = False
        assert eng.graphs is not None
        with torch.inference_mode():
            res[f"capture_{way}_s"] = eng.graphs.warmup([eng.graphs.kv_bucket(max_len)])
    for B in batches:
        for eng in engines.values():
            decode_rate(eng, [None] * B, prompt, 4, vocab)
        runs: dict[str, list[float]] = {w: [] for w in engines}
        for _ in range(2):
            for way, eng in engines.items():
                runs[way].append(decode_rate(eng, [None] * B, prompt, new, vocab))
        res[f"b{B}"] = {w: max(v) for w, v in runs.items()}
        log.info("%s b%d: %s", name, B, res[f"b{B}"])
        save()
    engines.clear()
    del model, loaded
    free_memory()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="llama-3.1-8b")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--kv", default="256,1024,4096", help="KV buckets of the one-layer stage ('' skips it)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench_results/gpu_attention.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "layer": [], "models": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(out, indent=1))

    batches = [int(b) for b in args.batches.split(",") if b]
    for kv in (int(k) for k in args.kv.split(",") if k):
        for B in batches:
            row = layer_case(B, kv)
            out["layer"].append(row)
            log.info("layer %s", row)
            save()
    for name in filter(None, args.models.split(",")):
        res: dict[str, Any] = {}
        out["models"][name] = res
        engine_case(name, batches, args.prompt, args.new, res, save)
    print(json.dumps(out, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
