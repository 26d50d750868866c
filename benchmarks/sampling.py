"""What per-row decoding features cost a decode step (`python -m benchmarks.sampling`): 16 rows of the
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

from benchmarks.bench import PROMPTS, make_engine
from server.config import ModelConfig
from server.engine.engine import Engine
from server.engine.model_loader import LoadedModel, load_base_model
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams

# a schema a 64-token answer cannot finish (so every row runs every step): a list of at least 40 records
RECORDS = json.dumps({"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}})


def cases(batch: int = 16, new: int = 64) -> dict[str, list[SamplingParams]]:
    """The configurations, `batch` rows of `new` tokens each (the labels name the default batch of 16)."""
    plain = SamplingParams(max_new_tokens=new, ignore_eos=True)
    schema = SamplingParams(max_new_tokens=new, ignore_eos=True, grammar=("json_schema", RECORDS))
    return {
        "plain": [plain] * batch,
        "1 JSON-schema row": [schema] + [plain] * (batch - 1),
        "16 JSON-schema rows": [schema] * batch,
        "16 rows with penalties and a bias": [SamplingParams(max_new_tokens=new, ignore_eos=True, presence_penalty=0.5,
                                                             frequency_penalty=0.5, repetition_penalty=1.2,
                                                             logit_bias=((13, 2.0), (42, -2.0)))] * batch,
    }


CASES = cases()


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
    ap.add_argument("--batch", type=int, default=16, help="rows decoding together")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--out", type=Path, default=Path("bench_results/sampling.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_base_model(ModelConfig(args.model, "auto", "auto"))
    eng = make_engine(loaded, Path(tempfile.mkdtemp()) / "store")
    configs = cases(args.batch, args.new)
    for params in configs.values():  # warm: grammars compiled, code paths run once
        step_times(eng, loaded, params)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for k, params in configs.items():
            times[k] += step_times(eng, loaded, params)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain"]
    report: dict[str, Any] = {
        "model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype), "batch": args.batch,
        "torch_threads": torch.get_num_threads(), "steps_per_case": {k: len(v) for k, v in times.items()},
        "median_step_ms": {k: v * 1e3 for k, v in med.items()},
        "overhead": {k: v / base - 1 for k, v in med.items() if k != "plain"},
        "command": "python -m benchmarks.sampling " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for k, v in med.items():
        sys.stdout.write(f"{k:40s} {v * 1e3:7.2f} ms  {'' if k == 'plain' else f'{(v / base - 1) * 100:+.1f}%'}\n")


if __name__ == "__main__":
    main()
