"""Why torch work off the engine thread runs on threads that end (server/threads.py): the same bfloat16
products at batch 1 (SmolLM2's gate/up shape, 60 of them), timed on the thread that made the tensors,
on a second thread while the first one lives on with its OpenMP team, and on one new thread that does
everything. Each case in its own process, best of five rounds of ten.

    .venv/bin/python -m benchmarks.omp_teams
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

CASES = {"main": "made and run on the main thread", "second": "made on the main thread, run on a second one",
         "own": "made and run on one new thread"}


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
    else:
        t = threading.Thread(target=lambda: out.append(_bench(*_make())))
        t.start()
        t.join()
    return out[0]


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
