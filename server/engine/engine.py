"""The one loop that owns the model, the KV cache and the adapter slots.

Iteration-level continuous batching (Orca style): each iteration admits waiting requests that fit
(`scheduler.py`), prefills them in one forward pass, then runs one decode step over every running
row (`passes.py`). A prompt longer than the per-iteration prefill budget is prefilled a chunk per
iteration in the cache row just past the running rows, so the running rows keep decoding meanwhile
(nothing else is admitted until it is done). A finished row leaves at once and its cache row is
refilled by the last one. Requests for different adapters, and for none, share every pass; a linear
adapter that every row uses is folded into the weights when it pays (`merge.py`).

Callers talk to the engine only through `submit` (thread-safe) and the sink they pass, which the
engine thread calls with TokenEvents, then either one GenerationResult (finished or cancelled) or one
typed AdapterServerError (timeout, failed step, shutdown): failures travel one way, as exceptions.
The registry's news (a version replaced or deleted) arrives through the same inbox as requests.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from functools import partial

import torch

from ..adapters.families import label
from ..adapters.manager import AdapterManager
from ..adapters.methods import StepTimer
from ..adapters.registry import Key, Registry
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
from .grammar import Grammars
from .graphs import DecodeGraphs
from .merge import MergePolicy
from .model_loader import LoadedModel
from .model_runner import ModelRunner
from .passes import Passes, PromptScore
from .sampling import RowSampling, sample_rows
from .scheduler import Scheduler
from .sequence import RequestHandle, Retire, Seq, Sink
from .textstream import TextStream
from .types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenEvent,
    TopLogprobs,
)

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, loaded: LoadedModel, registry: Registry, cfg: EngineConfig, metrics: Metrics | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.grammars = Grammars(self.tokenizer, int(loaded.model.config.vocab_size))  # type: ignore[union-attr]
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
                                  pack=cfg.compile_kernels)
        self.slots = AdapterSlots(loaded.model, cfg.device_slots, loaded.device, loaded.dtype, self.timer,
                                  compile_kernels=static and cuda and cfg.compile_kernels, encode=self.runner.prefix_kv)
        self.adapters = AdapterManager(self.slots, on_change=self._resident_changed,
                                       on_evict=self.metrics.cache.labels("evict").inc)
        self.graphs = DecodeGraphs(self.runner, self.slots, capture=cuda) if static else None
        self.passes = Passes(self.runner, self.slots, self.graphs)
        self.scheduler = Scheduler(self.max_rows, cfg.prefill_token_budget, cfg.kv_cache_tokens,
                                   self.runner.cache.tokens_for)
        self.merge = MergePolicy(self.slots, self.timer, cfg.merge_policy != "never", cfg.merge_after_steps)
        self.eos = self._eos_ids()
        self._eos_tuple = tuple(sorted(self.eos))  # what min_tokens bans, handed to the sampler each step
        self._inbox: queue.SimpleQueue[list[Seq] | Retire] = queue.SimpleQueue()
        registry.on_retire(self._retired)
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []  # index == KV cache row
        self._prefilling: Seq | None = None  # a long prompt part-way through chunked prefill, in row len(_running)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queued = 0  # inbox + waiting, for the bounded queue
        self._qlock = threading.Lock()
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
    def check(self, n_prompt: int, p: SamplingParams, virtual: int = 0, adapter_id: str | None = None) -> int:
        """The one authority on lengths: validate them; the number of tokens the request may generate.
        `virtual`: positions the request's adapter puts before the prompt, which take context too."""
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
        room = self.max_len - n_prompt - virtual
        adds = f" and adapter {adapter_id!r} puts {virtual} virtual tokens before it" if virtual else ""
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {n_prompt} tokens{adds}; the context window is {self.max_len}: shorten the prompt"
            )
        if p.max_new_tokens is not None and p.max_new_tokens > room:  # asked for explicitly: refused, never cut short
            raise InvalidRequestError(
                f"prompt has {n_prompt} tokens{adds} and max_new_tokens (max_tokens) asks for {p.max_new_tokens}: "
                f"{p.max_new_tokens - room} past the context window of {self.max_len}")
        return min(asked, room)

    def submit(self, req: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue a request. Pins its adapter (may read it from disk: call from a worker thread)."""
        return self.submit_group([(req, sink)])[0]

    def submit_group(self, items: list[tuple[GenerationRequest, Sink]]) -> list[RequestHandle]:
        """Queue several requests at once (the choices of one API call): all or none, and they reach the
        scheduler together, so choices of one prompt are admitted together and share its prefill."""
        seqs: list[Seq] = []
        try:
            for req, sink in items:
                seqs.append(self._prepare(req, sink))
        except BaseException:
            for seq in seqs:
                if seq.ref is not None:
                    self.registry.release(seq.ref)
                self._dequeued()
            raise
        self._inbox.put(seqs)
        self._wake.set()
        return [RequestHandle(seq, self._wake.set) for seq in seqs]

    def _prepare(self, req: GenerationRequest, sink: Sink) -> Seq:
        """Validate a request, count it as queued and pin its adapter: its Seq, not yet in the inbox."""
        p = req.params
        max_new = self.check(len(req.prompt_ids), p)
        matcher = self.grammars.matcher(p.grammar) if p.grammar is not None else None  # a bad grammar: 400 here
        with self._qlock:
            if self._queued >= self.cfg.max_queue:
                raise OverloadedError(f"{self._queued} requests are queued (limit {self.cfg.max_queue}); retry later")
            self._queued += 1
        try:
            ref = self.registry.acquire(req.adapter_id) if req.adapter_id is not None else None
            if ref is not None and ref.virtual_tokens:
                try:
                    max_new = self.check(len(req.prompt_ids), p, ref.virtual_tokens, ref.adapter_id)
                except BaseException:
                    self.registry.release(ref)
                    raise
        except BaseException:
            self._dequeued()
            raise
        now = time.perf_counter()
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        return Seq(req, sink, ref, TextStream(self.tokenizer, p.stop), seed, max_new, now,
                   now + self.cfg.request_timeout_s, label(ref.method if ref else None),
                   prefix_len=ref.virtual_tokens if ref else 0, matcher=matcher)

    def _retired(self, key: Key) -> None:
        """Any thread: the registry replaced or deleted a version; the engine thread clears its slot."""
        self._inbox.put(Retire(key))
        self._wake.set()

    def _dequeued(self) -> None:
        with self._qlock:
            self._queued -= 1

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
        for s in [*self._running, *self._waiting, *self._chunking()]:
            self._fail(s, NotReadyError("the server is shutting down; retry on another replica or later"))

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._drain()
        joined: list[Seq] = []
        if self._prefilling is None:
            adm = self.scheduler.admit(self._waiting, self._running, self._grant)
            for s in [*adm.joined, *([adm.chunked] if adm.chunked else [])]:
                self._dequeued()
                s.t_admit = time.perf_counter()
            joined, self._prefilling = adm.joined, adm.chunked
        if joined:
            self._pass(joined, "prefill")
        chunked = self._prefilling is not None
        if self._prefilling is not None:
            self._pass([self._prefilling], "chunk")
        if self._running:
            self._pass(list(self._running), "decode")
        self._publish_load()
        return bool(joined or chunked or self._running)

    def load(self) -> tuple[int, int]:
        """(rows in the batch, requests queued): read from any thread, for routing."""
        return len(self._running) + (self._prefilling is not None), self._queued  # submitted, not yet admitted

    def _publish_load(self) -> None:
        """Queue and batch state for the metrics, vLLM's names included."""
        m, batch = self.metrics, [*self._running, *self._chunking()]
        m.queue_depth.set(len(self._waiting))
        m.vllm_waiting.set(len(self._waiting))
        m.vllm_running.set(len(batch))
        m.vllm_kv_usage.set(min(1.0, sum(s.cache_len for s in batch) / self.cfg.kv_cache_tokens))

        def ids(seqs: Iterable[Seq]) -> list[str]:
            return sorted({s.req.adapter_id for s in seqs if s.req.adapter_id is not None})

        m.set_lora_info(self.cfg.device_slots, ids(batch), ids(self._waiting))

    def _chunking(self) -> list[Seq]:
        return [self._prefilling] if self._prefilling is not None else []

    def _drain(self) -> None:
        """Take what the inbox holds; end requests that were cancelled or ran out of time."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Retire):
                self.adapters.retire(item.key)
            else:
                self._waiting.extend(item)
        now = time.perf_counter()
        for s in [s for s in self._waiting if s.cancelled or now > s.deadline]:
            self._waiting.remove(s)
            self._dequeued()
            self._end_early(s)
        for s in [s for s in [*self._running, *self._chunking()] if s.cancelled or now > s.deadline]:
            self._end_early(s)

    def _end_early(self, s: Seq) -> None:
        if s.cancelled:
            self._finish(s, "cancelled")
        else:
            self._fail(s, RequestTimeoutError("request did not finish within the server's timeout"))

    def _grant(self, s: Seq) -> bool:
        """A device slot for an admitted request's adapter (none needed without one)."""
        if s.ref is None:
            return True
        t0 = time.perf_counter()
        grant = self.adapters.grant((s.ref.adapter_id, s.ref.version), partial(self.registry.weights, s.ref))
        if grant is None:
            return False
        s.slot, written = grant
        if written:
            self.metrics.load.labels("host").observe(time.perf_counter() - t0)
        return True

    def _resident_changed(self, keys: frozenset[Key]) -> None:
        self.registry.set_resident(keys)
        self.metrics.adapter_device_bytes.set(self.adapters.device_bytes())

    def _used(self) -> tuple[int, int]:
        """Cache rows in use (running, then the one prefilled in chunks) and the longest row's length."""
        rows = [*self._running, *self._chunking()]
        return len(rows), max((r.cache_len for r in rows), default=0)

    # -- one forward pass ---------------------------------------------------------------------
    def _pass(self, seqs: list[Seq], kind: str) -> None:
        """Run one pass over `seqs` ("prefill", "chunk" or "decode"), then sample and emit for its rows.
        A failed pass fails every row in it; a failed row fails alone."""
        self.merge.reconcile([*self._running, *seqs] if kind != "decode" else seqs)
        t0 = time.perf_counter()
        size = 0
        try:
            scores: dict[int, list[PromptScore]] = {}
            if kind == "prefill":
                logits, scores = self.passes.prefill(seqs, self._running, self._used())
            elif kind == "chunk":
                s = seqs[0]
                size = min(self.cfg.prefill_token_budget, s.prompt_len - s.prompt_done)
                logits, scores = self.passes.chunk(s, size, self._running, self._used())
            else:
                logits = self.passes.decode(seqs, self._used())
        except Exception as e:
            log.exception("%s pass failed for %d rows", kind, len(seqs))
            for s in seqs:
                self._fail(s, GenerationFailedError(f"forward pass failed: {e}"))
            return
        for i, part in scores.items():
            seqs[i].prompt_scores.extend(part)
        if kind == "chunk" and seqs[0].prompt_done + size < seqs[0].prompt_len:
            seqs[0].cache_len = seqs[0].prefix_len + seqs[0].prompt_done + size  # not the last chunk: nothing to sample
            self._record_step(seqs, time.perf_counter() - t0)
            return
        rows = [RowSampling(s.req.params, s.seed, len(s.tokens), s.req.prompt_ids, s.tokens,
                            () if s.req.params.ignore_eos else self._eos_tuple, s.matcher) for s in seqs]
        got, errors = sample_rows(logits, rows, any(s.req.params.logprobs for s in seqs))
        self._record_step(seqs, time.perf_counter() - t0)
        if kind == "decode":
            self.decode_steps += 1
        elif kind == "chunk":
            self._prefilling = None
            self._running.append(seqs[0])  # its row is already len(_running)
        else:
            self._running.extend(seqs)
        for s in seqs:  # every row's length first: finishing a row moves another row's cache
            s.cache_len = s.cache_len + 1 if kind == "decode" else s.context_len
            s.adapter_type = self.slots.adapter_type(s.slot)
        for i, s in enumerate(seqs):
            if (err := errors[i]) is not None:
                self._fail(s, err)
            else:
                self._emit(s, got.tokens[i], None if got.logprobs is None else got.logprobs[i], got.top[i])

    def _record_step(self, seqs: list[Seq], elapsed: float) -> None:
        m = self.metrics
        m.forward.inc(elapsed)
        spent = self.timer.collect()
        for name, secs in spent.items():
            m.adapter_compute.labels(name).inc(secs)
        slots = {s.slot for s in seqs}
        self.merge.observe(slots, spent)
        m.batch_size.observe(len(seqs))
        m.distinct.observe(len(slots))
        self.steps += 1

    def _emit(self, s: Seq, tok: int, lp: float | None, top: TopLogprobs | None = None) -> None:
        now = time.perf_counter()
        if not s.tokens:
            s.t_first = now
        s.tokens.append(tok)
        if s.req.params.logprobs and lp is not None:
            s.logprobs.append(lp)
            if s.req.params.top_logprobs:
                s.top_logprobs.append(top or ())
        done = False  # the grammar is complete: nothing may follow
        if s.matcher is not None:
            s.matcher.consume_token(tok)
            done = s.matcher.is_stopped()
        is_eos = tok in self.eos and (not s.req.params.ignore_eos or done)
        text = "" if is_eos else s.stream.push(tok)
        reason: FinishReason | None = "stop" if (is_eos or done or s.stream.stopped) else None
        if reason is None and len(s.tokens) >= s.max_new:
            reason = "length"
        if reason is not None:
            text += s.stream.flush()  # release what was held back for a stop string that never came
        s.sink(TokenEvent(tok, text, lp if s.req.params.logprobs else None, top if s.req.params.top_logprobs else None))
        if reason is not None:
            self._finish(s, reason)

    # -- leaving ------------------------------------------------------------------------------
    def _leave(self, s: Seq) -> None:
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
        if s.slot:
            self.adapters.release(s.slot)
            s.slot = 0
        if s.ref is not None:
            self.registry.release(s.ref)
            s.ref = None
        self.metrics.kv_bytes.set(self.runner.cache.nbytes())

    def _fail(self, s: Seq, err: AdapterServerError) -> None:
        """The request ends with a typed error: it leaves its row, is counted, and its sink gets the error."""
        self._leave(s)
        self.metrics.requests.labels(s.adapter_type, "error").inc()
        s.sink(err)

    def _finish(self, s: Seq, reason: FinishReason) -> None:
        """The request ends normally (stop, length) or by its own cancel: one GenerationResult."""
        self._leave(s)
        now = time.perf_counter()
        first = s.t_first or now
        result = GenerationResult(
            request_id=s.req.request_id, adapter_id=s.req.adapter_id, text=s.stream.text,
            token_ids=tuple(s.tokens), finish_reason=reason, prompt_tokens=s.prompt_len,
            logprobs=tuple(s.logprobs) if s.req.params.logprobs else None,
            timings=Timings((s.t_admit or now) - s.t_arrival, first - s.t_arrival, now - s.t_arrival),
            adapter_type=s.adapter_type,
            top_logprobs=tuple(s.top_logprobs) if s.req.params.logprobs and s.req.params.top_logprobs else None,
            prompt_logprobs=tuple(s.prompt_scores) if s.req.params.prompt_logprobs is not None else None,
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
        s.sink(result)
