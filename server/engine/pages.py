"""The KV cache's pages: which page holds which row's positions, and which full pages are cached. No torch.

The pool has `n_pages` pages of `page_size` positions; page 0 is the zero page, never handed out:
page-table entries past a row's pages point at it, and nothing writes it (padding goes to the cache's
sink, a page past the pool: kv_cache.py), so a gather reads zeros there. Every other page is in exactly
one state:
- free: on the free stack (the most recently freed on top, so hot pages are reused first);
- referenced: in the tables of `ref[page]` rows (several when rows share it: a cached prefix, or the
  full pages of the `n` choices of one prompt); only a row's last page can still be written, and a
  page shared by two rows is always full, so no row ever writes a page another row reads;
- cached: full, keyed, and referenced by no row; kept in least-recently-used order and taken back
  (evicted) only when no free page is left.

A full page is keyed by `page_keys`: its parent page's key, its token ids and a salt naming what
computed it (the content digest of the adapter version, or the bare model's own). A request's
prompt looks its pages' keys up and reuses the longest run found from its first page. Two rows may
compute the same page at once: the first registered keeps the key, the other stays the row's own.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence


class NoPages(Exception):
    """Too few pages are left for what was asked."""


VIRTUAL = -1  # the token id recorded for a position an adapter puts before the prompt (its prefix)


def page_keys(salt: str, ids: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """The keys of the full pages of a row holding `ids` (one per position, VIRTUAL for an adapter's own
    positions), chained from `parent` (the key of the page before the first, b"" at position 0)."""
    out, key = [], parent
    head = salt.encode()
    for i in range(len(ids) // page_size):
        chunk = ids[i * page_size : (i + 1) * page_size]
        h = hashlib.blake2b(digest_size=16)
        h.update(struct.pack("<I", len(head)))
        h.update(head)
        h.update(key)
        h.update(struct.pack(f"<{page_size}q", *chunk))
        key = h.digest()
        out.append(key)
    return out


class PagePool:
    def __init__(self, n_pages: int, page_size: int) -> None:
        if n_pages < 2:
            raise ValueError("the KV cache needs at least one page besides the zero page")
        self.n_pages, self.page_size = n_pages, page_size
        self.free: list[int] = list(range(n_pages - 1, 0, -1))  # a stack: pop() gives 1, 2, 3, ... at first
        self.ref = [0] * n_pages
        self.tables: dict[int, list[int]] = {}  # row id -> its pages, in position order
        self.key_of: dict[int, bytes] = {}  # page -> its key (full, registered pages)
        self.page_of: dict[bytes, int] = {}  # key -> page
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached pages no row holds, least recently used first
        self.high = 1  # pages 1..high-1 have been handed out at least once (the rest were never written)

    # -- reading ------------------------------------------------------------------------------
    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    @property
    def available(self) -> int:
        """Pages a row could take now: free, or cached and held by no row (evicted when taken)."""
        return len(self.free) + len(self.lru)

    @property
    def in_use(self) -> int:
        """Pages some row holds."""
        return self.n_pages - 1 - self.available

    def table(self, row: int) -> list[int]:
        return self.tables[row]

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest run of `keys` from the first (takes nothing)."""
        out = []
        for k in keys:
            p = self.page_of.get(k)
            if p is None:
                break
            out.append(p)
        return out

    # -- changing -----------------------------------------------------------------------------
    def open(self, row: int, cached: Sequence[int] = ()) -> None:
        """A new row, starting with these cached pages (from `lookup`), which it now holds."""
        if row in self.tables:
            raise KeyError(f"row {row} already has a page table")
        for p in cached:
            self._hold(p)
        self.tables[row] = list(cached)

    def grow(self, row: int, positions: int) -> list[int] | None:
        """Give the row the pages it needs to hold `positions` positions: the pages added (evicting the least
        recently used cached pages when no free one is left), or None, changing nothing, when too few remain."""
        table = self.tables[row]
        need = self.pages_for(positions) - len(table)
        if need <= 0:
            return []
        if need > self.available:
            return None
        new = [self._take() for _ in range(need)]
        table.extend(new)
        return new

    def fork(self, src: int, dst: int, length: int) -> tuple[int, int] | None:
        """A new row `dst` holding what `src` holds in its first `length` positions: it shares src's full
        pages, and gets a page of its own for a partial last one (copy on write, done now: both rows write
        on past `length`). Returns (src page, dst page) to copy, if any; None, changing nothing, when no
        page is left for the copy."""
        full, part = divmod(length, self.page_size)
        if part and not self.available:
            raise NoPages("no page is left for the copy of a partial page")
        shared = self.tables[src][:full]
        self.open(dst, shared)
        if not part:
            return None
        page = self._take()
        self.tables[dst].append(page)
        return self.tables[src][full], page

    def register(self, row: int, keys: Sequence[bytes]) -> int:
        """Key the row's first len(keys) pages (all full); a key another page holds already is left to it.
        Returns the pages newly keyed."""
        table, n = self.tables[row], 0
        for p, k in zip(table, keys, strict=False):  # keys of its first pages; a partial last page has none
            if p in self.key_of:
                continue
            if k in self.page_of:
                continue  # computed twice at once: the first keeps the key
            self.key_of[p], self.page_of[k] = k, p
            n += 1
        return n

    def close(self, row: int) -> None:
        """The row leaves: every page it held that no other row holds becomes cached (keyed) or free."""
        for p in reversed(self.tables.pop(row)):  # reversed: its first pages end up on top of the free stack last
            self.ref[p] -= 1
            if self.ref[p] == 0:
                if p in self.key_of:
                    self.lru[p] = None
                else:
                    self.free.append(p)

    def _hold(self, p: int) -> None:
        if self.ref[p] == 0:
            self.lru.pop(p, None)
        self.ref[p] += 1

    def _take(self) -> int:
        if self.free:
            p = self.free.pop()
        else:
            p, _ = self.lru.popitem(last=False)  # evict the least recently used cached page
            del self.page_of[self.key_of.pop(p)]
        self.high = max(self.high, p + 1)
        self.ref[p] = 1
        return p

    # -- checking (tests) ---------------------------------------------------------------------
    def check(self) -> None:
        """Every invariant of the pool; AssertionError names the first one broken."""
        counts = [0] * self.n_pages
        for table in self.tables.values():
            for p in table:
                counts[p] += 1
        assert counts[0] == 0 and self.ref[0] == 0, "the zero page is in a table"
        assert counts == self.ref, "reference counts disagree with the tables"
        free, lru = set(self.free), set(self.lru)
        assert len(free) == len(self.free), "a page is on the free stack twice"
        held = {p for p in range(1, self.n_pages) if self.ref[p]}
        assert not free & lru and not free & held and not lru & held, "a page is in two states"
        assert free | lru | held == set(range(1, self.n_pages)), "a page is in no state"
        assert lru <= set(self.key_of), "a cached page has no key"
        assert not free & set(self.key_of), "a free page has a key"
        assert all(self.page_of[k] == p for p, k in self.key_of.items()), "keys and pages disagree"
        assert len(self.page_of) == len(self.key_of), "keys and pages disagree"
        assert all(p < self.high for p in held | lru), "a page in use was never handed out"
