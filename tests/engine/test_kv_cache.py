"""The page pool as a state machine (every invariant checked after every operation) and the paged cache's
memory: writes land at their slots, reads gather a row's pages, untouched pages are zero, and decode
attention over pages (the native kernel and the PyTorch gather) is attention as defined."""

from __future__ import annotations

import random

import pytest
import torch

from server import kernels
from server.engine.kv_cache import DecodeStep, PagedKVCache
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


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, pos: torch.Tensor,
                        window: int | None, scale: float) -> torch.Tensor:
    """One row at a time in float64, from the definition: row b's query heads over its keys 0..pos[b] (the
    last `window` of them), read position by position through its page table; q [B, H, 1, d]."""
    B, H, _, d = q.shape
    kvh, _, ps, _ = k.shape
    out = torch.zeros(B, H, 1, d, dtype=torch.float64)
    for b in range(B):
        js = [j for j in range(int(pos[b]) + 1) if window is None or j > int(pos[b]) - window]
        if not js:
            continue
        keys = torch.stack([k[:, int(tables[b, j // ps]), j % ps] for j in js], dim=1).double()  # [kvh, L, d]
        values = torch.stack([v[:, int(tables[b, j // ps]), j % ps] for j in js], dim=1).double()
        for h in range(H):
            g = h // (H // kvh)  # the K/V head this query head shares
            w = torch.softmax(keys[g] @ q[b, h, 0].double() * scale, dim=0)
            out[b, h, 0] = w @ values[g]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "heads", "head_dim", "page_size", "window"),
                         [(3, 9, 64, 16, None), (2, 2, 16, 4, None), (1, 4, 8, 8, 5), (2, 8, 32, 16, 20)])
def test_decode_attention_reads_pages_in_place_as_the_definition_and_the_gather_compute(
        dtype, kv_heads, heads, head_dim, page_size, window):
    """The native kernel (pages read where they lie) and the PyTorch gather agree with attention computed
    from its definition, over rows of different lengths whose tables share a page and name pages in any
    order; a row of no key (padding) gives zeros in the kernel."""
    torch.manual_seed(kv_heads * 100 + head_dim)
    n_pages, B = 40, 5
    caches = [PagedKVCache(2, kv_heads, head_dim, n_pages, page_size, dtype, torch.device("cpu"), native=n)
              for n in (True, False)]
    assert caches[0]._kernel is not None, kernels_error()
    assert caches[1]._kernel is None
    kv = torch.randn(2, 2, kv_heads, n_pages, page_size, head_dim).to(dtype)
    for c in caches:
        c.k.copy_(kv[0])
        c.v.copy_(kv[1])
    pos = torch.tensor([0, 3, 2 * page_size + 1, 5 * page_size - 1, 3 * page_size])
    tables = torch.randperm(n_pages - 2)[: B * 6].view(B, 6) + 1
    tables[1, 0] = tables[3, 0]  # a shared page
    q = torch.randn(B, heads, 1, head_dim).to(dtype)
    step = DecodeStep(tables, pos, int(pos.max()) + 1, page_size)
    want = attention_reference(q, kv[0, 1], kv[1, 1], tables, pos, window, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        for c in caches:
            got = c.decode(1, q, step, window, 0.3)
            assert got.dtype == dtype and got.shape == q.shape
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        empty = DecodeStep(tables[:1], torch.tensor([-1]), 1, page_size)  # a padding row: no key at all
        assert caches[0].decode(1, q[:1], empty, window, 0.3).eq(0).all()


def test_a_table_naming_a_page_outside_the_pool_or_too_short_is_refused_not_read():
    c = PagedKVCache(1, 1, 8, 6, PS, torch.float32, torch.device("cpu"))
    assert c._kernel is not None, kernels_error()
    for table, pos in (([[1, 99]], 5), ([[1, 2]], 9)):  # page 99 of 6; 10 keys in a table of 2 pages of 4
        step = DecodeStep(torch.tensor(table), torch.tensor([pos]), pos + 1, PS)
        step.tables = torch.tensor(table)  # as a caller might pass it (DecodeStep keeps only the pages kv_len needs)
        with pytest.raises(IndexError):
            c.decode(0, torch.randn(1, 2, 1, 8), step, None, 1.0)


def test_without_a_compiler_the_cache_keeps_the_pytorch_path(tmp_path, monkeypatch):
    """A build that fails (no compiler here) says why and leaves the kernel unloaded; nothing is cached."""
    monkeypatch.setenv("ADAPTER_SERVER_KERNELS", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_LOADED", {})
    monkeypatch.setattr(kernels, "errors", {})
    c = PagedKVCache(1, 1, 8, 6, PS, torch.float32, torch.device("cpu"))
    assert c._kernel is None and "paged_decode" in kernels.errors
    assert not list(tmp_path.glob("*.so"))
    c.ready(6)  # pages as a row takes them: zeroed
    step = DecodeStep(torch.tensor([[1, 2]]), torch.tensor([5]), 6, PS)
    assert c.decode(0, torch.randn(1, 2, 1, 8), step, None, 1.0).isfinite().all()


def kernels_error() -> str:
    return f"the native kernel did not build here: {kernels.errors}"
