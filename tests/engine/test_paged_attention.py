"""The paged decode attention kernel (server/kernels/paged_attention.py) against the PyTorch path it can
replace (`PagedKVCache._gathered_decode`: the rows' pages gathered, SDPA with a mask). Without CUDA the
kernel runs in Triton's interpreter; on CUDA (make test-gpu) compiled."""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_cache import DecodeStep, PagedKVCache

paged = pytest.importorskip("server.kernels.paged_attention")
if not paged.available():
    pytest.skip("Triton kernels unavailable here", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("shape", [(4, 2, 32), (8, 8, 16)])  # (query heads, K/V heads, head dim)
def test_paged_decode_equals_the_gathered_sdpa(dtype, window, shape):
    """Rows of different lengths (one page or many, a partial last page), pages scattered through the
    pool in any order, tables wider than the longest row (a graph's KV bucket), grouped-query heads."""
    H, kvh, d = shape
    ps, n_pages = 16, 40
    cache = PagedKVCache(1, kvh, d, n_pages, ps, dtype, DEVICE, native=False)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    lengths = [1, 16, 17, 70, 33, 5]
    perm = torch.randperm(n_pages - 2, generator=g) + 1  # pages 1..n-2 (0 is the zero page, n-1 the sink)
    P = 6  # pages per row in the table: the bucket, wider than every row
    tables, used = [], 0
    for L in lengths:
        n = -(-L // ps)
        tables.append(perm[used:used + n].tolist() + [0] * (P - n))
        used += n
    t = torch.tensor(tables, device=DEVICE)
    pos = torch.tensor(lengths, device=DEVICE) - 1
    step = DecodeStep(t, pos, P * ps, ps)
    q = torch.randn(len(lengths), H, 1, d, generator=g).to(DEVICE, dtype)
    scale = d**-0.5
    want = cache._gathered_decode(0, q, step, window, scale)[:, :, 0].float()
    got = paged.decode(q[:, :, 0], cache.k[0], cache.v[0], step.tables, step.lengths, window, scale).float()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_shapes_the_kernel_does_not_take_go_by_the_gathered_path(monkeypatch):
    """More than BLOCK_G query heads per K/V head, or a head size or page size that is not a power of two
    of 16 or more: `supports` says no, and the cache decodes by its other path."""
    assert paged.supports(32, 8, 128, 16) and paged.supports(9, 3, 64, 16)
    assert not paged.supports(64, 2, 128, 16) and not paged.supports(8, 8, 80, 16) and not paged.supports(8, 8, 64, 8)
    cache = PagedKVCache(1, 1, 24, 4, 16, torch.float32, DEVICE, native=False)
    cache._triton = paged
    monkeypatch.setattr(paged, "decode", lambda *a: pytest.fail("the kernel was called for a shape it does not take"))
    cache.k.normal_()
    cache.v.normal_()
    step = DecodeStep(torch.tensor([[1]], device=DEVICE), torch.tensor([3], device=DEVICE), 16, 16)
    out = cache.decode(0, torch.randn(1, 2, 1, 24, device=DEVICE), step, None, 0.2)
    assert out.shape == (1, 2, 1, 24) and torch.isfinite(out).all()
