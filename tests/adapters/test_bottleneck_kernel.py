"""The native bottleneck kernel (server/kernels/bottleneck_rows.cpp) against the PyTorch path it stands in for.

The AdapterHub bfloat16 tests (tests/engine/test_precision.py) run through it wherever it serves; these
check it directly at one residual add of a bfloat16 model: rows of adapters of different widths, inputs
(a + h, a, h) and activations beside rows of none, in decode shapes, and the batches it leaves to PyTorch."""

from __future__ import annotations

import json

import pytest
import torch

from server import kernels
from server.adapters.methods.bottleneck import (
    BOTTLENECK_ROWS,
    NATIVE_ACTS,
    NATIVE_TOKENS,
    BottleneckPlan,
)
from server.adapters.synth import write_adapterhub_bn
from tests.helpers import fixture_dir, parse_folder, runner_and_slots, tiny_model

pytestmark = pytest.mark.skipif(kernels.load("bottleneck_rows", BOTTLENECK_ROWS) is None, reason="no C++ compiler")

BF16 = torch.bfloat16
# slot -> (preset, activation): z = a + h (seq_bn), h (par_bn, width H/2), a (double_seq_bn), every activation
ADAPTERS = {1: ("seq_bn", "relu"), 2: ("par_bn", "relu"), 3: ("double_seq_bn", "swish"), 4: ("seq_bn", "gelu"),
            5: ("seq_bn", "gelu_new"), 6: ("par_bn", "tanh"), 7: ("seq_bn", "leakyrelu"), 8: ("seq_bn", "sigmoid")}


def counted(kernel, calls: list[int]):  # noqa: ANN001, ANN201
    return lambda *a: calls.append(1) or kernel(*a)


def site(tmp_path, native: bool, rows: list[int], T: int, calls: list[int], loc: str = "mlp",
         extra: str | None = None, dtype: torch.dtype = BF16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the residual add of layer 1 at `loc` as the adapters change it, h, a) for random h, a of bfloat16
    values; rows[b] is row b's slot (0: none, else ADAPTERS; 9: the AdapterHub fixture `extra`)."""
    model = tiny_model().to(dtype)
    _, slots = runner_and_slots(model, 10, native=native)
    cfg = model.config
    for s, (preset, act) in ADAPTERS.items():
        folder = write_adapterhub_bn(tmp_path / f"{s}-{native}", cfg.num_hidden_layers, cfg.hidden_size, preset, seed=s)
        meta = json.loads((folder / "adapter_config.json").read_text())
        meta["config"]["non_linearity"] = act
        (folder / "adapter_config.json").write_text(json.dumps(meta))
        slots.write(s, parse_folder(folder, model))
    if extra is not None:
        slots.write(9, parse_folder(fixture_dir(extra), model))
    plan = slots.plan(rows)
    bn = next(p for p in plan.plans if isinstance(p, BottleneckPlan))
    if bn.kernel is not None:
        bn.kernel = counted(bn.kernel, calls)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(len(rows), T, cfg.hidden_size, generator=g).to(BF16).to(dtype)
    a = torch.randn(len(rows), T, cfg.hidden_size, generator=g).to(BF16).to(dtype)
    out = plan.residual(1, loc, h, a)
    assert out is not None
    return out, h, a


def one_step(got: torch.Tensor, want: torch.Tensor, res: torch.Tensor) -> bool:
    """Within one bfloat16 step of the terms summed: the PyTorch path rounds the residual res = a + h plus
    the up product, then adds the bias, so where they cancel its result is off by a step of the larger."""
    step = 2.0 ** -7 * (want.float().abs() + res.float().abs()).clamp(min=2.0 ** -126)
    return bool(((got.float() - want.float()).abs() <= step).all())


@pytest.mark.parametrize("T", [1, 3])
def test_the_kernel_computes_what_the_pytorch_path_computes(tmp_path, T):
    rows = [1, 0, 2, 3, 4, 5, 0, 6, 7, 8, 2, 1]
    calls: list[int] = []
    got, h, a = site(tmp_path, True, rows, T, calls)
    want, h2, a2 = site(tmp_path, False, rows, T, [])
    assert calls == [1] and torch.equal(h, h2) and torch.equal(a, a2)
    none = torch.tensor([s == 0 for s in rows])
    assert torch.equal(got[none], (a + h)[none])  # rows of none: the decoder's own add, bit for bit
    assert not torch.equal(got[~none], (a + h)[~none])  # the adapters changed their rows
    assert one_step(got, want, a + h)  # the same float32 sums in another order, rounded once where PyTorch rounds twice
    # and no further from the float32 function (the same inputs, the adapters unrounded) than PyTorch is
    f32, _, _ = site(tmp_path, False, rows, T, [], dtype=torch.float32)
    err = lambda x: (x.float() - f32)[~none].abs().mean().item()  # noqa: E731
    assert err(got) <= 1.05 * err(want)
    assert set(a for _, a in ADAPTERS.values()) <= set(NATIVE_ACTS)


def test_the_attention_site_reads_its_own_input(tmp_path):
    """double_seq_bn also sits after attention, reading a (original_ln_before off); rows of adapters
    without a block there are rows of none."""
    rows = [3, 1, 3, 0]
    calls: list[int] = []
    got, h, a = site(tmp_path, True, rows, 1, calls, loc="attn")
    want, _, _ = site(tmp_path, False, rows, 1, [], loc="attn")
    assert calls == [1] and one_step(got, want, a + h)
    assert torch.equal(got[1:2], (a + h)[1:2]) and torch.equal(got[3:], (a + h)[3:])


def test_what_the_kernel_does_not_take_goes_by_pytorch(tmp_path):
    """Batches past NATIVE_TOKENS tokens (prefill), and sites with the adapter's own layer norms."""
    calls: list[int] = []
    rows = [1, 2]
    got, _, _ = site(tmp_path, True, rows, NATIVE_TOKENS // len(rows) + 1, calls)
    want, _, _ = site(tmp_path, False, rows, NATIVE_TOKENS // len(rows) + 1, [])
    assert calls == [] and torch.equal(got, want)
    got, _, _ = site(tmp_path, True, [9, 1], 1, calls, extra="seq_bn_ln")
    want, _, _ = site(tmp_path, False, [9, 1], 1, [], extra="seq_bn_ln")
    assert calls == [] and torch.equal(got, want)


def test_sites_with_a_wide_adapter_take_the_kernel_for_a_few_of_its_tokens_only(tmp_path, monkeypatch):
    """Past NATIVE_WIDTH (here lowered under par_bn's width) the kernel serves batches of 2 to 8 tokens, and
    larger ones whose wide adapters have at most 8 tokens (a par_bn on a few rows of a mixed batch): one
    token, and many tokens of a wide adapter, go by oneDNN's products, which beat it there."""
    from server.adapters.methods import bottleneck

    monkeypatch.setattr(bottleneck, "NATIVE_WIDTH", 16)
    for rows, T, native in (([2, 1], 1, True), ([2], 1, False), ([2] * 16, 1, False), ([2, 1] * 8, 1, True),
                            ([2, 1, 1, 1] * 4, 3, False), ([2, 0, 1, 1] * 4, 2, True), ([1], 1, True)):
        calls: list[int] = []
        site(tmp_path, True, rows, T, calls)
        assert calls == ([1] if native else []), (rows, T)
    got, _, _ = site(tmp_path, True, [2, 1, 0, 6] * 4, 1, [])  # the wide adapters' rows by the kernel: the same sums
    want, h, a = site(tmp_path, False, [2, 1, 0, 6] * 4, 1, [])
    assert one_step(got, want, a.float() + h.float())
