"""Decode steps replayed from CUDA graphs.

An eager decode step launches a few thousand small kernels; on a GPU the step is then bound by launch
overhead, not by reading the weights. Here a decode step of fixed shape is captured once and replayed:

- shapes are fixed by a batch bucket (rows, padded up) and a KV length bucket (a power of two that
  covers every row's position); rows past the real batch are padding: their page tables name only the
  zero page, so what they write lands in the cache's sink (kv_cache.py);
- inputs live in static buffers, filled by one copy each: [8, rows + 1] token ids, cache positions,
  adapter slots, rotary positions (they differ for rows with an AdapterHub prefix), each row's index
  among the batch's distinct slots, those distinct slots (padded to a bucket), the rows sorted by
  that index and where each distinct slot's rows start among them (the segments of segmented
  products); and the rows' page tables [rows, pages of a whole context];
- the KV cache's page pool is allocated once (it never moves) and adapter slot tables are written in
  place, so a replay sees the current pages and weights of every row; adapters are routed by the slot buffer inside the graph, so
  one graph serves every mix of slots of the methods in its key;
- a graph exists per (batch bucket, KV bucket, methods in use with their storage layout, bucket of
  distinct slots): the count of distinct slots lets adapter products read each adapter the batch uses
  once (`Routing`); a method without a static plan (or a layout change not yet captured) runs that
  batch eagerly.
- rows whose adapters bring their own embedding and LM head (methods acting only at the two ends of the
  model) replay too: their batch's embeddings are made before the replay into a static buffer the graph
  starts from, and its logits after it from the normed hidden states the graph leaves (each row's own
  head, the bare one run once for the rest); the layers in between, where the cost is, are replayed.

On a CPU there is nothing to capture: the same fixed-shape step runs eagerly (tests use this to prove
the static step equals the dynamic one).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..adapters.methods import Routing, route
from ..adapters.slots import AdapterSlots
from .model_runner import ModelRunner

log = logging.getLogger(__name__)
GraphKey = tuple[int, int, tuple[tuple[str, int], ...], int]  # batch bucket, KV bucket, methods, distinct slots bucket
IDS, POS, SLOT, ROPE, LOCAL, UNIQ, ORDER, STARTS = range(8)  # the rows of the input buffer


def pow2(n: int, floor: int) -> int:
    out = floor
    while out < n:
        out *= 2
    return out


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
    def __init__(self, runner: ModelRunner, slots: AdapterSlots, capture: bool, rows: int, max_len: int,
                 min_kv: int = 64) -> None:
        self.runner, self.slots, self.capture = runner, slots, capture
        self.rows, self.max_len = rows, max_len
        self.buckets = batch_buckets(self.rows)
        self.min_kv = min(min_kv, self.max_len)
        self.inputs = torch.zeros(8, self.rows + 1, dtype=torch.long, device=runner.device)  # see IDS..STARTS
        pages = runner.cache.pages_for(self.kv_bucket(max_len))
        self.tables = torch.zeros(self.rows, pages, dtype=torch.long, device=runner.device)  # [rows, P]: 0 the zero page
        self._host_tables = torch.zeros(self.rows, pages, dtype=torch.long, pin_memory=capture)
        # the input embeddings of a step whose rows' adapters have their own (made before the replay)
        self.embeds = torch.zeros(self.rows, 1, runner.cfg.hidden_size, dtype=runner.dtype, device=runner.device)
        self._host = torch.zeros(8, self.rows + 1, dtype=torch.long, pin_memory=capture)
        self.ident = torch.arange(self.rows + 1, device=runner.device)  # constant: every row its own segment
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
        B = self.bucket(len(slots))
        # the bare model, and methods acting only at the ends (outside the step), route nothing inside it
        uniq = min(pow2(len(set(slots)), 1), B) if self.slots.routed(methods) else 0
        return B, self.kv_bucket(max_pos + 1), methods, uniq

    def _step(self, key: GraphKey) -> torch.Tensor:
        B, kv_len, methods, U = key
        x = self.inputs
        U = max(U, 1)
        routing = Routing(slots=x[SLOT, :B], uniq=x[UNIQ, :U], local=x[LOCAL, :B], order=x[ORDER, :B],
                          starts=x[STARTS, :U + 1], ident=self.ident[:B + 1])
        plan = self.slots.static_plan(routing, methods)
        if self.slots.ends(methods):  # embeddings in, normed hidden states out: the ends run outside
            return self.runner.decode_static(x[IDS, :B, None], x[POS, :B], plan, kv_len, self.tables[:B], x[ROPE, :B],
                                             embeds=self.embeds[:B], head=False)
        return self.runner.decode_static(x[IDS, :B, None], x[POS, :B], plan, kv_len, self.tables[:B], x[ROPE, :B])

    def fill(self, tokens: list[int], positions: list[int], slots: list[int], key: GraphKey,
             tables: list[list[int]], rope_positions: list[int] | None = None) -> None:
        """Write one step's inputs for rows 0..n-1 into the static buffers (rotary positions default to
        the cache positions); rows n..B-1 are padding, their tables all the zero page."""
        n, B = len(tokens), key[0]
        host, ht = self._host, self._host_tables
        host[:, :B + 1] = 0
        ht[:B] = 0
        P = self.runner.cache.pages_for(key[1])
        for i, t in enumerate(tables):
            ht[i, : min(len(t), P)] = torch.tensor(t[:P])
        self.tables[:B].copy_(ht[:B], non_blocking=True)
        host[IDS, :n] = torch.tensor(tokens)
        host[POS, :n] = torch.tensor(positions)
        host[SLOT, :n] = torch.tensor(slots)
        host[ROPE, :n] = torch.tensor(positions if rope_positions is None else rope_positions)
        U = max(key[3], len(set(slots)))  # a bare-model key routes nothing; its buffers are still well formed
        uniq, local, order, starts = route(slots, U)
        host[LOCAL, :n] = torch.tensor(local)  # padding rows point at entry 0 and are in no segment: their output is dropped
        host[UNIQ, :U] = torch.tensor(uniq)  # padding entries repeat a real one; no row points at them
        host[ORDER, :n] = torch.tensor(order)
        host[STARTS, :U + 1] = torch.tensor(starts)
        self.inputs[:, :B + 1].copy_(host[:, :B + 1], non_blocking=True)

    def run(self, tokens: list[int], positions: list[int], slots: list[int], key: GraphKey,
            tables: list[list[int]], rope_positions: list[int] | None = None) -> torch.Tensor:
        """Logits [len(tokens), V] of one decode step of rows 0..n-1 whose pages are `tables` (graph key
        from `key`)."""
        self.fill(tokens, positions, slots, key, tables, rope_positions)
        n = len(tokens)
        plan = self.slots.plan(slots, ends_only=True) if self.slots.ends(key[2]) else None  # this batch's own ends
        if plan is not None:
            self.embeds[:n].copy_(self.runner.embed(self.inputs[IDS, :n, None], plan))
        if not self.capture:
            self.eager_steps += 1
            out = self._step(key)[:n]
        else:
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(key)
            graph, full = entry
            graph.replay()
            self.replays += 1
            out = full[:n]
        return out if plan is None else self.runner.logits(out, plan)

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
        kept = {k: v for k, v in self.graphs.items() if all(now[n] == ver for n, ver in k[2])}
        if self.graphs and not kept:  # the pool's last graph goes while its outputs may live on: start a new pool
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs = kept

    def warmup(self, kv_lens: list[int] | None = None) -> float:
        """Capture the bare model's graphs for every batch bucket (and the given KV buckets, by default
        all of them) before serving. Returns the seconds spent. Every row is padding: only the sink is written."""
        if not self.capture:
            return 0.0
        t0 = time.perf_counter()
        lens = kv_lens or self.kv_buckets()
        self.inputs.zero_()
        self.tables.zero_()
        for B in reversed(self.buckets):  # largest first: the pool then fits every smaller graph
            for kv in lens:
                if (B, kv, (), 0) not in self.graphs:
                    self._capture((B, kv, (), 0))
        torch.cuda.synchronize()
        return time.perf_counter() - t0
