"""The adapter method names and their metric labels, as plain data (no torch): the API reads them here.

Everything else about a method (its implementation, whether it folds, its labels) is registered once,
in `methods.RECORDS`, which checks that it registers exactly these names.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["ia3", "bottleneck", "lora", "dora", "prompt", "prefix", "vocab"]


def label(method: str | None, merged: bool = False) -> str:
    """The bounded `adapter_type` metric label of a request: `none`, the method, or `<method>_merged`."""
    if method is None:
        return "none"
    return f"{method}_merged" if merged else method
