"""Decode steps replayed from CUDA graphs.

An eager decode step launches a few thousand small kernels; on a GPU the step is then bound by launch
overhead, not by reading the weights. Here a decode step of fixed shape is captured once and replayed:

- shapes are fixed by a batch bucket (rows, padded up) and a KV length bucket (a power of two that
  covers every row's position); rows past the real batch are padding: token 0 written at the last
  position of a cache row past the running ones. No row ever reads a position it has not written
  itself first (a row writes position p in the step that reads up to p), so even the row of a prompt
  part-way through chunked prefill is safe;
- inputs live in one static buffer [4, rows]: token ids, cache positions, adapter slots and rotary
  positions (they differ for rows with an AdapterHub prefix), filled by one copy;
- the KV cache is static (it never moves) and adapter slot tables are written in place, so a replay
  sees the current weights of every slot; adapters are routed by the slot buffer inside the graph, so
  one graph serves every mix of slots of the methods in its key;
- a graph exists per (batch bucket, KV bucket, methods in use with their storage layout); a method
  without a static plan (or a layout change not yet captured) runs that batch eagerly.

On a CPU there is nothing to capture: the same fixed-shape step runs eagerly (tests use this to prove
the static step equals the dynamic one).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..adapters.slots import AdapterSlots
from .kv_cache import pow2
from .model_runner import ModelRunner

log = logging.getLogger(__name__)
GraphKey = tuple[int, int, tuple[tuple[str, int], ...]]


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 32, then of 16: padding wastes at most ~1/3 of a step."""
    out = [b for b in (1, 2, 4, 8) if b < max_rows]
    b = 8
    while b < max_rows:
        b += 8 if b < 32 else 16
        out.append(min(b, max_rows))
    out.append(max_rows)
    return sorted(set(out))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, slots: AdapterSlots, capture: bool, min_kv: int = 64) -> None:
        if not runner.cache.static:
            raise ValueError("graph replay needs a static KV cache")
        self.runner, self.slots, self.capture = runner, slots, capture
        self.rows = runner.cache.rows
        self.max_len = runner.cache.max_len
        self.buckets = batch_buckets(self.rows)
        self.min_kv = min(min_kv, self.max_len)
        self.inputs = torch.zeros(4, self.rows, dtype=torch.long, device=runner.device)  # ids, pos, slot, rope pos
        self._host = torch.zeros(4, self.rows, dtype=torch.long, pin_memory=capture)
        self.graphs: dict[GraphKey, tuple[Any, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = self.eager_steps = 0

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def kv_bucket(self, needed: int) -> int:
        return min(pow2(needed, self.min_kv), self.max_len)

    def kv_buckets(self) -> list[int]:
        out, n = [], self.min_kv
        while True:
            out.append(self.kv_bucket(n))
            if n >= self.max_len:
                return out
            n *= 2

    def key(self, slots: list[int], max_pos: int) -> GraphKey | None:
        methods = self.slots.graph_key(slots)
        if methods is None:
            return None
        return self.bucket(len(slots)), self.kv_bucket(max_pos + 1), methods

    def _step(self, key: GraphKey) -> torch.Tensor:
        B, kv_len, methods = key
        ids, pos, slot_idx, rope_pos = self.inputs[0, :B], self.inputs[1, :B], self.inputs[2, :B], self.inputs[3, :B]
        plan = self.slots.static_plan(slot_idx, methods)
        return self.runner.decode_static(ids[:, None], pos, plan, kv_len, rope_pos)

    def run(self, tokens: list[int], positions: list[int], slots: list[int], key: GraphKey,
            rope_positions: list[int] | None = None) -> torch.Tensor:
        """Logits [len(tokens), V] of one decode step of rows 0..n-1 (graph key from `key`); rotary
        positions default to the cache positions."""
        n, B = len(tokens), key[0]
        host = self._host
        host[:, :B] = 0
        host[1, n:B] = host[3, n:B] = self.max_len - 1  # padding writes only the last position of free rows (see the docstring)
        host[0, :n] = torch.tensor(tokens)
        host[1, :n] = torch.tensor(positions)
        host[2, :n] = torch.tensor(slots)
        host[3, :n] = torch.tensor(positions if rope_positions is None else rope_positions)
        self.inputs[:, :B].copy_(host[:, :B], non_blocking=True)
        if not self.capture:
            self.eager_steps += 1
            return self._step(key)[:n]
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key)
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out[:n]

    def _capture(self, key: GraphKey) -> tuple[Any, torch.Tensor]:
        """Warm up on a side stream (this runs the real step: it writes the same K/V the replay will),
        then capture into the shared memory pool."""
        t0 = time.perf_counter()
        self._drop_stale()
        timer = self.slots.timer
        was, timer.enabled = timer.enabled, False  # timing events cannot live inside a graph
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(key)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._step(key)
        finally:
            timer.enabled = was
        self.graphs[key] = (graph, out)
        dt = time.perf_counter() - t0
        log.debug("captured decode graph %s in %.3f s", key, dt)
        return graph, out

    def _drop_stale(self) -> None:
        """Forget graphs captured over a method storage layout that has since been replaced."""
        now = {n: m.layout_version for n, m in self.slots.methods.items()}
        self.graphs = {k: v for k, v in self.graphs.items() if all(now[n] == ver for n, ver in k[2])}

    def warmup(self, kv_lens: list[int] | None = None) -> float:
        """Capture the bare model's graphs for every batch bucket (and the given KV buckets, by default
        all of them) before serving. Returns the seconds spent. Every row is padding: only free rows are written."""
        if not self.capture:
            return 0.0
        t0 = time.perf_counter()
        lens = kv_lens or self.kv_buckets()
        self.inputs.zero_()
        self.inputs[1] = self.inputs[3] = self.max_len - 1
        for B in reversed(self.buckets):  # largest first: the pool then fits every smaller graph
            for kv in lens:
                if (B, kv, ()) not in self.graphs:
                    self._capture((B, kv, ()))
        torch.cuda.synchronize()
        return time.perf_counter() - t0
