"""Pydantic models at the HTTP edge: inputs validated here, outputs shaped here (API.md)."""

from __future__ import annotations

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


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: str


# -- OpenAI-compatible ------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False  # extension

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class CompletionIn(_OpenAIBase):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send exactly one prompt per request")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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
