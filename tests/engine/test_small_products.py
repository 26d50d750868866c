"""The base model's bfloat16 products of decode-sized batches by the native kernel (server/kernels/gemv_bf16.cpp)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.small_products import ROWS, SmallProducts

BF16 = torch.bfloat16
small = SmallProducts(True)
pytestmark = pytest.mark.skipif(small.kernel is None, reason="no compiler or no AVX512-BF16 on this CPU")


@pytest.mark.parametrize("rows", [2, 3, ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_a_few_rows_equal_the_float32_product_rounded_once(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=g).to(BF16)
    w = torch.randn(37, 96, generator=g).to(BF16)  # 37 outputs: a partial block of four at the end
    b = torch.randn(37, generator=g).to(BF16) if bias else None
    got = small.linear(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # the sum of the bf16 values
    assert got.shape == (rows, 1, 37) and got.dtype == BF16
    # float32 accumulation in another order than float64's: within one bfloat16 step of the exact sum
    assert ((got.double() - exact).abs() <= 2.0**-7 * exact.abs() + 1e-6).all()
    assert (got == exact.to(BF16)).float().mean().item() > 0.95
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2.0**-7, atol=1e-3)


def test_what_the_kernel_does_not_take_goes_to_f_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g).to(BF16)
    calls = []
    k = small.kernel
    small.kernel = lambda *a: calls.append(a) or k(*a)
    try:
        for x in (torch.randn(1, 64, generator=g).to(BF16),  # one row: PyTorch's product is as fast
                  torch.randn(ROWS + 1, 64, generator=g).to(BF16),  # past ROWS
                  torch.randn(2, 48, generator=g).to(BF16),  # K not a multiple of 32
                  torch.randn(2, 64, generator=g)):  # float32
            ww = w if x.shape[-1] == 64 else torch.randn(16, 48).to(BF16)
            assert torch.equal(small.linear(x, ww.to(x.dtype)), F.linear(x, ww.to(x.dtype)))
        assert calls == []
        small.linear(torch.randn(2, 64, generator=g).to(BF16), w)
        assert len(calls) == 1
    finally:
        small.kernel = k
