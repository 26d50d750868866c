"""The KV cache on its own: growth keeps what is in use, shrinking frees, rows move, the static mode never moves."""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_cache import KVCache, pow2

CPU = torch.device("cpu")


def cache(**kw) -> KVCache:
    return KVCache(layers=2, rows=8, kv_heads=2, head_dim=4, max_len=512, dtype=torch.float32, device=CPU, **kw)


def test_pow2_and_shapes():
    assert [pow2(n, 64) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]
    c = cache()
    assert c.shape_for(3, 100) == (4, 128)
    assert c.shape_for(20, 100)[0] == 8  # never past max rows
    assert c.tokens_for(3, 100) == 4 * 128


def test_growth_keeps_rows_in_use_and_shrink_frees():
    c = cache()
    c.fit(2, 40, 0, 0)
    c.k[:, :2, :, :40] = torch.randn(2, 2, 2, 40, 4)
    kept = c.k[:, :2, :, :40].clone()
    c.fit(5, 300, 2, 40)  # more rows and a longer row: reallocated, contents kept
    assert (c.rows, c.cap) == (8, 512) and torch.equal(c.k[:, :2, :, :40], kept)
    big = c.nbytes()
    c.fit(1, 40, 1, 40)  # the long rows left: shrinks by 4x or more
    assert c.nbytes() < big and torch.equal(c.k[:, :1, :, :40], kept[:, :1])


def test_move_row_copies_only_its_length():
    c = cache()
    c.fit(3, 64, 0, 0)
    c.k[:, 2, :, :10] = 7.0
    c.v[:, 2, :, :10] = 9.0
    c.move_row(2, 0, 10)
    assert (c.k[:, 0, :, :10] == 7).all() and (c.v[:, 0, :, :10] == 9).all() and (c.k[:, 0, :, 10:] == 0).all()


def test_static_cache_is_allocated_once_and_refuses_overflow():
    c = cache(static=True)
    k = c.k
    assert (c.rows, c.cap) == (8, 512)
    c.fit(8, 512, 3, 100)
    assert c.k is k and c.tokens_for(3, 10) == 3 * 512  # each row pins a whole context
    with pytest.raises(ValueError):
        c.fit(9, 10, 0, 0)
