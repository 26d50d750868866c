"""Torch work off the engine thread runs on threads that end with it (server/threads.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.threads import in_own_thread, on_own_thread


def test_in_own_thread_answers_raises_and_leaves_no_thread():
    ran: list[threading.Thread] = []

    def work(x: int) -> int:
        ran.append(threading.current_thread())
        return 2 * x

    async def main() -> None:
        assert await in_own_thread(work, 21) == 42
        with pytest.raises(KeyError):
            await in_own_thread(lambda: {}["missing"])
        assert await in_own_thread(work, 1) == 2

    asyncio.run(main())
    assert len({id(t) for t in ran}) == 2 and threading.main_thread() not in ran  # a new thread per call
    for t in ran:
        t.join(5)
        assert not t.is_alive()


def test_on_own_thread_waits_for_the_answer_or_the_error():
    ran: list[threading.Thread] = []
    assert on_own_thread(lambda: ran.append(threading.current_thread()) or "done") == "done"
    assert ran[0] is not threading.current_thread() and not ran[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        on_own_thread(lambda: 1 / 0)
