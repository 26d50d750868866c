"""Compiling small pure tensor functions into fused kernels, with an eager fallback.

Inside a CUDA graph the launch cost of a kernel is gone, but each still costs a few microseconds of
mostly idle GPU; a chain of elementwise ops compiled into one kernel costs one. Used by the engine's
decode step (norms, rotary, SiLU-and-multiply) and by the adapter methods' graph-replay hooks. Only
where the caller asks (CUDA with `--compile-kernels`); if compilation fails the eager function runs
and the reason is kept for the logs and the benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# Inductor computes a bfloat16 chain in float32 and rounds once at the end unless told to round where
# the eager ops round: with this it equals the eager function bit for bit, which the tests check.
OPTIONS: dict[str, Any] = {"emulate_precision_casts": True}


class Compiled:
    def __init__(self, fn: Callable[..., Any], enabled: bool = True) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=OPTIONS) if enabled else None
        self.error: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None and self.error is None:
            try:
                return self.compiled(*args)
            except Exception as e:  # a missing compiler toolchain, an unsupported op: stay correct, eager
                self.error = f"{type(e).__name__}: {e}"[:300]
                log.warning("compiling %s failed, running it eagerly: %s", self.fn.__name__, self.error)
        return self.fn(*args)


class Guarded:
    """A kernel call that, the first time it raises (a compiler or driver refusing it), is switched off for
    good and says why once: the call returns whether it ran, and the caller takes its PyTorch path when not.
    Kernels are compiled at their first call, which a CUDA graph's warm-up makes before its capture."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name
        self.error: str | None = None

    def __call__(self, *args: Any) -> bool:
        if self.error is not None:
            return False
        try:
            self.fn(*args)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"[:300]
            log.warning("%s failed, its callers use PyTorch's ops from now on: %s", self.name, self.error)
            return False
        return True


def raise_recompile_limit(n: int = 64) -> None:
    """Each hook is compiled once per variant (batch 1 vs more, a site with or without a layer norm);
    the default limit of 8 would silently send later variants back to eager."""
    cfg: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
