"""The engine's rows: which requests wait, which run, and the one prefilled in chunks.

A row's K/V live in pages (`paging.py`), so rows sit nowhere in particular: a pass lists its rows and
their page tables. This module owns the order: `running` in admission order (the newest last: the
first preempted when the pool runs out), the long prompt prefilled a chunk per iteration (`chunking`,
admitted alone: no other row joins while it is prefilled), and `waiting`, first come first served, a
preempted row put back at its head.

It also counts the requests submitted but not yet admitted (the bounded queue), from any thread.
Plain Python.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable

from ..errors import OverloadedError
from .sequence import Seq


class Rows:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.waiting: deque[Seq] = deque()  # submitted and taken from the inbox, not yet admitted
        self.running: list[Seq] = []  # admission order
        self.chunking: Seq | None = None  # a long prompt part-way through chunked prefill
        self._queued = 0  # submitted, not yet admitted (inbox + waiting)
        self._lock = threading.Lock()

    # -- the queue count (any thread) ---------------------------------------------------------
    def reserve(self, bounded: bool = True) -> None:
        """Count one more submitted request, or refuse it when the queue is full (`bounded`: a preempted
        row going back is always taken)."""
        with self._lock:
            if bounded and self._queued >= self.max_queue:
                raise OverloadedError(f"{self._queued} requests are queued (limit {self.max_queue}); retry later")
            self._queued += 1

    def unreserve(self) -> None:
        """A counted request left the queue: admitted, dropped while waiting, or never submitted."""
        with self._lock:
            self._queued -= 1

    @property
    def queued(self) -> int:
        return self._queued

    # -- reading (engine thread; `load` from any) ---------------------------------------------
    def batch(self) -> list[Seq]:
        """Every row holding pages: the running ones, then the one prefilled in chunks."""
        return [*self.running, *([self.chunking] if self.chunking is not None else [])]

    def load(self) -> tuple[int, int]:
        """(rows in the batch, requests queued), for routing."""
        return len(self.running) + (self.chunking is not None), self._queued

    def newest(self) -> Seq | None:
        """The row preempted first: the chunked one (admitted after every running row), else the last admitted."""
        if self.chunking is not None:
            return self.chunking
        return self.running[-1] if self.running else None

    # -- moving (engine thread) ---------------------------------------------------------------
    def enqueue(self, seqs: Iterable[Seq]) -> None:
        self.waiting.extend(seqs)

    def admitted(self, joined: list[Seq], chunked: Seq | None) -> None:
        """The scheduler took these out of `waiting`: they leave the queue count; `chunked` is prefilled in chunks."""
        now = time.perf_counter()
        for s in [*joined, *([chunked] if chunked is not None else [])]:
            self.unreserve()
            if not s.t_admit:
                s.t_admit = now
        self.chunking = chunked

    def join(self, seqs: list[Seq]) -> None:
        """Prefilled rows run, in order."""
        self.running.extend(seqs)

    def chunk_done(self) -> None:
        """The chunked row's last chunk is in: it runs."""
        assert self.chunking is not None
        self.running.append(self.chunking)
        self.chunking = None

    def drop_waiting(self, s: Seq) -> None:
        self.waiting.remove(s)
        self.unreserve()

    def leave(self, s: Seq) -> None:
        """`s` no longer runs (a request not in a row is left alone)."""
        if s is self.chunking:
            self.chunking = None
        elif s in self.running:
            self.running.remove(s)

    def preempt(self, s: Seq) -> None:
        """`s` leaves its row and waits again, at the head of the line."""
        self.leave(s)
        self.reserve(bounded=False)
        self.waiting.appendleft(s)
