"""The engine's rows: which requests wait, which run in which KV cache row, and the one prefilled in chunks.

This module is the one owner of the rule that ties requests to cache rows:
- running rows sit packed at cache rows 0..n-1, in the order of `running`;
- a long prompt prefilled a chunk per iteration (`chunking`) sits in row n = len(running), right
  after them, and joins `running` in that same row once its last chunk is in (it is admitted
  alone: no other row joins while it is prefilled);
- newly admitted rows are prefilled into rows n.. on (`next_row`), then join `running` in order;
- a leaving row is filled by moving the last running row into it, and the chunked row then moves
  down one so that it stays right after them.
Graph replay pads a batch past its real rows by writing only the last position of rows >= n
(graphs.py); that is safe for the chunked row in row n, since no row reads a position it has not
written first. A paged KV cache replaces the packing here, and nowhere else.

It also counts the requests submitted but not yet admitted (the bounded queue), from any thread.
Plain Python: the cache is reached only through `move_row`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from ..errors import OverloadedError
from .sequence import Seq


class RowMover(Protocol):
    def move_row(self, src: int, dst: int, length: int) -> None: ...


class Rows:
    def __init__(self, cache: RowMover, max_queue: int) -> None:
        self.cache = cache
        self.max_queue = max_queue
        self.waiting: deque[Seq] = deque()  # submitted and taken from the inbox, not yet admitted
        self.running: list[Seq] = []  # index == KV cache row
        self.chunking: Seq | None = None  # a long prompt part-way through chunked prefill, in row len(running)
        self._queued = 0  # submitted, not yet admitted (inbox + waiting)
        self._lock = threading.Lock()

    # -- the queue count (any thread) ---------------------------------------------------------
    def reserve(self) -> None:
        """Count one more submitted request, or refuse it when the queue is full."""
        with self._lock:
            if self._queued >= self.max_queue:
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
        """Every row holding a cache row: the running ones, then the one prefilled in chunks."""
        return [*self.running, *([self.chunking] if self.chunking is not None else [])]

    @property
    def next_row(self) -> int:
        """The cache row after the running ones: where the chunked row, or the next admitted rows, go."""
        return len(self.running)

    def used(self) -> tuple[int, int]:
        """Cache rows in use and the longest one's length: what a resize of the cache must keep."""
        rows = self.batch()
        return len(rows), max((r.cache_len for r in rows), default=0)

    def reach(self) -> int:
        """Positions the running rows need in a pass that also writes their next token."""
        return max((s.cache_len + 1 for s in self.running), default=0)

    def load(self) -> tuple[int, int]:
        """(rows in the batch, requests queued), for routing."""
        return len(self.running) + (self.chunking is not None), self._queued

    # -- moving (engine thread) ---------------------------------------------------------------
    def enqueue(self, seqs: Iterable[Seq]) -> None:
        self.waiting.extend(seqs)

    def admitted(self, joined: list[Seq], chunked: Seq | None) -> None:
        """The scheduler took these out of `waiting`: they leave the queue count; `chunked` takes row n."""
        now = time.perf_counter()
        for s in [*joined, *([chunked] if chunked is not None else [])]:
            self.unreserve()
            s.t_admit = now
        self.chunking = chunked

    def join(self, seqs: list[Seq]) -> None:
        """Rows prefilled into next_row.. on become running rows, in order."""
        self.running.extend(seqs)

    def chunk_done(self) -> None:
        """The chunked row's last chunk is in: it runs from its row, already len(running)."""
        assert self.chunking is not None
        self.running.append(self.chunking)
        self.chunking = None

    def drop_waiting(self, s: Seq) -> None:
        self.waiting.remove(s)
        self.unreserve()

    def leave(self, s: Seq) -> None:
        """Free `s`'s cache row, keeping the rows packed (a request not in a row is left alone)."""
        if s is self.chunking:
            self.chunking = None  # its row is past the running rows: nothing to move
            return
        if s not in self.running:
            return
        i, last = self.running.index(s), len(self.running) - 1
        if i != last:
            moved = self.running[last]
            self.cache.move_row(last, i, moved.cache_len)
            self.running[i] = moved
        self.running.pop()
        if self.chunking is not None:  # keep it right after the running rows
            self.cache.move_row(last + 1, last, self.chunking.cache_len)
