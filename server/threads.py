"""Torch work off the engine thread, on threads that end with it.

Every thread that runs a parallel torch op on the CPU gets an OpenMP team of its own, kept for as long as
the thread lives. While the process holds more OpenMP threads than the machine has cores, libgomp makes
every team, the engine's included, hand work to its threads by sleeping and waking them (futexes)
instead of spinning: each of the hundreds of small parallel ops of a decode step then pays for a wake-up.
A model loaded on one of asyncio's pooled threads (which live on) made the engine thread's decode steps
run at about two thirds of their speed on this 2-core machine. So loading, adapter uploads and other
torch work that the API hands off go to `in_own_thread`: a new thread per call, whose team ends with it;
and a request that pins an adapter held only on disk (the registry's `acquire`, on a request thread)
parses it with `on_own_thread`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _name(fn: Callable[..., Any]) -> str:
    return f"work-{getattr(fn, '__name__', 'call')}"


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread, awaited; its exception is raised here. The thread ends after the call."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=_name(fn))
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)  # its one thread exits once the call is done


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread, waited for (the blocking form of `in_own_thread`, for scripts that load a
    model before starting an engine)."""
    with ThreadPoolExecutor(1, thread_name_prefix=_name(fn)) as pool:  # leaving it joins the thread
        return pool.submit(fn, *args).result()
