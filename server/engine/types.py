"""Plain data crossing from the API into the engine and back. No torch, no pydantic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]  # failures are exceptions, never a result
GrammarSpec = tuple[str, str]  # structured output: (kind, text), see engine/grammar.py


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples. Keyword-only: several fields share a type, so a swap would pass silently."""

    max_new_tokens: int | None = None  # what the client asked for; None: it did not ask
    default_new_tokens: int | None = None  # the API's own default then (capped by the server limit); None: the limit
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: the most likely alternatives at each position, up to 20
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens (OpenAI)
    repetition_penalty: float = 1.0  # divides positive logits of prompt and generated tokens, multiplies negative (HF, vLLM)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # end-of-sequence tokens are banned until this many are generated
    grammar: GrammarSpec | None = None  # structured output
    prompt_logprobs: int | None = None  # each prompt token's logprob (after the first) and this many alternatives

    @property
    def processes_logits(self) -> bool:
        """Whether this row's logits change before sampling (the rows that do not are left untouched)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    adapter_id: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # the key of the vocabulary the prompt was tokenised in (engine/vocab.py); the engine refuses the request
    # if the version it pins speaks another. None: the ids are taken as they are.
    vocabulary: str | None = None


TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # newly released text; may be empty while a possible stop string is held back
    logprob: float | None
    top_logprobs: TopLogprobs | None = None


@dataclass(frozen=True)
class Timings:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    adapter_id: str | None
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: tuple[float, ...] | None
    timings: Timings
    adapter_type: str
    top_logprobs: tuple[TopLogprobs, ...] | None = None
    prompt_logprobs: tuple[tuple[float, TopLogprobs], ...] | None = None  # prompt tokens 1.., where asked
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
