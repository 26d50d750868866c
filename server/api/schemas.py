"""Pydantic models at the HTTP edge: inputs validated here, outputs shaped here (docs/api.md §4-§6)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..adapters.families import Method


class ErrorBody(BaseModel):
    type: str
    message: str


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=1_000_000, description="raw text; no chat template")
    adapter_id: str | None = Field(None, max_length=128)
    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False
    logprobs: bool = False
    stream: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # as in OpenAI's API
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # as in transformers and vLLM
    json_schema: dict[str, Any] | None = None  # structured output: at most one of these three
    regex: str | None = Field(None, min_length=1, max_length=10_000)
    choice: list[str] | None = Field(None, min_length=1, max_length=256)

    def grammar(self) -> tuple[str, str] | None:
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"send at most one of json_schema, regex and choice (got {', '.join(given)})")
        if self.json_schema is not None:
            return "json_schema", json.dumps(self.json_schema)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            if any(not c or len(c) > 1000 for c in self.choice):
                raise ValueError("each choice must be 1 to 1000 characters")
            return "choice", json.dumps(self.choice)
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        if any(not s or len(s) > 256 for s in v):
            raise ValueError("each stop string must be 1 to 256 characters")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TimingsOut(BaseModel):
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


class GenerateOut(BaseModel):
    id: str
    adapter_id: str | None
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage
    cached_tokens: int = Field(0, description="prompt tokens whose keys and values the prefix cache held")
    logprobs: list[float] | None
    timings: TimingsOut


class AdapterInfo(BaseModel):
    adapter_id: str
    method: Method
    format: Literal["peft", "adapterhub"]
    variant: str
    num_parameters: int
    size_bytes: int
    mergeable: bool
    tier: Literal["device", "host", "disk"]
    created_at: str
    merge_note: str | None = Field(None, description="why a linear adapter is not folded here (a quantized base)")
    vocab_size: int | None = Field(None, description="token ids its rows embed and score, where not the base model's "
                                                      "(tokens added, or a vocabulary resized down)")
    tokenizer: str | None = Field(None, description="the fingerprint of its own tokenizer (the files saved with it), "
                                                    "which its requests are tokenised and detokenised with")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: str


# -- OpenAI-compatible ------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields that change what a model returns and that we do not serve yet: a 400 naming them, never ignored.
# (Fields that change nothing we return, such as `user`, `metadata`, `store`, are accepted.)
UNSUPPORTED = {
    "tools": bool, "tool_choice": lambda v: v not in (None, "none"), "functions": bool, "function_call": bool,
    "suffix": lambda v: v is not None, "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]), "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None, "guided_json": lambda v: v is not None,
    "guided_regex": lambda v: v is not None, "guided_choice": lambda v: v is not None,
}


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields that change nothing we return are accepted; see UNSUPPORTED

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False  # extension
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension, as in vLLM
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)  # extension, as in vLLM
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (structured output)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("logit_bias holds at most 1024 tokens")
        for k, b in v.items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids; {k!r} is not one")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values lie in [-100, 100]; token {k} has {b}")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)

    def unsupported(self) -> list[str]:
        """The fields this request sets that we would otherwise have to ignore."""
        extra = self.model_extra or {}
        return [k for k, bad in UNSUPPORTED.items() if k in extra and bad(extra[k])]

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())


Prompt = str | list[int]


class CompletionIn(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | list[int] | list[list[int]]) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(v, list):
            if not v:
                raise ValueError("send at least one prompt")
            if len(v) > 64 and not all(isinstance(x, int) for x in v):
                raise ValueError("at most 64 prompts per request")
            if any(isinstance(x, (str, list)) and len(x) == 0 for x in v):
                raise ValueError("a prompt is empty")
        return v

    def prompts(self) -> list[Prompt]:
        """Each prompt: text, or token ids (a list of ints is one prompt of ids, as in OpenAI's API)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def plain(self) -> dict[str, str]:
        c = self.content
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if p.get("type") == "text")
        return {"role": "system" if self.role == "developer" else self.role, "content": c or ""}


class ChatIn(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        parts = {p.get("type") for m in self.messages if isinstance(m.content, list) for p in m.content} - {"text"}
        return super().unsupported() + [f"{t} content parts" for t in sorted(str(t) for t in parts)]
