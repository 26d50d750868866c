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
from collections.abc import Callable, Iterable
from functools import partial

import torch

from ..adapters.families import label
from ..adapters.manager import AdapterManager
from ..adapters.methods import ADAPTER_TYPES, StepTimer
from ..adapters.registry import Key, Registry
from ..adapters.slots import AdapterSlots
from ..architectures import architecture, text_config
from ..config import EngineConfig
from ..errors import (
    AdapterChangedError,
    AdapterServerError,
    GenerationFailedError,
    InvalidRequestError,
    NotReadyError,
    RequestTimeoutError,
)
from ..metrics import Metrics
from .grammar import Grammars
from .graphs import DecodeGraphs
from .merge import MergePolicy
from .model_loader import LoadedModel
from .model_runner import ModelRunner
from .moe import capture_refusal
from .paging import Paging
from .passes import Passes, PromptScore
from .rows import Rows
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
from .vocab import Vocabularies, Vocabulary, eos_ids

log = logging.getLogger(__name__)


def device_budget(asked: int | None, device: torch.device) -> int:
    """The device bytes resident adapters may hold (0: no limit but the slot count). Not asked: on a GPU, half
    the memory free once the model and the KV cache's page pool are in place; the other half stays for
    activations and captured graphs. On the CPU no limit: host memory is the OS's to share. Each process
    measures what is free when it starts (replicas sharing a GPU each see what the others left)."""
    if asked is not None:
        return asked
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    budget = max(0, int(free) // 2)
    log.info("adapters may hold %.2f GiB of device memory (--adapter-device-bytes)", budget / 2**30)
    return max(budget, 1)  # never 0, which would mean no limit


class Engine:
    def __init__(self, loaded: LoadedModel, registry: Registry, cfg: EngineConfig, metrics: Metrics | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.registry = registry
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.metrics.declare_adapter_types(ADAPTER_TYPES)
        self.timer = StepTimer(loaded.device)
        model_max = getattr(text_config(loaded.model.config), "max_position_embeddings", None) or cfg.max_model_len
        self.max_len = min(cfg.max_model_len, int(model_max))
        if cfg.kv_cache_tokens < self.max_len:
            raise ValueError(f"kv_cache_tokens ({cfg.kv_cache_tokens}) must hold one full context ({self.max_len})")
        cuda = loaded.device.type == "cuda"
        static = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda)
        if static and cuda and architecture(loaded.model.config.model_type).moe and (why := capture_refusal(loaded.device, loaded.dtype)):
            log.warning("CUDA graphs off: %s", why)
            static = False
        self.max_rows = cfg.max_batch_size  # rows hold pages, not whole contexts: the pool bounds their tokens
        self.runner = ModelRunner(loaded.model, self.max_rows, self.max_len, kv_tokens=cfg.kv_cache_tokens,
                                  page_size=cfg.kv_page_size, compile_kernels=static and cuda and cfg.compile_kernels,
                                  pack=cfg.compile_kernels, native=cfg.compile_kernels)
        self.paging = Paging(self.runner.cache, cfg.prefix_caching == "on", self.runner.longrope)
        self.slots = AdapterSlots(loaded.model, cfg.device_slots, loaded.device, loaded.dtype, self.timer,
                                  compile_kernels=static and cuda and cfg.compile_kernels, encode=self.runner.prefix_kv,
                                  native=cfg.compile_kernels)
        self.adapters = AdapterManager(self.slots, on_change=self._resident_changed,
                                       on_evict=self.metrics.cache.labels("evict").inc,
                                       byte_budget=device_budget(cfg.adapter_device_bytes, loaded.device))
        # the base model's tokenizer and ids, and the vocabularies adapters bring (added tokens)
        self.vocabularies = Vocabularies(self.tokenizer, self.slots.base.vocab_size)
        self.graphs = DecodeGraphs(self.runner, self.slots, cuda, self.max_rows, self.max_len) if static else None
        self.passes = Passes(self.runner, self.slots, self.graphs, self.paging)
        self.rows = Rows(cfg.max_queue)  # waiting, running and chunked rows; the queue count
        self.scheduler = Scheduler(self.max_rows, cfg.prefill_token_budget, self.paging.need, self._room, self.paging.open)
        self.merge = MergePolicy(self.slots, self.timer, cfg.merge_policy != "never", cfg.merge_after_steps,
                                 on_change=self._count_device_bytes)
        self.eos = self._eos_ids()  # the base model's; a row's own also holds its adapter tokenizer's
        self._inbox: queue.SimpleQueue[list[Seq] | Retire] = queue.SimpleQueue()
        registry.on_retire(self._retired)
        registry.on_check(self.adapters.needs)  # an upload over the whole device byte budget is refused
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.decode_steps = 0
        self._counted = (0, 0)  # the prefix cache's (queries, hits) already added to the metrics

    def _room(self) -> int:
        """Pages an admission may take now: those available beyond what the running rows take next step."""
        return self.paging.pool.available - self.paging.next_step(self.rows.running)

    @property
    def grammars(self) -> Grammars:
        """Structured output over the base model's tokenizer."""
        return self.vocabularies.base.grammars

    def vocabulary(self, adapter_id: str | None) -> Vocabulary:
        """The tokenizer and token ids that requests for this adapter's current version speak (the base
        model's, or its own); AdapterNotFoundError for an unknown id. May read its tokenizer from disk."""
        if adapter_id is None:
            return self.vocabularies.base
        for _ in range(3):  # a replace landing between the manifest and the files: read both again
            try:
                return self._vocabulary_of(adapter_id, *self.registry.vocabulary(adapter_id))
            except AdapterChangedError:
                continue
        raise AdapterChangedError(f"adapter {adapter_id!r} is being replaced; send the request again")

    def _vocabulary_of(self, adapter_id: str, fingerprint: str | None, size: int | None) -> Vocabulary:
        """The vocabulary of a version of `adapter_id` whose manifest names this tokenizer and size (its files
        read from the adapter's folder if not loaded yet: AdapterChangedError when they are another's)."""
        return self.vocabularies.get(fingerprint, size, partial(self.registry.read_tokenizer, adapter_id))

    def _eos_ids(self) -> set[int]:
        gc = getattr(self.loaded.model, "generation_config", None)
        return set(eos_ids(getattr(gc, "eos_token_id", None), self.tokenizer.eos_token_id))

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
                self.rows.unreserve()
            raise
        self._inbox.put(seqs)
        self._wake.set()
        return [RequestHandle(seq, self._wake.set) for seq in seqs]

    def _prepare(self, req: GenerationRequest, sink: Sink) -> Seq:
        """Validate a request, count it as queued and pin its adapter: its Seq, not yet in the inbox. The
        version pinned says which vocabulary the request speaks; one tokenised for another is refused
        (AdapterChangedError: the adapter was replaced meanwhile, and sending it again is safe)."""
        p = req.params
        max_new = self.check(len(req.prompt_ids), p)
        self.rows.reserve()
        ref = None
        try:
            ref = self.registry.acquire(req.adapter_id) if req.adapter_id is not None else None
            voc = self.vocabularies.base if ref is None else self._vocabulary_of(ref.adapter_id, ref.tokenizer,
                                                                                  ref.vocab_size)
            if req.vocabulary is not None and req.vocabulary != voc.key:
                raise AdapterChangedError(f"adapter {req.adapter_id!r} was replaced by a version with another "
                                          "vocabulary while this request was being prepared; send it again")
            self._check_ids(req, voc)
            if ref is not None:
                if ref.virtual_tokens:
                    max_new = self.check(len(req.prompt_ids), p, ref.virtual_tokens, ref.adapter_id)
                w = self.registry.weights(ref)
                self.adapters.needs(w)  # more than the whole device byte budget: never runs
                if (w.vocab_size or voc.size) != voc.size:  # the manifest sized the request, the weights its rows
                    raise GenerationFailedError(f"adapter {ref.adapter_id!r}: its manifest says {voc.size} token ids, "
                                                f"its weights hold {w.vocab_size}")
            matcher = voc.grammars.matcher(p.grammar) if p.grammar is not None else None  # a bad grammar: 400 here
        except BaseException:
            if ref is not None:
                self.registry.release(ref)
            self.rows.unreserve()
            raise
        now = time.perf_counter()
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        return Seq(req, sink, ref, TextStream(voc.tokenizer, p.stop), seed, max_new, now,
                   now + self.cfg.request_timeout_s, ref.method if ref else None,
                   prefix_len=ref.virtual_tokens if ref else 0, matcher=matcher,
                   eos=tuple(sorted(t for t in self.eos | voc.eos if t < voc.size)), vocab=voc.size)

    @staticmethod
    def _check_ids(req: GenerationRequest, voc: Vocabulary) -> None:
        """Token ids a request names (its prompt, its logit bias) are ids its rows have."""
        whose = f"adapter {req.adapter_id!r}" if req.adapter_id is not None else "the base model"
        for what, ids in (("prompt token", req.prompt_ids), ("logit_bias token", [t for t, _ in req.params.logit_bias])):
            bad = [t for t in ids if not 0 <= t < voc.size]
            if bad:
                raise InvalidRequestError(f"{what} {bad[0]} is not in the vocabulary of {whose} (ids 0 to {voc.size - 1})")

    def _retired(self, key: Key) -> None:
        """Any thread: the registry replaced or deleted a version; the engine thread clears its slot."""
        self._inbox.put(Retire(key))
        self._wake.set()

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
        for s in [*self.rows.batch(), *self.rows.waiting]:
            self._fail(s, NotReadyError("the server is shutting down; retry on another replica or later"))

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._drain()
        rows, joined = self.rows, []
        if rows.chunking is None:
            adm = self.scheduler.admit(rows.waiting, rows.running, self._grant)
            rows.admitted(adm.joined, adm.chunked)
            joined = adm.joined
        if joined:
            self._prefill(joined)
        chunked = rows.chunking is not None
        if rows.chunking is not None:
            self._chunk(rows.chunking)
        if rows.running and self._make_room():
            self._decode()
        self._publish_load()
        return bool(joined or chunked or rows.running)

    def load(self) -> tuple[int, int]:
        """(rows in the batch, requests queued): read from any thread, for routing."""
        return self.rows.load()

    def _publish_load(self) -> None:
        """Queue and batch state for the metrics, vLLM's names included."""
        m, batch, waiting = self.metrics, self.rows.batch(), self.rows.waiting
        m.queue_depth.set(len(waiting))
        m.vllm_waiting.set(len(waiting))
        m.vllm_running.set(len(batch))
        m.vllm_kv_usage.set(self.paging.usage())
        m.prefix_queries.inc(self.paging.queries - self._counted[0])
        m.prefix_hits.inc(self.paging.hits - self._counted[1])
        self._counted = (self.paging.queries, self.paging.hits)

        def ids(seqs: Iterable[Seq]) -> list[str]:
            return sorted({s.req.adapter_id for s in seqs if s.req.adapter_id is not None})

        m.set_lora_info(self.cfg.device_slots, ids(batch), ids(waiting))

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
                self.rows.enqueue(item)
        now = time.perf_counter()
        for s in [s for s in self.rows.waiting if s.cancelled or now > s.deadline]:
            self.rows.drop_waiting(s)
            self._end_early(s)
        for s in [s for s in self.rows.batch() if s.cancelled or now > s.deadline]:
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
        try:
            grant = self.adapters.grant((s.ref.adapter_id, s.ref.version), partial(self.registry.weights, s.ref))
        except Exception as e:  # its adapter cannot be written (out of device memory, say): this request fails alone
            log.exception("writing adapter %r into a device slot failed", s.ref.adapter_id)
            self.rows.drop_waiting(s)
            self._fail(s, e if isinstance(e, AdapterServerError) else
                       GenerationFailedError(f"adapter {s.ref.adapter_id!r} could not be written to the device: {e}"))
            return False
        if grant is None:
            return False
        s.slot, written = grant
        if written:
            self.metrics.load.labels("host").observe(time.perf_counter() - t0)
        held = p.length if (p := self.slots.prefix(s.slot)) is not None else 0
        if held != s.prefix_len:  # the manifest sized the request, the slot's entries place it: they must agree
            self.rows.drop_waiting(s)
            self._fail(s, GenerationFailedError(f"adapter {s.ref.adapter_id!r}: its manifest says {s.prefix_len} "
                                                f"virtual tokens, its weights hold {held}"))
            return False
        return True

    def _resident_changed(self, keys: frozenset[Key]) -> None:
        self.registry.set_resident(keys)
        self._count_device_bytes()

    def _count_device_bytes(self) -> None:
        self.metrics.adapter_device_bytes.set(self.adapters.device_bytes())

    # -- the three steps ----------------------------------------------------------------------
    def _prefill(self, seqs: list[Seq]) -> None:
        """Newly admitted rows' contexts, from what their pages hold; they join the batch. A row with another's
        very context (a choice of the same prompt) takes that row's pages once it is computed."""
        self.merge.reconcile([*self.rows.running, *seqs])
        lead = self.passes.leaders(seqs)
        out = self._forward("prefill", seqs, lambda: self.passes.prefill(seqs, lead))
        if out is None:
            return
        (logits, scores), t0 = out
        self._add_scores(seqs, scores)
        self.rows.join(seqs)
        for s, i in zip(seqs, lead, strict=True):
            if seqs[i] is s:
                s.cache_len = s.context_len
                self.paging.register(s)
            else:
                self.paging.fork(seqs[i], s)
        self._sample_and_emit(seqs, logits, t0)

    def _chunk(self, s: Seq) -> None:
        """The next chunk of the long prompt; after its last chunk the row joins the batch."""
        self.merge.reconcile([*self.rows.running, s])
        start = max(s.cache_len, s.prefix_len)
        size = min(self.cfg.prefill_token_budget, s.context_len - start)
        out = self._forward("chunk", [s], lambda: self.passes.chunk(s, size))
        if out is None:
            return
        (logits, scores), t0 = out
        self._add_scores([s], scores)
        s.cache_len = start + size
        self.paging.register(s)
        if s.cache_len < s.context_len:  # not the last chunk: nothing to sample
            self._record_step([s], time.perf_counter() - t0)
            return
        self.rows.chunk_done()
        self._sample_and_emit([s], logits, t0)

    def _make_room(self) -> bool:
        """Pages for every running row's next position: where the pool has too few, the newest rows are
        preempted (their pages go back; they wait again and are prefilled anew, from the prefix cache
        where it kept their pages). False when no running row is left."""
        for s in list(self.rows.running):
            if s not in self.rows.running:
                continue  # preempted below for an older row
            while not self.paging.grow(s, s.cache_len + 1):
                victim = self.rows.newest()
                assert victim is not None
                self._preempt(victim)
                if victim is s:
                    break
        return bool(self.rows.running)

    def _preempt(self, s: Seq) -> None:
        """`s` gives its pages and adapter slot back and waits at the head of the line, to resume from its
        prompt and the tokens it has generated (its stream, sampler state and grammar carry on)."""
        log.debug("preempting request %s at %d positions", s.req.request_id, s.cache_len)
        self._release_row(s)
        s.resume, s.cache_len = tuple(s.tokens), 0
        self.rows.preempt(s)
        self.metrics.preemptions.inc()

    def _decode(self) -> None:
        """One new token for every running row."""
        seqs = list(self.rows.running)
        self.merge.reconcile(seqs)
        out = self._forward("decode", seqs, lambda: (self.passes.decode(seqs), {}))
        if out is None:
            return
        (logits, _), t0 = out
        self.decode_steps += 1
        for s in seqs:
            s.cache_len += 1
            if s.cache_len % self.paging.ps == 0:
                self.paging.register(s)
        self._sample_and_emit(seqs, logits, t0)

    def _forward(self, kind: str, seqs: list[Seq], run: Callable[[], tuple[torch.Tensor, dict[int, list[PromptScore]]]]
                 ) -> tuple[tuple[torch.Tensor, dict[int, list[PromptScore]]], float] | None:
        """One forward pass and when it started; a failed pass fails every row in it (None)."""
        t0 = time.perf_counter()
        try:
            return run(), t0
        except Exception as e:
            log.exception("%s pass failed for %d rows", kind, len(seqs))
            for s in seqs:
                self._fail(s, GenerationFailedError(f"forward pass failed: {e}"))
            return None

    @staticmethod
    def _add_scores(seqs: list[Seq], scores: dict[int, list[PromptScore]]) -> None:
        for i, part in scores.items():
            seqs[i].prompt_scores.extend(part)

    def _sample_and_emit(self, seqs: list[Seq], logits: torch.Tensor, t0: float) -> None:
        """Sample each row's next token from `logits` [rows, V] and emit it; a failed row fails alone.
        Every row's cache length is already current: finishing a row moves another row's cache."""
        rows = [RowSampling(s.req.params, s.seed, len(s.tokens), s.req.prompt_ids, s.tokens,
                            () if s.req.params.ignore_eos else s.eos, s.matcher, s.vocab) for s in seqs]
        got, errors = sample_rows(logits, rows, any(s.req.params.logprobs for s in seqs))
        self._record_step(seqs, time.perf_counter() - t0)
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
        is_eos = tok in s.eos and (not s.req.params.ignore_eos or done)
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
    def _label(self, s: Seq) -> str:
        """The request's metric label now: the slots know whether its adapter is folded in."""
        return self.slots.adapter_type(s.slot) if s.slot else label(s.method)

    def _leave(self, s: Seq) -> None:
        """Free whatever the request holds: its pages, its slot row, its pin."""
        self.rows.leave(s)
        self._release_row(s)
        if s.ref is not None:
            self.registry.release(s.ref)
            s.ref = None
        self.metrics.kv_bytes.set(self.runner.cache.nbytes())

    def _release_row(self, s: Seq) -> None:
        """Give back what a row holds while it runs: its pages and its adapter's slot row."""
        self.paging.close(s)
        if s.slot:
            self.adapters.release(s.slot)
            s.slot = 0

    def _fail(self, s: Seq, err: AdapterServerError) -> None:
        """The request ends with a typed error: it leaves its row, is counted, and its sink gets the error."""
        t = self._label(s)
        self._leave(s)
        self.metrics.requests.labels(t, "error").inc()
        s.sink(err)

    def _finish(self, s: Seq, reason: FinishReason) -> None:
        """The request ends normally (stop, length) or by its own cancel: one GenerationResult."""
        t = self._label(s)
        self._leave(s)
        now = time.perf_counter()
        first = s.t_first or now
        result = GenerationResult(
            request_id=s.req.request_id, adapter_id=s.req.adapter_id, text=s.stream.text,
            token_ids=tuple(s.tokens), finish_reason=reason, prompt_tokens=s.prompt_len, cached_tokens=s.cached,
            logprobs=tuple(s.logprobs) if s.req.params.logprobs else None,
            timings=Timings((s.t_admit or now) - s.t_arrival, first - s.t_arrival, now - s.t_arrival),
            adapter_type=t,
            top_logprobs=tuple(s.top_logprobs) if s.req.params.logprobs and s.req.params.top_logprobs else None,
            prompt_logprobs=tuple(s.prompt_scores) if s.req.params.prompt_logprobs is not None else None,
        )
        m = self.metrics
        status = "cancelled" if reason == "cancelled" else "ok"
        m.requests.labels(t, status).inc()
        if status == "ok":
            m.duration.labels(t).observe(result.timings.total_seconds)
            m.ttft.labels(t).observe(result.timings.time_to_first_token_seconds)
            m.tokens.labels(t).inc(len(s.tokens))
            if len(s.tokens) > 1:
                m.tpot.labels(t).observe((now - first) / (len(s.tokens) - 1))
        s.sink(result)
