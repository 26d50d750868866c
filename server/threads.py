"""Torch work off the engine thread, on threads that end with it.

Every thread that runs a parallel torch op on the CPU gets an OpenMP team of its own, kept for as long as
the thread lives. While the process holds more OpenMP threads than the machine has cores, libgomp makes
every team, the engine's included, hand work to its threads by sleeping and waking them (futexes)
instead of spinning: each of the hundreds of small parallel ops of a decode step then pays for a wake-up.
A model loaded on one of asyncio's pooled threads (which live on) made the engine thread's decode steps
run at about two thirds of their speed on this 2-core machine. So loading, adapter uploads and other
torch work that the API hands off go to `in_own_thread`: a new thread per call, whose team ends with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread, awaited; its exception is raised here."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():  # the awaiting task may have been cancelled meanwhile
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def target() -> None:
        try:
            r = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, False, e)
        else:
            loop.call_soon_threadsafe(settle, True, r)

    threading.Thread(target=target, name=f"work-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await fut


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread, waited for (the blocking form of `in_own_thread`, for scripts that load a
    model before starting an engine)."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - raised in the caller
            out.append((False, e))

    t = threading.Thread(target=target, name=f"work-{getattr(fn, '__name__', 'call')}", daemon=True)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value
