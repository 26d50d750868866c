"""The device side of the adapter tiers, owned by the engine thread alone (vLLM's worker-side manager).

The registry keeps the catalogue (ids, versions, pins, the host tier, the disk store). This class keeps
the device slot table: which version sits in which slot, the slots' LRU order, how many admitted rows
use each slot, and the device bytes each slot's adapter holds. Two limits bound the tier: the slot count,
and a byte budget (a trained LM head is as large as the base model's, an (IA)3 vector a few KB), so a
new adapter evicts as many idle ones, least recently granted first, as it needs room. It is the only
code that writes or clears a slot, so the table and the slot storage (and `device_bytes`) cannot drift
apart. What happens elsewhere reaches it as calls made on the
engine thread: `grant` when a row is admitted, `release` when it leaves, `retire` when the registry
replaced or deleted a version (a message through the engine's inbox).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..errors import AdapterTooLargeError
from .registry import Key
from .slots import AdapterSlots
from .spec import AdapterWeights


class AdapterManager:
    def __init__(self, slots: AdapterSlots, on_change: Callable[[frozenset[Key]], None] | None = None,
                 on_evict: Callable[[], None] | None = None, byte_budget: int = 0) -> None:
        """`byte_budget`: device bytes the resident adapters may hold together (0: no limit but the slots)."""
        self.slots = slots
        self.byte_budget = byte_budget
        n = slots.num_slots
        self._table: list[Key | None] = [None] * (n + 1)  # index 0: "no adapter"
        self._bytes = [0] * (n + 1)  # device bytes of each slot's adapter (AdapterSlots.bytes_for)
        self._by_key: dict[Key, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently granted first
        self._rows = [0] * (n + 1)  # admitted rows using each slot
        self._retired: set[Key] = set()  # versions replaced or deleted: cleared once no row uses them
        self._on_change = on_change or (lambda keys: None)  # residency changed (registry tiers, metrics)
        self._on_evict = on_evict or (lambda: None)  # an idle adapter made room for another (metrics)
        self.loads = self.evictions = 0

    # -- engine-thread operations -------------------------------------------------------------
    def grant(self, key: Key, weights: Callable[[], AdapterWeights]) -> tuple[int, bool] | None:
        """A slot for one admitted row of `key`: (slot, whether it was written now), or None when the slots or
        bytes it needs are held by running rows (the row waits). `weights` gives the host copy, read only on
        a write. AdapterTooLargeError: it needs more than the whole byte budget (it never fits)."""
        slot = self._by_key.get(key)
        written = False
        if slot is None:
            w = weights()
            need = self.needs(w)
            slot = self._free_slot(need)
            if slot is None:
                return None
            try:
                self.slots.write(slot, w)
            except BaseException:  # out of device memory for its tables, say: the slot is left free, not half written
                self.slots.clear(slot)
                raise
            self._bytes[slot] = need
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

    def needs(self, weights: AdapterWeights) -> int:
        """The device bytes `weights` would take in a slot; AdapterTooLargeError past the whole budget."""
        need = self.slots.bytes_for(weights)
        if self.byte_budget and need > self.byte_budget:
            raise AdapterTooLargeError(f"the adapter needs {need} bytes on the device, more than the server's whole "
                                       f"budget for adapters ({self.byte_budget} bytes, --adapter-device-bytes)")
        return need

    def _fits(self, need: int) -> bool:
        return not self.byte_budget or sum(self._bytes) + need <= self.byte_budget

    def _free_slot(self, need: int) -> int | None:
        """A slot for an adapter of `need` bytes: a free one, after evicting idle adapters, least recently
        granted first, until the bytes fit too. None, evicting nothing, when the busy ones leave no room."""
        free = next((s for s in range(1, len(self._table)) if self._table[s] is None), None)
        idle = [s for s in self._lru if self._rows[s] == 0]  # least recently granted first
        busy_bytes = sum(self._bytes) - sum(self._bytes[s] for s in idle)
        if (free is None and not idle) or (self.byte_budget and busy_bytes + need > self.byte_budget):
            return None
        for s in idle:
            if free is not None and self._fits(need):
                break
            self._clear(s)
            self.evictions += 1
            self._on_evict()
            free = s if free is None else free
        return free

    def _clear(self, slot: int) -> None:
        key = self._table[slot]
        if key is not None:
            del self._by_key[key]  # a retired key stays retired: a queued row pinned to it may still come
        self._table[slot] = None
        self._bytes[slot] = 0
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

    def slot_bytes(self, slot: int) -> int:
        """The bytes the byte budget counts for `slot`'s adapter (0 for a free slot)."""
        return self._bytes[slot]
