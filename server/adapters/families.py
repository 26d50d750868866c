"""The adapter method names and their metric labels, in one place, as plain data (no torch): the API
and the metrics read them here; each method class in `methods/` names its entry."""

from __future__ import annotations

from typing import Literal

Method = Literal["ia3", "bottleneck", "lora", "dora", "prompt", "prefix"]
METHODS: tuple[Method, ...] = ("ia3", "bottleneck", "lora", "dora", "prompt", "prefix")
MERGEABLE: frozenset[str] = frozenset({"ia3", "lora", "dora"})  # linear in the weights: can be folded in


def label(method: str | None, merged: bool = False) -> str:
    """The bounded `adapter_type` metric label of a request: `none`, the method, or `<method>_merged`."""
    if method is None:
        return "none"
    return f"{method}_merged" if merged else method


ADAPTER_TYPES: tuple[str, ...] = ("none", *METHODS, *(label(m, merged=True) for m in METHODS if m in MERGEABLE))
