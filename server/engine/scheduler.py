"""Admission: which waiting requests join the batch this iteration. Pure policy, no torch.

A request joins when a row is free, the tokens its prefill computes (what the prefix cache does not
hold) fit the iteration's prefill budget, padding counted (the pass is right-padded to its longest
prompt; the first in line always fits: over the budget, it is prefilled in chunks, alone), the KV pool
has the pages its whole context takes now, beyond those the running rows take in their next step (it
asks for what it holds now, not for what it may reach: a row that later finds no page preempts the
newest), and its adapter gets a device slot. A request whose prefix pages are being computed right now
by a row admitted before it waits for them (next iteration) instead of computing them twice. Order is
first come, first served, except that a request whose adapter finds the slots (or the device bytes)
held by running rows is passed over for this iteration; passed over `patience` times, no request for
an adapter overtakes it any more (requests for the bare model still do), so that running rows drain
and free what it needs instead of new rows of resident adapters taking their place forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .sequence import Seq


class Need(Protocol):
    @property
    def compute(self) -> int: ...  # tokens its prefill computes

    @property
    def pages(self) -> int: ...  # pages it takes from the pool

    @property
    def wait(self) -> bool: ...  # what it could reuse is being computed now: it waits an iteration


@dataclass(frozen=True)
class Admission:
    joined: list[Seq]  # prefilled together this iteration
    chunked: Seq | None  # first in line and over the budget: prefilled a chunk per iteration


class Scheduler:
    def __init__(self, max_rows: int, prefill_budget: int, need: Callable[[Seq], Need], room: Callable[[], int],
                 take: Callable[[Seq, Any], None], patience: int = 32) -> None:
        self.max_rows = max_rows
        self.patience = patience  # iterations a request may be passed over before the line waits for it
        self.prefill_budget = prefill_budget
        self.need = need  # what a request takes now (looked up in the prefix cache)
        self.room = room  # pages free now beyond the running rows' next step
        self.take = take  # give an admitted request what `need` said

    def admit(self, waiting: deque[Seq], running: list[Seq], grant: Callable[[Seq], bool]) -> Admission:
        """Take admitted requests out of `waiting`. `grant` gives a request its device slot (True), or
        says it cannot have one now (False): every slot is busy, or the engine has ended the request (its
        adapter's weights disagree with its manifest) and taken it out of `waiting` (this walks a copy)."""
        joined: list[Seq] = []
        budget = self.prefill_budget
        longest = 0  # the pass is right-padded: it computes len(joined) x the longest prompt's tokens
        held = False  # a request waited past its patience: only requests that need no adapter pass it now
        for s in list(waiting):
            if held and s.req.adapter_id is not None:
                continue
            if len(running) + len(joined) >= self.max_rows:
                break
            need = self.need(s)
            if need.wait:
                continue  # the pages it shares are being prefilled: it reuses them next iteration
            n = need.compute
            if joined and (len(joined) + 1) * max(longest, n) > budget:
                break  # over the budget, padding counted: it waits for the next iteration (alone in chunks if long)
            if need.pages > self.room():
                break  # the pool is full: wait for rows to finish
            if not grant(s):
                if s not in waiting:
                    continue  # the engine ended it (it is not waiting for room)
                s.passed_over += 1
                # past its patience, no adapter's request overtakes it: running rows drain until it fits
                held = held or s.passed_over >= self.patience
                continue  # the slots or bytes it needs are held by running rows: this one waits its turn
            waiting.remove(s)
            self.take(s, need)
            if n > budget:
                return Admission(joined, s)
            joined.append(s)
            longest = max(longest, n)
        return Admission(joined, None)
