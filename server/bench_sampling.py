"""What per-row decoding features cost a decode step (`python -m server.bench_sampling`): 16 rows of the
embedded model decoding together, with 0, 1 and 16 of them held to a JSON schema (structured output),
and with all 16 under repetition, frequency and presence penalties and a logit bias, against 16 plain
rows. Steps are timed back to back, configurations interleaved, the median of each kept. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .bench import PROMPTS, make_engine
from .config import ModelConfig
from .engine.engine import Engine
from .engine.model_loader import LoadedModel, load_base_model
from .engine.types import GenerationRequest, GenerationResult, SamplingParams

# a schema a 64-token answer cannot finish (so every row runs every step): a list of at least 40 records
RECORDS = json.dumps({"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}})
PLAIN = SamplingParams(max_new_tokens=64, ignore_eos=True)
CASES: dict[str, list[SamplingParams]] = {
    "plain": [PLAIN] * 16,
    "1 JSON-schema row": [SamplingParams(max_new_tokens=64, ignore_eos=True, grammar=("json_schema", RECORDS))] + [PLAIN] * 15,
    "16 JSON-schema rows": [SamplingParams(max_new_tokens=64, ignore_eos=True, grammar=("json_schema", RECORDS))] * 16,
    "16 rows with penalties and a bias": [SamplingParams(max_new_tokens=64, ignore_eos=True, presence_penalty=0.5,
                                                         frequency_penalty=0.5, repetition_penalty=1.2,
                                                         logit_bias=((13, 2.0), (42, -2.0)))] * 16,
}


def step_times(eng: Engine, loaded: LoadedModel, params: list[SamplingParams], skip: int = 4) -> list[float]:
    """Seconds of each decode step of one batch (all rows admitted and prefilled first)."""
    done: list[object] = []
    tok = loaded.tokenizer
    for i, p in enumerate(params):
        ids = tuple(tok(PROMPTS[i % len(PROMPTS)]).input_ids)
        eng.submit(GenerationRequest(f"r{i}", ids, None, p),
                   lambda ev: done.append(ev) if isinstance(ev, (GenerationResult, Exception)) else None)
    eng.step()  # admit and prefill
    out = []
    while len(done) < len(params):
        t0 = time.perf_counter()
        eng.step()
        out.append(time.perf_counter() - t0)
    bad = [d for d in done if not isinstance(d, GenerationResult)]
    if bad:
        raise RuntimeError(f"benchmark requests failed: {bad[:2]}")
    return out[skip:-1]  # the last step only finishes rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench_results/sampling.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_base_model(ModelConfig(args.model, "auto", "auto"))
    eng = make_engine(loaded, Path(tempfile.mkdtemp()) / "store")
    for params in CASES.values():  # warm: grammars compiled, code paths run once
        step_times(eng, loaded, params)
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.rounds):
        for k, params in CASES.items():
            times[k] += step_times(eng, loaded, params)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain"]
    report: dict[str, Any] = {
        "model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype), "batch": 16,
        "torch_threads": torch.get_num_threads(), "steps_per_case": {k: len(v) for k, v in times.items()},
        "median_step_ms": {k: v * 1e3 for k, v in med.items()},
        "overhead": {k: v / base - 1 for k, v in med.items() if k != "plain"},
        "command": "python -m server.bench_sampling " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for k, v in med.items():
        sys.stdout.write(f"{k:40s} {v * 1e3:7.2f} ms  {'' if k == 'plain' else f'{(v / base - 1) * 100:+.1f}%'}\n")


if __name__ == "__main__":
    main()
