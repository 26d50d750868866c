"""Graph replay's storage for methods with per-slot blocks: every slot's block at a site side by side.

A captured graph reads fixed addresses, so a method that serves replayed batches keeps, per site (a
Linear for LoRA, a residual add for the bottlenecks), one table holding every slot's block zero-padded
to a common width `R`. The layout is built on the first static plan and written in place after each
write or clear; it is dropped, to be rebuilt at the next static plan, when a write does not fit (a new
site, a wider block, anything the tables were not built for) or when the widest block at a site left
(`outgrown`). Its `version` changes whenever the tables captured graphs read are replaced, so graphs
captured over old tables are not replayed (graphs.py).

The method says how to build, fit and fill its tables (`StaticSites`); this module owns when.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

K = TypeVar("K")
T = TypeVar("T", bound="Padded")


class Padded(Protocol):
    R: int  # the width every slot's block is padded to


class StaticSites(Protocol[K, T]):
    """What a method with per-slot blocks provides for its static layout."""

    def build_static(self) -> dict[K, T]:
        """Tables for every site some slot uses, each holding every slot's block."""

    def fits_static(self, slot: int, tables: dict[K, T]) -> bool:
        """Whether `slot`'s blocks (as written now) fit `tables` in place."""

    def put_static(self, key: K, table: T, slot: int) -> None:
        """Write `slot`'s block at `key` into `table` (identity where it has none)."""

    def widths(self, key: K) -> Iterable[int]:
        """The widths (ranks) of the blocks the slots hold at `key` now."""


def outgrown(padded: int, widths: Iterable[int]) -> bool:
    """Whether a table padded to `padded` should be rebuilt for the blocks left at its site: when the
    widest is at most half the padding. Halving, not any shrink, so an adapter that comes and goes does
    not rebuild the layout every time."""
    return 2 * max(widths, default=0) <= padded


class StaticLayout(Generic[K, T]):
    def __init__(self, sites: StaticSites[K, T]) -> None:
        self.sites = sites
        self._tables: dict[K, T] | None = None
        self._built = 0

    def tables(self) -> dict[K, T]:
        """The tables, built now if there are none."""
        if self._tables is None:
            self._tables = self.sites.build_static()
            self._built += 1
        return self._tables

    def current(self) -> dict[K, T]:
        """The tables as they are (none built: empty), without building."""
        return self._tables or {}

    @property
    def version(self) -> int:
        """Changes when the tables are replaced; with none built, the version the next build will have."""
        return self._built + (self._tables is None)

    def drop(self) -> None:
        """Tables the captured graphs read were replaced elsewhere (a method's own graph-ready storage):
        drop these too, so the version changes and graphs are captured again."""
        self._tables = None

    def written(self, slot: int) -> None:
        """Mirror `slot` as it is now into the tables, or drop them when it does not fit."""
        if self._tables is None:
            return
        if not self.sites.fits_static(slot, self._tables):
            self._tables = None
            return
        for key, table in self._tables.items():
            self.sites.put_static(key, table, slot)

    def cleared(self, slot: int) -> None:
        """`slot` was emptied: reset its blocks, and drop tables padded for blocks that have left."""
        self.written(slot)
        if self._tables is not None and any(outgrown(t.R, self.sites.widths(k)) for k, t in self._tables.items()):
            self._tables = None
