"""The one loop that owns the model, the KV cache and the adapter slots.

Iteration-level continuous batching (Orca style): each iteration admits waiting requests that fit
(free rows, KV budget, a free device slot for their adapter), prefills them in one forward pass,
then runs one decode step over every running row. A prompt longer than the per-iteration prefill
budget is prefilled in chunks of that size, one chunk per iteration, in the cache row just past the
running rows, so the running rows keep decoding meanwhile (nothing else is admitted until it is done). A finished row leaves at once and its cache row
is refilled by the last one. Requests for different adapters, and for none, share every pass.

Callers talk to the engine only through `submit` (thread-safe) and the sink they pass, which the
engine thread calls with TokenEvents, then either one GenerationResult (finished or cancelled) or one
typed AdapterServerError (timeout, failed step, shutdown): failures travel one way, as exceptions.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from ..adapters.families import label
from ..adapters.manager import AdapterManager, Key
from ..adapters.methods import StepTimer
from ..adapters.registry import AdapterRef, Registry
from ..adapters.slots import AdapterSlots
from ..config import EngineConfig
from ..errors import (
    AdapterServerError,
    GenerationFailedError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
)
from ..metrics import Metrics
from .graphs import DecodeGraphs
from .model_loader import LoadedModel
from .model_runner import ModelRunner
from .sampling import RowSampling, sample
from .textstream import TextStream
from .types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenEvent,
)

log = logging.getLogger(__name__)
Sink = Callable[[object], None]


@dataclass(eq=False)
class _Seq:
    req: GenerationRequest
    sink: Sink
    ref: AdapterRef | None
    stream: TextStream
    seed: int  # the request's seed, or one drawn at submit: the row's sampling stream
    max_new: int
    t_arrival: float
    deadline: float
    slot: int = 0
    cache_len: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    cancelled: bool = False
    adapter_type: str = "none"  # the metric label, known at submit from the pinned adapter


@dataclass(frozen=True)
class _Retire:
    """Message from the registry: this version was replaced or deleted."""

    key: Key


class RequestHandle:
    def __init__(self, seq: _Seq, engine: Engine) -> None:
        self._seq, self._engine = seq, engine
        self.request_id = seq.req.request_id

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step."""
        self._seq.cancelled = True
        self._engine._wake.set()


class Engine:
    def __init__(self, loaded: LoadedModel, registry: Registry, cfg: EngineConfig, metrics: Metrics | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.registry = registry
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.timer = StepTimer(loaded.device)
        model_max = getattr(loaded.model.config, "max_position_embeddings", None) or cfg.max_model_len  # type: ignore[union-attr]
        self.max_len = min(cfg.max_model_len, int(model_max))
        if cfg.kv_cache_tokens < self.max_len:
            raise ValueError(f"kv_cache_tokens ({cfg.kv_cache_tokens}) must hold one full context ({self.max_len})")
        cuda = loaded.device.type == "cuda"
        static = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda)
        # a static cache pins a whole context per row, so the KV budget bounds the rows
        self.max_rows = min(cfg.max_batch_size, cfg.kv_cache_tokens // self.max_len) if static else cfg.max_batch_size
        self.runner = ModelRunner(loaded.model, self.max_rows, self.max_len, static_cache=static,
                                  compile_kernels=static and cuda and cfg.compile_kernels,
                                  pack=static and cfg.compile_kernels)
        self.slots = AdapterSlots(loaded.model, cfg.device_slots, loaded.device, loaded.dtype, self.timer)
        self.adapters = AdapterManager(self.slots, on_change=self._resident_changed)
        self.graphs = DecodeGraphs(self.runner, self.slots, capture=cuda) if static else None
        self.eos = self._eos_ids()
        self._inbox: queue.SimpleQueue[_Seq | _Retire] = queue.SimpleQueue()
        registry.on_retire(self._retired)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # index == KV cache row
        self._prefilling: _Seq | None = None  # a long prompt part-way through chunked prefill, in row len(_running)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queued = 0  # inbox + waiting, for the bounded queue
        self._qlock = threading.Lock()
        self._uniform_steps = 0
        self._uniform_slot: int | None = None
        self._fold_s: float | None = None  # measured cost of one fold + unfold
        self._unfolded_step_s: float | None = None  # measured cost of a mergeable adapter's unfolded product per pass
        self.steps = 0
        self.decode_steps = 0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gc = getattr(self.loaded.model, "generation_config", None)
        for v in (getattr(gc, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.graphs is not None and self.graphs.capture:
            with torch.inference_mode():
                secs = self.graphs.warmup()
            log.info("captured %d decode graphs in %.1f s", len(self.graphs.graphs), secs)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submission (any thread) --------------------------------------------------------------
    def check(self, n_prompt: int, p: SamplingParams) -> int:
        """The one authority on lengths: validate them; the number of tokens the request may generate."""
        limit = self.cfg.max_new_tokens_limit
        if n_prompt == 0:
            raise InvalidRequestError("prompt is empty after tokenisation; send at least one token")
        if p.max_new_tokens is None:
            asked = min(p.default_new_tokens or limit, limit)  # a default is capped, never refused
        elif p.max_new_tokens > limit:
            raise InvalidRequestError(
                f"max_new_tokens (max_tokens in the OpenAI API) {p.max_new_tokens} is over the server limit {limit}")
        else:
            asked = p.max_new_tokens
        room = self.max_len - n_prompt
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {n_prompt} tokens; the context window is {self.max_len}: shorten the prompt"
            )
        return min(asked, room)

    def submit(self, req: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue a request. Pins its adapter (may read it from disk: call from a worker thread)."""
        p = req.params
        max_new = self.check(len(req.prompt_ids), p)
        with self._qlock:
            if self._queued >= self.cfg.max_queue:
                raise OverloadedError(f"{self._queued} requests are queued (limit {self.cfg.max_queue}); retry later")
            self._queued += 1
        try:
            ref = self.registry.acquire(req.adapter_id) if req.adapter_id is not None else None
        except BaseException:
            with self._qlock:
                self._queued -= 1
            raise
        now = time.perf_counter()
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        seq = _Seq(req, sink, ref, TextStream(self.tokenizer, p.stop), seed, max_new, now, now + self.cfg.request_timeout_s,
                   adapter_type=label(ref.method if ref else None))
        self._inbox.put(seq)
        self._wake.set()
        return RequestHandle(seq, self)

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:  # never let the loop die; the failed pass already failed its requests
                log.exception("engine step failed")
                worked = True
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()
        for s in [*self._running, *self._waiting, *([self._prefilling] if self._prefilling else [])]:
            self._fail(s, NotReadyError("the server is shutting down; retry on another replica or later"))

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._drain()
        admitted = self._admit() if self._prefilling is None else []
        if admitted:
            self._forward(admitted, prefill=True)
        chunked = self._prefilling is not None
        if chunked:
            self._prefill_chunk()
        if self._running:
            self._forward(list(self._running), prefill=False)
        self.metrics.queue_depth.set(len(self._waiting))
        return bool(admitted or chunked or self._running)

    def _retired(self, key: Key) -> None:
        """Any thread: the registry replaced or deleted a version; the engine thread clears its slot."""
        self._inbox.put(_Retire(key))
        self._wake.set()

    def _resident_changed(self, keys: frozenset[Key]) -> None:
        self.registry.set_resident(keys)
        self.metrics.adapter_device_bytes.set(self.adapters.device_bytes())

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Retire):
                self.adapters.retire(item.key)
            else:
                self._waiting.append(item)
        now = time.perf_counter()
        for s in [s for s in self._waiting if s.cancelled or now > s.deadline]:
            self._waiting.remove(s)
            self._dequeued()
            self._end_early(s)
        live = [*self._running, *([self._prefilling] if self._prefilling else [])]
        for s in [s for s in live if s.cancelled or now > s.deadline]:
            self._end_early(s)

    def _end_early(self, s: _Seq) -> None:
        if s.cancelled:
            self._finish(s, "cancelled")
        else:
            self._fail(s, RequestTimeoutError("request did not finish within the server's timeout"))

    def _dequeued(self) -> None:
        with self._qlock:
            self._queued -= 1

    def _admit(self) -> list[_Seq]:
        admitted: list[_Seq] = []
        budget = self.cfg.prefill_token_budget
        reserve = max((s.cache_len + s.max_new - len(s.tokens) for s in self._running), default=0)
        for s in list(self._waiting):
            rows = len(self._running) + len(admitted)
            n = len(s.req.prompt_ids)
            if rows >= self.max_rows or (admitted and n > budget):
                break  # a prompt over the budget goes alone, in chunks, from the next iteration
            need = max(reserve, n + s.max_new)
            if rows > 0 and self.runner.cache.tokens_for(rows + 1, need) > self.cfg.kv_cache_tokens:
                break  # the KV budget is full: wait for rows to finish
            if s.ref is not None:
                t0 = time.perf_counter()
                grant = self.adapters.grant((s.ref.adapter_id, s.ref.version), partial(self.registry.weights, s.ref))
                if grant is None:
                    continue  # every slot is used by running rows: this one waits its turn
                s.slot, written = grant
                if written:
                    self.metrics.load.labels("host").observe(time.perf_counter() - t0)
            self._waiting.remove(s)
            self._dequeued()
            s.t_admit = time.perf_counter()
            if n > budget:  # first in line and over the budget: prefill it in chunks
                self._prefilling = s
                break
            admitted.append(s)
            budget -= n
            reserve = need
        return admitted

    def _used(self) -> tuple[int, int]:
        """Cache rows in use (running, then the one being prefilled in chunks) and the longest row's length."""
        rows = [*self._running, *([self._prefilling] if self._prefilling else [])]
        return len(rows), max((r.cache_len for r in rows), default=0)

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt, in its row; after the last chunk it samples and joins the running rows."""
        s = self._prefilling
        assert s is not None
        prompt, c0 = s.req.prompt_ids, s.cache_len
        T = min(self.cfg.prefill_token_budget, len(prompt) - c0)
        last = c0 + T == len(prompt)
        row = len(self._running)
        self._reconcile_merge([s])
        t0 = time.perf_counter()
        try:
            used_rows, used_len = self._used()
            needed = max([c0 + T] + [r.cache_len + 1 for r in self._running])
            self.runner.cache.fit(used_rows, needed, used_rows, used_len)
            dev = self.runner.device
            logits = self.runner.forward(torch.tensor([prompt[c0 : c0 + T]], device=dev),
                                         torch.tensor([c0], device=dev), torch.tensor([T], device=dev), row,
                                         self.slots.plan([s.slot]), kv_len=c0 + T, start0=c0)
        except Exception as e:
            log.exception("chunked prefill failed")
            self._fail(s, GenerationFailedError(f"forward pass failed: {e}"))
            return
        s.cache_len = c0 + T
        s.adapter_type = self.slots.adapter_type(s.slot)
        if not last:
            self._record_step([s], time.perf_counter() - t0)
            return
        toks, lps, errors = self._sample([s], logits)
        self._record_step([s], time.perf_counter() - t0)
        self._prefilling = None
        self._running.append(s)  # its row is already len(_running)
        if errors[0] is not None:
            self._fail(s, errors[0])
        else:
            self._emit(s, toks[0], None if lps is None else lps[0])

    def _reconcile_merge(self, seqs: list[_Seq]) -> None:
        """Fold the one (IA)3 adapter every row uses into the weights when it pays; unfold as soon as rows mix.

        It pays when the decode steps the running rows still have, times the measured per-step cost
        of the unfolded (IA)3 product, exceed the measured cost of folding and unfolding once.
        """
        if self.cfg.merge_policy == "never":
            return
        rows = [*self._running, *seqs]
        used = {s.slot for s in rows}
        merged = self.slots.merged_slot
        if len(used) == 1 and self.slots.can_merge(slot := next(iter(used))):
            self._uniform_steps = self._uniform_steps + 1 if self._uniform_slot == slot else 1
            self._uniform_slot = slot
            if merged == slot:
                return
            remaining = max(s.max_new - len(s.tokens) for s in rows)
            pays = self._fold_s is None or remaining * (self._unfolded_step_s or 0.0) > self._fold_s
            if self._uniform_steps >= self.cfg.merge_after_steps and pays:
                self._timed_fold(lambda: self.slots.merge(slot), slot)  # unfolds any other adapter first
                return
        else:
            self._uniform_steps, self._uniform_slot = 0, None
        if merged is not None:  # rows of any other adapter, or of none, need the base weights
            self._timed_fold(self.slots.unmerge, merged)

    def _timed_fold(self, fn: Callable[[], None], slot: int) -> None:
        """Run a fold or unfold of `slot`; its time counts as adapter compute under the folded label."""
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        self.timer.add(label(self.slots.method_of(slot), merged=True), dt)
        est = 2 * dt  # a fold is followed by an unfold of the same size
        self._fold_s = est if self._fold_s is None else 0.8 * self._fold_s + 0.2 * est

    def _forward(self, seqs: list[_Seq], prefill: bool) -> None:
        self._reconcile_merge(seqs)
        B = len(seqs)
        t0 = time.perf_counter()
        try:
            logits = self._logits(seqs, prefill)
        except Exception as e:  # the pass is shared: every row of it fails
            log.exception("forward pass failed for %d rows", B)
            for s in seqs:
                self._fail(s, GenerationFailedError(f"forward pass failed: {e}"))
            return
        toks, lps, errors = self._sample(seqs, logits)
        elapsed = time.perf_counter() - t0
        self._record_step(seqs, elapsed)
        self.decode_steps += not prefill
        if prefill:
            self._running.extend(seqs)
        for s in seqs:  # every row's length first: finishing a row moves another row's cache
            s.cache_len = len(s.req.prompt_ids) if prefill else s.cache_len + 1
            s.adapter_type = self.slots.adapter_type(s.slot)
        for i, s in enumerate(seqs):
            if (err := errors[i]) is not None:
                self._fail(s, err)
                continue
            self._emit(s, toks[i], None if lps is None else lps[i])

    def _logits(self, seqs: list[_Seq], prefill: bool) -> torch.Tensor:
        """One forward pass over the rows: prefill of new rows, or one decode step of the running ones."""
        dev, B = self.runner.device, len(seqs)
        slots = [s.slot for s in seqs]
        start0: int | None
        if prefill:
            row0 = len(self._running)
            lens = [len(s.req.prompt_ids) for s in seqs]
            T = max(lens)
            ids = torch.zeros(B, T, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : lens[i]] = torch.tensor(s.req.prompt_ids)
            start, lengths = torch.zeros(B, dtype=torch.long), torch.tensor(lens)
            needed, start0 = max([T] + [s.cache_len + 1 for s in self._running]), 0
            kv_len = T
        else:
            row0 = 0
            pos = [s.cache_len for s in seqs]
            needed = max(pos) + 1
            if self.graphs is not None and (key := self.graphs.key(slots, needed - 1)) is not None:
                return self.graphs.run([s.tokens[-1] for s in seqs], pos, slots, key)
            ids = torch.tensor([[s.tokens[-1]] for s in seqs])
            start, lengths = torch.tensor(pos), torch.ones(B, dtype=torch.long)
            start0 = pos[0] if all(p == pos[0] for p in pos) else None
            kv_len = needed
        used_rows, used_len = self._used()
        self.runner.cache.fit(used_rows + (B if prefill else 0), needed, used_rows, used_len)
        plan = self.slots.plan(slots)
        return self.runner.forward(ids.to(dev), start.to(dev), lengths.to(dev), row0, plan,
                                   kv_len=kv_len, start0=start0)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor
                ) -> tuple[list[int], list[float] | None, list[AdapterServerError | None]]:
        """Tokens for every row in one pass. Rows with non-finite logits fail alone; if the batched pass
        raises, each row is sampled on its own so that only the rows that fail, fail."""
        rows = [RowSampling(s.req.params, s.seed, len(s.tokens)) for s in seqs]
        want = any(s.req.params.logprobs for s in seqs)
        def bad() -> AdapterServerError:
            return GenerationFailedError("the model produced non-finite logits for this request")

        try:
            toks, lps, ok = sample(logits, rows, want)
            return toks, lps, [None if f else bad() for f in ok]
        except Exception:
            log.exception("batched sampling failed; sampling each row alone")
        toks, lps_out = [0] * len(seqs), [0.0] * len(seqs)
        errors: list[AdapterServerError | None] = [None] * len(seqs)
        for i, r in enumerate(rows):
            try:
                t, lp, f = sample(logits[i : i + 1], [r], want)
                toks[i], lps_out[i] = t[0], (lp[0] if lp else 0.0)
                errors[i] = None if f[0] else bad()
            except Exception as e:
                errors[i] = GenerationFailedError(f"sampling failed: {e}")
        return toks, (lps_out if want else None), errors

    def _record_step(self, seqs: list[_Seq], elapsed: float) -> None:
        m = self.metrics
        m.forward.inc(elapsed)
        spent = self.timer.collect()
        for name, secs in spent.items():
            m.adapter_compute.labels(name).inc(secs)
        slots = {s.slot for s in seqs}
        if len(slots) == 1 and self.slots.can_merge(slot := next(iter(slots))):  # one unfolded mergeable adapter
            x = spent.get(label(self.slots.method_of(slot)))
            if x is not None:
                self._unfolded_step_s = x if self._unfolded_step_s is None else 0.8 * self._unfolded_step_s + 0.2 * x
        m.batch_size.observe(len(seqs))
        m.distinct.observe(len({s.slot for s in seqs}))
        self.steps += 1

    def _emit(self, s: _Seq, tok: int, lp: float | None) -> None:
        now = time.perf_counter()
        if not s.tokens:
            s.t_first = now
        s.tokens.append(tok)
        if s.req.params.logprobs and lp is not None:
            s.logprobs.append(lp)
        is_eos = tok in self.eos and not s.req.params.ignore_eos
        text = "" if is_eos else s.stream.push(tok)
        reason: FinishReason | None = "stop" if (is_eos or s.stream.stopped) else None
        if reason is None and len(s.tokens) >= s.max_new:
            reason = "length"
        if reason is not None:
            text += s.stream.flush()  # release what was held back for a stop string that never came
        s.sink(TokenEvent(tok, text, lp if s.req.params.logprobs else None))
        if reason is not None:
            self._finish(s, reason)

    # -- leaving ------------------------------------------------------------------------------
    def _release(self, s: _Seq) -> None:
        if s.slot:
            self.adapters.release(s.slot)
            s.slot = 0
        if s.ref is not None:
            self.registry.release(s.ref)
            s.ref = None

    def _fail(self, s: _Seq, err: AdapterServerError) -> None:
        """The request ends with a typed error: it leaves its row, is counted, and its sink gets the error."""
        self._leave(s)
        self.metrics.requests.labels(s.adapter_type, "error").inc()
        self.metrics.kv_bytes.set(self.runner.cache.nbytes())
        s.sink(err)

    def _leave(self, s: _Seq) -> None:
        """Free whatever the request holds: its cache row (packing the rows), its slot row, its pin."""
        if s is self._prefilling:
            self._prefilling = None  # its row is past the running rows: nothing to move
        if s in self._running:
            i, last = self._running.index(s), len(self._running) - 1
            if i != last:
                moved = self._running[last]
                self.runner.cache.move_row(last, i, moved.cache_len)
                self._running[i] = moved
            self._running.pop()
            if self._prefilling is not None:  # keep it right after the running rows
                self.runner.cache.move_row(last + 1, last, self._prefilling.cache_len)
        self._release(s)

    def _finish(self, s: _Seq, reason: FinishReason) -> None:
        """The request ends normally (stop, length) or by its own cancel: one GenerationResult."""
        self._leave(s)
        now = time.perf_counter()
        first = s.t_first or now
        result = GenerationResult(
            request_id=s.req.request_id, adapter_id=s.req.adapter_id, text=s.stream.text,
            token_ids=tuple(s.tokens), finish_reason=reason, prompt_tokens=len(s.req.prompt_ids),
            logprobs=tuple(s.logprobs) if s.req.params.logprobs else None,
            timings=Timings((s.t_admit or now) - s.t_arrival, first - s.t_arrival, now - s.t_arrival),
            adapter_type=s.adapter_type,
        )
        m, t = self.metrics, s.adapter_type
        status = "cancelled" if reason == "cancelled" else "ok"
        m.requests.labels(t, status).inc()
        if status == "ok":
            m.duration.labels(t).observe(result.timings.total_seconds)
            m.ttft.labels(t).observe(result.timings.time_to_first_token_seconds)
            m.tokens.labels(t).inc(len(s.tokens))
            if len(s.tokens) > 1:
                m.tpot.labels(t).observe((now - first) / (len(s.tokens) - 1))
        m.kv_bytes.set(self.runner.cache.nbytes())
        s.sink(result)
