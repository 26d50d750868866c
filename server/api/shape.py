"""Shaping engine results into the contract's JSON."""

from __future__ import annotations

from typing import Any

from ..engine.types import GenerationResult


def result_json(r: GenerationResult, with_text: bool = True) -> dict[str, Any]:
    out = {
        "id": r.request_id, "adapter_id": r.adapter_id, "text": r.text if with_text else None,
        "token_ids": list(r.token_ids), "finish_reason": r.finish_reason,
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids)},
        "cached_tokens": r.cached_tokens,
        "logprobs": None if r.logprobs is None else list(r.logprobs),
        "timings": {"queue_seconds": r.timings.queue_seconds,
                    "time_to_first_token_seconds": r.timings.time_to_first_token_seconds,
                    "total_seconds": r.timings.total_seconds},
    }
    if not with_text:
        del out["text"]
    return out
