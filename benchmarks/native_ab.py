"""The adapters' native CPU kernels against their PyTorch paths, interleaved in one process
(`python -m benchmarks.native_ab --kinds seq_bn,seq_bn --batch 16`).

The embedded SmolLM2 in bfloat16 (`--dtype`), one synthetic adapter per kind in `--kinds` (rows cycle over
them), a static batch decoding: rounds of bare, adapters with the native kernels, adapters with every
method's kernel switched off (the PyTorch ops), each round `--steps` decode steps, `--rounds` rounds, best
of each (this machine's speed drifts between runs by more than the differences measured, so the three
cases alternate in one process). Prints tokens/s and each case's milliseconds a step over bare.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any


def demo_engine(kinds: list[str], dtype: str) -> tuple[Any, list[list[int]]]:
    """The embedded SmolLM2 in `dtype` on the CPU, an engine over it (never folding adapters), and one synthetic
    adapter per kind resident as m0, m1, ...; with the benchmark prompts' token ids."""
    from benchmarks.bench import PROMPTS, make_engine
    from server.adapters.methods import write_demo
    from server.config import ModelConfig
    from server.engine.model_loader import load_base_model
    from server.threads import on_own_thread

    loaded = on_own_thread(lambda: load_base_model(ModelConfig("smollm2", "cpu", dtype, Path(".cache/models"))))  # type: ignore[arg-type]
    eng = make_engine(loaded, Path(tempfile.mkdtemp()) / "store", merge="never")
    src = Path(tempfile.mkdtemp())
    for i, kind in enumerate(kinds):
        folder = write_demo(kind, src / f"m{i}", loaded.model.config, seed=i)
        on_own_thread(lambda i=i, folder=folder: eng.registry.add_folder(f"m{i}", folder))
    return eng, [eng.tokenizer(p).input_ids for p in PROMPTS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="seq_bn,seq_bn", help="synthetic adapter kinds (write_demo), comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from benchmarks.bench import decode_rate

    kinds = args.kinds.split(",")
    eng, prompts = demo_engine(kinds, args.dtype)
    kernels = {name: m._kernel for name, m in eng.slots.methods.items() if getattr(m, "_kernel", None) is not None}

    def native(on: bool) -> None:
        for name, k in kernels.items():
            eng.slots.methods[name]._kernel = k if on else None  # type: ignore[attr-defined]
        eng.slots._plans.clear()  # plans hold the kernel they were built with

    def run(adapters: list[str | None], steps: int) -> float:
        return decode_rate(eng, prompts, adapters, steps + 1)

    bare: list[str | None] = [None] * args.batch
    rows: list[str | None] = [f"m{i % len(kinds)}" for i in range(args.batch)]
    res: dict[str, list[float]] = {"bare": [], "native": [], "pytorch": []}
    run(bare, 4)
    run(rows, 4)
    for _ in range(args.rounds):
        res["bare"].append(run(bare, args.steps))
        native(True)
        res["native"].append(run(rows, args.steps))
        native(False)
        res["pytorch"].append(run(rows, args.steps))
    native(True)
    b = max(res["bare"])
    line = [f"batch {args.batch}, {args.kinds} ({args.dtype}; kernels: {', '.join(kernels) or 'none'}): bare {b:.1f} tok/s"]
    for case in ("native", "pytorch"):
        v = max(res[case])
        line.append(f"{case} {v:.1f} ({v / b:.3f} of bare, +{1000 * args.batch * (1 / v - 1 / b):.2f} ms a step)")
    sys.stdout.write("; ".join(line) + "\n")


if __name__ == "__main__":
    main()
