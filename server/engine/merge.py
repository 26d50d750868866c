"""When to fold a linear adapter into the base weights, with the measured costs that decide it.

Folding pays when every running row uses the same mergeable adapter: the batch then runs the bare
model's arithmetic. It pays off when the decode steps the rows still have, times the measured cost of
the unfolded adapter per pass, exceed the measured cost of folding and unfolding once. Rows of any
other adapter, or of none, need the base weights: the fold is undone first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..adapters.families import label
from ..adapters.methods import StepTimer
from ..adapters.slots import AdapterSlots
from .sequence import Seq

log = logging.getLogger(__name__)


class MergePolicy:
    def __init__(self, slots: AdapterSlots, timer: StepTimer, enabled: bool, after_steps: int,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.slots, self.timer = slots, timer
        self.on_change = on_change  # after a fold or unfold (it holds, then frees, a copy of the base weights)
        self.enabled, self.after_steps = enabled, after_steps
        self._uniform_steps = 0
        self._uniform_slot: int | None = None
        self._fold_s: float | None = None  # measured cost of one fold + unfold
        self._unfolded_s: float | None = None  # measured cost of the unfolded adapter per pass

    def reconcile(self, rows: list[Seq]) -> None:
        """Before a pass over `rows` (every row of the cache that the pass touches): fold or unfold."""
        if not self.enabled:
            return
        used = {s.slot for s in rows}
        merged = self.slots.merged_slot
        if len(used) == 1 and self.slots.can_merge(slot := next(iter(used))):
            self._uniform_steps = self._uniform_steps + 1 if self._uniform_slot == slot else 1
            self._uniform_slot = slot
            if merged == slot:
                return
            remaining = max(s.max_new - len(s.tokens) for s in rows)
            pays = self._fold_s is None or remaining * (self._unfolded_s or 0.0) > self._fold_s
            if self._uniform_steps >= self.after_steps and pays:
                self._timed(lambda: self.slots.merge(slot), slot)  # unfolds any other adapter first
                return
        else:
            self._uniform_steps, self._uniform_slot = 0, None
        if merged is not None:
            self._timed(self.slots.unmerge, merged)

    def observe(self, slots: set[int], spent: dict[str, float]) -> None:
        """After a pass: learn the unfolded adapter's cost from a pass that ran one mergeable adapter."""
        if len(slots) == 1 and self.slots.can_merge(slot := next(iter(slots))):
            x = spent.get(label(self.slots.method_of(slot)))
            if x is not None:
                self._unfolded_s = x if self._unfolded_s is None else 0.8 * self._unfolded_s + 0.2 * x

    def _timed(self, fn: Callable[[], None], slot: int) -> None:
        """A fold or unfold of `slot`; its time counts as adapter compute under the folded label."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # out of memory for the copy, say: serve unfolded from now on, never stuck retrying
            log.exception("folding an adapter failed; folding is off from now on")
            self.enabled = False
            self.slots.unmerge()
            self.on_change()
            return
        dt = time.perf_counter() - t0
        self.on_change()
        self.timer.add(label(self.slots.method_of(slot), merged=True), dt)
        est = 2 * dt  # a fold is followed by an unfold of the same size
        self._fold_s = est if self._fold_s is None else 0.8 * self._fold_s + 0.2 * est
