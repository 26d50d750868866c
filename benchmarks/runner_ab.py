"""The bare model's decode step through this tree's ModelRunner against another commit's, in one process.

    .venv/bin/python -m benchmarks.runner_ab --rev 6604a73          # the embedded SmolLM2, float32

The other commit's `server` package is extracted with `git archive` into a temporary folder and imported
as `server_base` (every import inside the package is relative). Both runners serve the same model object;
their decode steps are interleaved, old and new in turn and the order swapped every step, so the
machine's drift (large on a shared CPU: +-15% from one process to the next) hits both alike. Printed per
batch size: each side's median step time and the median of the per-step ratios this / base.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def base_package(rev: str, into: Path) -> Any:
    """Import `server` as it is at commit `rev`, as the package `server_base`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "server"], check=True,
                             capture_output=True).stdout
    tar = into / "base.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    (into / "server").rename(into / "server_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("server_base")


def paired(runners: dict[str, tuple[Any, Any]], batch: int, prompt: int, steps: int) -> dict[str, list[float]]:
    """Seconds per decode step of each runner, the steps interleaved (order swapped every step)."""
    def extra(r: Any, start: int) -> dict[str, int]:  # a runner from before pages takes the rows' shared start
        return {"start0": start} if hasattr(r.cache, "fit") else {}

    for r, plan in runners.values():
        if hasattr(r.cache, "fit"):
            r.cache.fit(batch, prompt + steps + 1, 0, 0)
        r.forward(torch.randint(0, 100, (batch, prompt)), start=torch.zeros(batch, dtype=torch.long),
                  lengths=torch.full((batch,), prompt), row0=0, plan=plan, kv_len=prompt, **extra(r, 0))
    tok = torch.randint(0, 100, (batch, 1))
    out: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for s in range(steps):
        for name in names if s % 2 == 0 else names[::-1]:
            r, plan = runners[name]
            t0 = time.perf_counter()
            r.forward(tok, start=torch.full((batch,), prompt + s), lengths=torch.ones(batch, dtype=torch.long), row0=0,
                      plan=plan, kv_len=prompt + s + 1, **extra(r, prompt + s))
            out[name].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the commit to compare against")
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-native", action="store_true", help="this tree's decode attention by the gather, not the CPU kernel")
    ap.add_argument("--out", default=None, help="a JSON file to merge the results into (loadtests/results/prefix.json)")
    ap.add_argument("--key", default="decode", help="the entry of --out they replace")
    a = ap.parse_args(argv)
    from server.adapters.slots import BatchPlan
    from server.engine.model_loader import embedded_folder
    from server.engine.model_runner import ModelRunner

    torch.set_num_threads(a.threads)
    folder = a.model or str(embedded_folder(Path(".cache/models")))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_package(a.rev, Path(tmp))
        base_runner = importlib.import_module(base.__name__ + ".engine.model_runner").ModelRunner
        base_plan = importlib.import_module(base.__name__ + ".adapters.slots").BatchPlan
        for batch in (int(b) for b in a.batches.split(",")):
            runners = {"base": (base_runner(model, batch, 1024), base_plan((), [])),
                       "this": (ModelRunner(model, batch, 1024, native=not a.no_native), BatchPlan((), []))}
            t = {k: v[4:] for k, v in paired(runners, batch, a.prompt, a.steps).items()}  # 4 warm-up steps
            ratio = statistics.median(n / o for n, o in zip(t["this"], t["base"], strict=True))
            results[str(batch)] = {"base_ms": 1000 * statistics.median(t["base"]),
                                   "this_ms": 1000 * statistics.median(t["this"]), "ratio": ratio}
            sys.stdout.write(f"batch {batch}: {a.rev} {results[str(batch)]['base_ms']:.2f} ms/step, this tree "
                             f"{results[str(batch)]['this_ms']:.2f} ms/step; median ratio this/{a.rev} {ratio:.4f} "
                             f"over {len(t['this'])} paired steps\n")
    if a.out:
        cmd = f"python -m benchmarks.runner_ab --rev {a.rev} --steps {a.steps} --prompt {a.prompt} --batches {a.batches}"
        note = (f"Float32, bare model, prompt {a.prompt} then {a.steps} steps (contexts {a.prompt} to {a.prompt + a.steps}), "
                f"steps of both interleaved in one process: `{cmd}`.")
        out = Path(a.out)
        old = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**old, a.key: {"note": note, "rev": a.rev, "batches": results}}, indent=1))
    return results


if __name__ == "__main__":
    main()
