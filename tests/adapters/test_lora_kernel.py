"""The native LoRA kernel (server/kernels/lora_rows.cpp) against the PyTorch products it stands in for.

The PEFT parity tests run through the kernel wherever it serves (it is on by default); these check it
directly at one hook: a group of sibling Linears (q/k/v) whose rows use adapters of different ranks, one
of which adapts q and v only, beside rows of no adapter, in decode and prefill shapes, float32 and
bfloat16, and that it is the kernel that ran."""

from __future__ import annotations

import pytest
import torch

from server import kernels
from server.adapters.methods import write_demo
from server.adapters.methods.lora import LORA_ROWS, NATIVE_TOKENS, LoRAPlan
from tests.helpers import fixture_dir, parse_folder, runner_and_slots, tiny_model

pytestmark = pytest.mark.skipif(kernels.load("lora_rows", LORA_ROWS) is None, reason="no C++ compiler")

FIXTURES = ["lora_qv", "lora_all_linear", "lora_rslora"]  # PEFT's own files: ranks and targets differ
QKV = ("q_proj", "k_proj", "v_proj")


def counted(kernel, calls: list[int]):  # noqa: ANN001, ANN201
    """The kernel, noting each call in `calls`."""
    return lambda *a: calls.append(1) or kernel(*a)


def hook(tmp_path, native: bool, dtype: torch.dtype, rows: list[int], T: int, calls: list[int]) -> torch.Tensor:
    """q/k/v outputs after the LoRA hook of layer 1 for random inputs: rows[b] is row b's slot (0: none,
    1-3: FIXTURES, 4: a synthetic rank-48 LoRA)."""
    model = tiny_model().to(dtype)
    _, slots = runner_and_slots(model, 6, native=native)
    for s, name in enumerate(FIXTURES, start=1):
        slots.write(s, parse_folder(fixture_dir(name), model))
    slots.write(4, parse_folder(write_demo("lora48", tmp_path / f"lora48-{native}-{dtype}", model.config, seed=3), model))
    plan = slots.plan(rows)
    lora = next(p for p in plan.plans if isinstance(p, LoRAPlan))
    if lora.kernel is not None:
        lora.kernel = counted(lora.kernel, calls)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    sizes = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(rows), T, cfg.hidden_size, generator=g).to(dtype)
    base = torch.randn(len(rows), T, sum(sizes), generator=g).to(dtype)
    ys = plan.linear_out_group(1, QKV, x, list(base.clone().split(sizes, dim=-1)))
    return torch.cat(ys, dim=-1), base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 5])
def test_the_kernel_adds_what_the_pytorch_products_add(tmp_path, dtype, T):
    rows = [1, 0, 2, 3, 1, 4, 0, 2, 4, 3]
    calls: list[int] = []
    got, base = hook(tmp_path, True, dtype, rows, T, calls)
    want, base2 = hook(tmp_path, False, dtype, rows, T, [])
    assert calls == [1]  # one call for the three siblings
    assert torch.equal(base, base2)
    # rows of no adapter are not touched, bit for bit
    none = torch.tensor([s == 0 for s in rows])
    assert torch.equal(got[none], base[none])
    # an adapter of q and v only leaves k alone
    q, kv = tiny_model().config.hidden_size, got.shape[-1] - tiny_model().config.hidden_size
    only_qv = torch.tensor([s == 1 for s in rows])
    assert torch.equal(got[only_qv][..., q : q + kv // 2], base[only_qv][..., q : q + kv // 2])
    assert not torch.equal(got[only_qv][..., :q], base[only_qv][..., :q])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the same float32 sums in another order: at most the neighbouring bfloat16, rarely
        step = 2.0 ** -7 * want.float().abs().clamp(min=2.0 ** -126)
        assert ((got.float() - want.float()).abs() <= step).all()
        assert (got != want).float().mean().item() < 0.05


def test_long_batches_of_high_ranks_take_the_pytorch_products(tmp_path):
    rows = [4, 1] * 4
    T = NATIVE_TOKENS // len(rows) + 1  # past NATIVE_TOKENS, with a rank-48 adapter present
    calls: list[int] = []
    got, _ = hook(tmp_path, True, torch.float32, rows, T, calls)
    want, _ = hook(tmp_path, False, torch.float32, rows, T, [])
    assert calls == []
    assert torch.equal(got, want)
    calls.clear()
    hook(tmp_path, True, torch.float32, [2, 1, 0, 3] * 2, T, calls)  # ranks of 32 or less: the kernel
    assert calls == [1]


@pytest.mark.parametrize("name,module", [("dora_qv", "q_proj"), ("dora_rslora_all", "v_proj"), ("lora_bias", "k_proj")])
def test_dora_scales_and_lora_biases_in_the_kernel_equal_the_pytorch_products(name, module):
    """DoRA rows (y + (g - 1) W x + g delta, W x without the Linear's bias) and LoRA's own bias (added to
    the delta) through the kernel, beside rows of none."""
    out = {}
    for native in (True, False):
        model = tiny_model()
        lin = getattr(model.model.layers[1].self_attn, module)
        bias = torch.randn(lin.out_features, generator=torch.Generator().manual_seed(2)) * 0.1
        lin.bias = torch.nn.Parameter(bias, requires_grad=False)  # DoRA must not scale it
        _, slots = runner_and_slots(model, 2, native=native)
        slots.write(1, parse_folder(fixture_dir(name), model))
        rows = [1, 0, 1, 1, 0]
        plan = slots.plan(rows)
        calls: list[int] = []
        p = next(p for p in plan.plans if isinstance(p, LoRAPlan))
        if p.kernel is not None:
            p.kernel = counted(p.kernel, calls)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(len(rows), 3, model.config.hidden_size, generator=g)
        base = torch.randn(len(rows), 3, lin.out_features, generator=g)
        y = plan.linear_out(1, module, x, base.clone())
        out[native] = (y, calls, base)
    (got, calls, base), (want, _, _) = out[True], out[False]
    assert calls == [1]
    assert torch.equal(got[[1, 4]], base[[1, 4]])
    assert not torch.equal(got[[0, 2, 3]], base[[0, 2, 3]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [["lora_qv", "lora_all_linear", "lora_rslora"], ["dora_qv", "dora_rslora_all"]],
                         ids=["lora", "dora"])
def test_long_runs_of_several_adapters_by_pytorch_products_equal_the_kernel(names):
    """A prefill's rows in runs of one adapter each: without the kernel, two products per run (LoRA added
    into the output in place; DoRA through its delta), equal to the kernel's rows; rows of none untouched."""
    rows = [s for s in range(1, len(names) + 1) for _ in range(2)] + [0, 0]
    out = {}
    for native in (True, False):
        model = tiny_model()
        _, slots = runner_and_slots(model, len(names) + 1, native=native)
        for s, name in enumerate(names, start=1):
            slots.write(s, parse_folder(fixture_dir(name), model))
        g = torch.Generator().manual_seed(3)
        x = torch.randn(len(rows), 16, model.config.hidden_size, generator=g)
        base = torch.randn(len(rows), 16, model.config.hidden_size, generator=g)
        out[native] = slots.plan(rows).linear_out(1, "q_proj", x, base.clone()), base
    (got, base), (want, _) = out[True], out[False]
    assert torch.equal(want[-2:], base[-2:])
    assert not torch.equal(want[:-2], base[:-2])
    torch.testing.assert_close(want, got, rtol=1e-5, atol=1e-5)
