"""Admission: which waiting requests join the batch this iteration. Pure policy, no torch.

A request joins when a row is free, its prompt fits the iteration's prefill budget (the first in line
always does: over the budget, it is prefilled in chunks, alone), the KV cache can hold every row's
longest reach, and its adapter gets a device slot. Order is first come, first served, except that a
request whose adapter finds the slots (or the device bytes) held by running rows is passed over for this
iteration; passed over `patience` times, no request for an adapter overtakes it any more (requests for
the bare model still do), so that running rows drain and free what it needs instead of new rows of
resident adapters taking their place forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .sequence import Seq


@dataclass(frozen=True)
class Admission:
    joined: list[Seq]  # prefilled together this iteration
    chunked: Seq | None  # first in line and over the budget: prefilled a chunk per iteration


class Scheduler:
    def __init__(self, max_rows: int, prefill_budget: int, kv_budget: int,
                 kv_tokens_for: Callable[[int, int], int], patience: int = 32) -> None:
        self.max_rows = max_rows
        self.patience = patience  # iterations a request may be passed over before the line waits for it
        self.prefill_budget = prefill_budget
        self.kv_budget = kv_budget
        self.kv_tokens_for = kv_tokens_for  # (rows, longest reach) -> token slots the cache would hold

    def admit(self, waiting: deque[Seq], running: list[Seq], grant: Callable[[Seq], bool]) -> Admission:
        """Take admitted requests out of `waiting`. `grant` gives a request its device slot (True), or
        says it cannot have one now (False): every slot is busy, or the engine has ended the request (its
        adapter's weights disagree with its manifest) and taken it out of `waiting` (this walks a copy)."""
        joined: list[Seq] = []
        budget = self.prefill_budget
        reserve = max((s.still_needs for s in running), default=0)
        held = False  # a request waited past its patience: only requests that need no adapter pass it now
        for s in list(waiting):
            if held and s.req.adapter_id is not None:
                continue
            rows = len(running) + len(joined)
            n = s.prompt_len
            if rows >= self.max_rows or (joined and n > budget):
                break  # a prompt over the budget goes alone, in chunks, from the next iteration
            need = max(reserve, s.context_len + s.max_new)
            if rows > 0 and self.kv_tokens_for(rows + 1, need) > self.kv_budget:
                break  # the KV budget is full: wait for rows to finish
            if not grant(s):
                if s not in waiting:
                    continue  # the engine ended it (it is not waiting for room)
                s.passed_over += 1
                # past its patience, no adapter's request overtakes it: running rows drain until it fits
                held = held or s.passed_over >= self.patience
                continue  # the slots or bytes it needs are held by running rows: this one waits its turn
            waiting.remove(s)
            if n > budget:
                return Admission(joined, s)
            joined.append(s)
            budget -= n
            reserve = need
        return Admission(joined, None)
