"""The page pool as a state machine (every invariant checked after every operation) and the paged cache's
memory: writes land at their slots, reads gather a row's pages, untouched pages are zero."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.kv_cache import PagedKVCache
from server.engine.pages import VIRTUAL, NoPages, PagePool, page_keys

PS = 4


def keys(salt: str, ids: list[int]) -> list[bytes]:
    return page_keys(salt, ids, PS)


def test_rows_take_pages_as_they_grow_and_give_them_back():
    pool = PagePool(9, PS)  # 8 pages besides the zero page
    pool.check()
    pool.open(1)
    assert pool.grow(1, 5) == [1, 2] and pool.table(1) == [1, 2]
    pool.check()
    assert pool.grow(1, 8) == [] and pool.grow(1, 9) == [3]
    pool.open(2)
    assert pool.grow(2, 21) is None and pool.table(2) == []  # 6 pages asked, 5 left: nothing changes
    pool.check()
    assert pool.grow(2, 20) == [4, 5, 6, 7, 8] and pool.available == 0 and pool.in_use == 8
    pool.check()
    pool.close(1)
    assert pool.available == 3 and sorted(pool.free) == [1, 2, 3]
    pool.check()
    pool.close(2)
    assert pool.available == 8 and pool.in_use == 0 and not pool.tables
    pool.check()


def test_full_pages_are_cached_found_by_their_keys_and_evicted_least_recently_used():
    pool = PagePool(5, PS)
    a = keys("base", list(range(10)))  # 2 full pages
    pool.open(1)
    pool.grow(1, 10)
    assert pool.register(1, a) == 2 and pool.lookup(a) == pool.table(1)[:2]
    pool.check()
    pool.close(1)  # its keyed pages stay cached; the partial one is free
    assert len(pool.lru) == 2 and len(pool.free) == 2 and pool.available == 4 and pool.in_use == 0
    pool.check()
    assert pool.lookup(a) == [1, 2] and pool.lookup(keys("adapter", list(range(10)))) == []
    assert pool.lookup(keys("base", [0, 1, 2, 3, 9, 9, 9, 9])) == [1]  # a shared first page only
    pool.open(2, [1])  # a second request holds the first cached page again
    assert list(pool.lru) == [2] and pool.ref[1] == 1
    pool.check()
    pool.grow(2, 16)  # 3 more pages: the 2 free ones, then page 2 is evicted
    assert pool.lookup(a) == [1] and 2 not in pool.key_of and pool.available == 0
    pool.check()
    pool.close(2)
    pool.check()


def test_a_key_computed_twice_is_kept_by_the_first_page():
    pool = PagePool(9, PS)
    k = keys("base", [5] * 8)
    for row in (1, 2):
        pool.open(row)
        pool.grow(row, 8)
    assert pool.register(1, k) == 2 and pool.register(2, k) == 0
    assert pool.lookup(k) == pool.table(1)
    pool.close(2)  # its unkeyed pages are freed, not cached
    assert len(pool.free) == 6
    pool.check()


def test_fork_shares_full_pages_and_copies_a_partial_one():
    pool = PagePool(6, PS)
    pool.open(1)
    pool.grow(1, 6)
    assert pool.fork(1, 2, 6) == (2, 3)  # page 2 of row 1 is partial: copied into page 3
    assert pool.table(2) == [1, 3] and pool.ref[1] == 2
    pool.check()
    assert pool.fork(1, 3, 4) is None and pool.table(3) == [1]  # a whole page: nothing to copy
    pool.check()
    assert pool.grow(3, 12) == [4, 5] and pool.available == 0  # take every page left
    with pytest.raises(NoPages):
        pool.fork(1, 4, 6)
    assert 4 not in pool.tables
    pool.check()
    for r in (1, 2, 3):
        pool.close(r)
    assert pool.in_use == 0
    pool.check()


def test_keys_chain_salt_and_mark_virtual_positions():
    ids = [VIRTUAL] * 3 + list(range(9))
    k = keys("a", ids)
    assert len(k) == 3 and len(set(k)) == 3
    assert keys("a", ids[:8]) == k[:2]  # a prefix's keys are the prefix of the keys
    assert keys("b", ids)[0] != k[0]  # another adapter's content: other keys
    assert keys("a", [0] * 3 + ids[3:])[0] != k[0]  # virtual positions are not token 0
    assert page_keys("a", ids[4:], PS, parent=k[0]) == k[1:]  # chained from the page before


def test_random_operations_keep_every_invariant():
    rng = random.Random(0)
    pool = PagePool(17, PS)
    rows: dict[int, list[int]] = {}  # row -> its ids so far
    nxt = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.3 or not rows:
            ids = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
            hits = pool.lookup(keys("s", ids)[: (len(ids) - 1) // PS])
            room = pool.available - sum(1 for p in hits if pool.ref[p] == 0)
            if pool.pages_for(len(ids)) - len(hits) <= room:
                nxt += 1
                pool.open(nxt, hits)
                assert pool.grow(nxt, len(ids)) is not None
                rows[nxt] = ids
        elif op < 0.6:
            r = rng.choice(list(rows))
            rows[r].append(rng.randrange(3))
            if pool.grow(r, len(rows[r])) is None:
                pool.close(r)  # preempted
                del rows[r]
        elif op < 0.75:
            r = rng.choice(list(rows))
            pool.register(r, keys("s", rows[r]))
        elif op < 0.8:
            r = rng.choice(list(rows))
            nxt += 1
            try:
                pool.fork(r, nxt, len(rows[r]))
                rows[nxt] = list(rows[r])
            except NoPages:
                pass
        else:
            r = rng.choice(list(rows))
            pool.close(r)
            del rows[r]
        pool.check()
        for r, ids in rows.items():  # every row holds exactly the pages of its positions
            assert len(pool.table(r)) == pool.pages_for(len(ids))
        for k, p in pool.page_of.items():  # a cached page is found only by its own key
            assert pool.key_of[p] == k


def test_writes_land_at_their_slots_and_reads_gather_whole_pages():
    c = PagedKVCache(layers=2, kv_heads=2, head_dim=3, n_pages=6, page_size=PS, dtype=torch.float32,
                     device=torch.device("cpu"))
    c.ready(6)
    assert c.k.abs().sum() == 0  # zeroed when handed out: a gather never reads garbage
    tables = torch.tensor([[3, 1, 0], [2, 0, 0]])  # row 0: pages 3 then 1; row 1: page 2
    pos = torch.tensor([[0, 1, 4, 5], [0, 1, 2, 3]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    slots = c.slots(tables, pos, valid)
    assert slots.tolist() == [[12, 13, 4, 21], [8, 9, 10, 11]]  # the padding position goes to the sink (page 5)
    k = torch.arange(8 * 2 * 3, dtype=torch.float32).view(8, 2, 3)
    c.write(1, slots.reshape(-1), k, -k)
    assert c.k[:, :, 0].abs().sum() == 0  # page 0, read where a table has no page, is never written
    kc, vc = c.read(1, tables, 6)
    assert kc.shape == (2, 2, 6, 3)
    assert torch.equal(kc[0, :, [0, 1, 4]], k[[0, 1, 2]].transpose(0, 1))
    assert torch.equal(kc[1, :, :4], k[4:].transpose(0, 1)) and torch.equal(vc, -kc)
    assert c.k[0].abs().sum() == 0  # layer 0 untouched
    c.copy_page(3, 5)
    assert torch.equal(c.k[:, :, 5], c.k[:, :, 3])
    c.write_positions([4, 5], 2, torch.ones(2, 2, 3, 3), torch.ones(2, 2, 3, 3))  # positions 2..4: pages 4, 5
    assert c.k[:, :, 4, 2:].eq(1).all() and c.k[:, :, 5, 0].eq(1).all() and c.k[:, :, 4, :2].eq(0).all()
