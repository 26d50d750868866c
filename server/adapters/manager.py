"""The device side of the adapter tiers, owned by the engine thread alone (vLLM's worker-side manager).

The registry keeps the catalogue (ids, versions, pins, the host tier, the disk store). This class keeps
the device slot table: which version sits in which slot, the slots' LRU order, and how many admitted
rows use each slot. It is the only code that writes or clears a slot, so the table and the slot
storage (and `device_bytes`) cannot drift apart. What happens elsewhere reaches it as calls made on the
engine thread: `grant` when a row is admitted, `release` when it leaves, `retire` when the registry
replaced or deleted a version (a message through the engine's inbox).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .registry import Key
from .slots import AdapterSlots
from .spec import AdapterWeights


class AdapterManager:
    def __init__(self, slots: AdapterSlots, on_change: Callable[[frozenset[Key]], None] | None = None,
                 on_evict: Callable[[], None] | None = None) -> None:
        self.slots = slots
        n = slots.num_slots
        self._table: list[Key | None] = [None] * (n + 1)  # index 0: "no adapter"
        self._by_key: dict[Key, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently granted first
        self._rows = [0] * (n + 1)  # admitted rows using each slot
        self._retired: set[Key] = set()  # versions replaced or deleted: cleared once no row uses them
        self._on_change = on_change or (lambda keys: None)  # residency changed (registry tiers, metrics)
        self._on_evict = on_evict or (lambda: None)  # an idle adapter made room for another (metrics)
        self.loads = self.evictions = 0

    # -- engine-thread operations -------------------------------------------------------------
    def grant(self, key: Key, weights: Callable[[], AdapterWeights]) -> tuple[int, bool] | None:
        """A slot for one admitted row of `key`: (slot, whether it was written now), or None when every
        slot is used by running rows (the row waits). `weights` gives the host copy, read only on a write."""
        slot = self._by_key.get(key)
        written = False
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.slots.write(slot, weights())
            self._table[slot], self._by_key[key] = key, slot
            self.loads += 1
            written = True
            self._changed()
        self._lru[slot] = None
        self._lru.move_to_end(slot)
        self._rows[slot] += 1
        return slot, written

    def release(self, slot: int) -> None:
        """One row that used `slot` left. A retired version is cleared with its last row."""
        if slot == 0:
            return
        self._rows[slot] -= 1
        key = self._table[slot]
        if self._rows[slot] == 0 and key in self._retired:
            self._clear(slot)

    def retire(self, key: Key) -> None:
        """The registry replaced or deleted this version: no new request pins it. Cleared now if no row
        uses it, else with its last row."""
        self._retired.add(key)
        slot = self._by_key.get(key)
        if slot is not None and self._rows[slot] == 0:
            self._clear(slot)

    def _free_slot(self) -> int | None:
        for s in range(1, len(self._table)):
            if self._table[s] is None:
                return s
        for s in self._lru:  # least recently granted first
            if self._rows[s] == 0:
                self._clear(s)
                self.evictions += 1
                self._on_evict()
                return s
        return None

    def _clear(self, slot: int) -> None:
        key = self._table[slot]
        if key is not None:
            del self._by_key[key]  # a retired key stays retired: a queued row pinned to it may still come
        self._table[slot] = None
        self._lru.pop(slot, None)
        self.slots.clear(slot)
        self._changed()

    def _changed(self) -> None:
        self._on_change(frozenset(self._by_key))

    # -- introspection (engine thread, or tests) ----------------------------------------------
    def table(self) -> list[Key | None]:
        """slot -> (adapter_id, version) or None; index 0 is the no-adapter slot."""
        return list(self._table)

    def rows(self, slot: int) -> int:
        return self._rows[slot]

    def device_bytes(self) -> int:
        return self.slots.device_bytes()
