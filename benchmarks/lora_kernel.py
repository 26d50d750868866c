"""The native LoRA kernel alone (server/kernels/lora_rows.cpp), as a decode step calls it on SmolLM2's
shapes: 120 calls (30 layers x q/k/v, o, gate/up, down) with every layer's blocks distinct, so the
blocks come from memory as in a step, not from cache.

    .venv/bin/python -m benchmarks.lora_kernel --adapters 8 --rows 16 --rank 16

Rows cycle over the adapters (row i: adapter i % adapters), bfloat16 inputs and outputs. Prints the best
time of a step's calls over --rounds rounds of three, and the blocks' bytes over that time.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import torch

from server import kernels
from server.adapters.methods.lora import LORA_ROWS

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30
GROUPS = [((HIDDEN, KV, KV), HIDDEN), ((HIDDEN,), HIDDEN), ((INTER, INTER), HIDDEN), ((HIDDEN,), INTER)]  # outs, in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    kernel = kernels.load("lora_rows", LORA_ROWS)
    if kernel is None:
        raise SystemExit(f"no kernel: {kernels.errors.get('lora_rows')}")
    keep: list[torch.Tensor] = []
    calls = []
    nbytes = 0
    for _ in range(LAYERS):
        for outs, inp in GROUPS:
            vals = [len(outs), a.adapters]
            for o in outs:
                vals += [o, 0]
                for _ in range(a.adapters):
                    A, sB = torch.randn(a.rank, inp), torch.randn(a.rank, o)
                    keep += [A, sB]
                    nbytes += (A.numel() + sB.numel()) * 4
                    vals += [A.data_ptr(), sB.data_ptr(), a.rank, 0, 0]
            x = torch.randn(a.rows, inp).bfloat16()
            ys = [torch.randn(a.rows, o).bfloat16() for o in outs]
            keep += [x, *ys]
            yv = [v for y in ys for v in (y.data_ptr(), y.stride(0))]
            calls.append((inp, x.data_ptr(), (ctypes.c_int64 * len(vals))(*vals), (ctypes.c_int64 * len(yv))(*yv)))
    loc = torch.tensor([i % a.adapters for i in range(a.rows)])
    threads = torch.get_num_threads()
    best = float("inf")
    for _ in range(a.rounds * 3):
        t0 = time.perf_counter()
        for inp, x, mods, ys in calls:
            kernel(a.rows, 1, inp, x, 1, inp, loc.data_ptr(), mods, ys, 1, threads)
        best = min(best, time.perf_counter() - t0)
    sys.stdout.write(f"{a.rows} rows over {a.adapters} rank-{a.rank} LoRAs, {len(calls)} calls, {threads} threads: "
                     f"{best * 1e3:.2f} ms a step, {nbytes / 1e6:.1f} MB of blocks, {nbytes / best / 1e9:.1f} GB/s\n")


if __name__ == "__main__":
    main()
