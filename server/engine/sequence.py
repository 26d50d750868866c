"""One request's state inside the engine, and the handle its caller holds. Plain data, no torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .types import GenerationRequest, TopLogprobs

if TYPE_CHECKING:  # types only: this module, and the scheduler that uses it, never import torch
    from ..adapters.registry import AdapterRef, Key
    from .textstream import TextStream

Sink = Callable[[object], None]


@dataclass(eq=False)
class Seq:
    req: GenerationRequest
    sink: Sink
    ref: AdapterRef | None
    stream: TextStream
    seed: int  # the request's seed, or one drawn at submit: the row's sampling stream
    max_new: int
    t_arrival: float
    deadline: float
    method: str | None  # the pinned adapter's method (None: the bare model); its label is the slots' to give
    slot: int = 0  # the device slot granted at admission (0: no adapter, or not admitted yet)
    prefix_len: int = 0  # KV entries its adapter puts before the prompt (prompt and prefix tuning)
    cache_len: int = 0  # positions of its KV cache row written so far (prefix included)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_scores: list[tuple[float, TopLogprobs]] = field(default_factory=list)  # prompt tokens 1.., where asked
    t_admit: float = 0.0
    t_first: float = 0.0
    cancelled: bool = False
    matcher: Any = None  # structured output: the row's grammar state (engine/grammar.py)
    eos: tuple[int, ...] = ()  # the ids that end it (the base model's, and its adapter tokenizer's)
    vocab: int = 0  # token ids its rows have: past them its logits are -inf (0: the logits' whole width)
    passed_over: int = 0  # admissions that passed it over, its adapter finding no room (scheduler.py)
    resume: tuple[int, ...] = ()  # preempted: the tokens it had generated, prefilled again after its prompt
    cached: int = 0  # prompt tokens its first admission found in the prefix cache
    keys: list[bytes] = field(default_factory=list)  # keys of its full pages so far (pages.page_keys)

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def fill_ids(self) -> tuple[int, ...]:
        """The tokens its prefill computes: the prompt, then what it generated before it was preempted."""
        return self.req.prompt_ids + self.resume if self.resume else self.req.prompt_ids

    @property
    def context_len(self) -> int:
        """Positions its row holds once prefilled: the adapter's prefix, then `fill_ids`."""
        return self.prefix_len + self.prompt_len + len(self.resume)

    @property
    def fill_done(self) -> int:
        """Tokens of `fill_ids` already in its pages (cached, or chunks prefilled)."""
        return max(0, self.cache_len - self.prefix_len)



@dataclass(frozen=True)
class Retire:
    """Message to the engine: the registry replaced or deleted this version."""

    key: Key


class RequestHandle:
    """What `Engine.submit` returns: the request's id and a way to cancel it."""

    def __init__(self, seq: Seq, wake: Callable[[], None]) -> None:
        self._seq, self._wake = seq, wake
        self.request_id = seq.req.request_id

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step."""
        self._seq.cancelled = True
        self._wake()
