"""The segmented adapter kernels (server/kernels/segments.py) against the plain PyTorch products the graph
hooks take otherwise (`routed_delta`, every slot's block with each row keeping its own columns). Without
CUDA they run in Triton's interpreter; on CUDA (make test-gpu) compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.adapters.methods import route
from server.adapters.methods.lora import routed_delta

segments = pytest.importorskip("server.kernels.segments")
if not segments.available():
    pytest.skip(f"segmented kernels unavailable: {segments.ERROR}", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = torch.float32


def tables(S: int, R: int, inp: int, out: int, ranks: list[int], seed: int = 0):
    """A static layout as LoRA's _StaticModule holds it: blocks zero-padded to R, slot 0 empty."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(S, R, inp)
    sB = torch.zeros(out, S, R)
    sb = torch.zeros(S, out)
    gs = torch.ones(S, out)
    for s, r in enumerate(ranks):
        if r:
            A[s, :r] = torch.randn(r, inp, generator=g) / inp**0.5
            sB[:, s, :r] = torch.randn(out, r, generator=g)
            sb[s] = torch.randn(out, generator=g) * 0.1
            gs[s] = torch.rand(out, generator=g) + 0.5
    rank = torch.tensor(ranks, dtype=torch.int32)
    return [t.to(DEVICE) for t in (A, sB, sb, gs, rank)]


def routing(slots: list[int], U: int):
    uniq, _, order, starts = route(slots, U)
    return [torch.tensor(v, device=DEVICE) for v in (uniq, starts, order)]


def test_route_groups_rows_by_distinct_slot():
    uniq, local, order, starts = route([5, 0, 5, 2, 0], 4)
    assert uniq == [0, 2, 5, 0] and local == [2, 0, 2, 1, 0]
    assert order == [1, 4, 3, 0, 2] and starts == [0, 2, 3, 5, 5]
    for k in range(3):
        assert all(local[i] == k for i in order[starts[k]:starts[k + 1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("case", ["mixed", "one", "many_rows", "wide"])
@pytest.mark.parametrize("by_rows", [False, True])
def test_segmented_lora_equals_the_plain_products(dtype, dora, case, by_rows):
    """Rows of several adapters of different ranks, of none (slot 0), and of a slot without a block
    here (rank 0), in any order; distinct slots padded to a bucket; y a column slice of a wider output
    (a packed q/k/v product); inputs and outputs wider than one tile and not multiples of one. By
    segments, or with every row its own segment (`rows`)."""
    S, R, inp, out = 6, 16, 200, 96
    ranks = [0, 16, 8, 0, 4, 16]
    slots = {"mixed": [1, 4, 0, 1, 2, 3, 5, 2], "one": [2] * 5, "many_rows": [1, 2] * 17 + [0],
             "wide": [5, 1, 5]}[case]
    if case == "wide":
        R, inp, out, ranks = 64, 1100, 300, [0, 64, 8, 0, 0, 40]
    A, sB, sb, g, rank = tables(S, R, inp, out, ranks)
    B = len(slots)
    U = 1 << (len(set(slots)) - 1).bit_length()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, inp, generator=gen).to(DEVICE, dtype)
    packed = torch.randn(B, 1, out + 40, generator=gen).to(DEVICE, dtype)
    y = packed[:, :, 20:20 + out]
    bias = (torch.randn(out, generator=gen) * 0.1).to(DEVICE) if dora else None
    i = torch.tensor(slots, device=DEVICE)
    want = routed_delta(x, y.clone(), A, sB, sb, g if dora else None, bias, i, None, i)
    uniq, starts, order = routing(slots, U)
    before = packed.clone()
    if by_rows:
        ident = torch.arange(B + 1, device=DEVICE)
        got = segments.rows(x[:, 0], [y[:, 0]], [A], [sB], [sb], [rank], i, ident, [g] if dora else None,
                            [bias] if dora else None)
    else:
        got = segments.lora(x[:, 0], [y[:, 0]], [A], [sB], [sb], [rank], uniq, starts, order,
                            [g] if dora else None, [bias] if dora else None)
    assert got[0].data_ptr() == y.data_ptr()  # in place
    assert torch.equal(packed[:, :, :20], before[:, :, :20]) and torch.equal(packed[:, :, 20 + out:], before[:, :, 20 + out:])
    y32, want32 = y.float(), want.float()
    if dtype == torch.float32:
        torch.testing.assert_close(y32, want32, rtol=1e-5, atol=1e-5)
    else:  # the float32 sums differ in order: at most one bfloat16 rounding step apart
        ulp = want32.abs().clamp_min(1e-30) * 2**-7
        assert ((y32 - want32).abs() <= ulp).all()
        assert (y32 == want32).float().mean() > 0.9
    for b, s in enumerate(slots):  # rows of none, or of a slot without a block here, are untouched bit for bit
        if ranks[s] == 0:
            assert torch.equal(y[b], before[b, :, 20:20 + out])


def test_empty_segments_and_padding_rows_are_not_touched():
    """Rows outside every segment (a graph's padding rows) and padded distinct slots do nothing."""
    A, sB, sb, g, rank = tables(4, 16, 64, 32, [0, 16, 16, 8])
    x = torch.randn(8, 64, device=DEVICE)
    y = torch.randn(8, 32, device=DEVICE)
    uniq, starts, order = routing([1, 3, 1], 4)  # three real rows of a bucket of 8
    order = torch.cat([order, torch.zeros(5, dtype=order.dtype, device=DEVICE)])
    before = y.clone()
    segments.lora(x, [y], [A], [sB], [sb], [rank], uniq, starts, order)
    assert torch.equal(y[3:], before[3:])
    i = torch.tensor([1, 3, 1], device=DEVICE)
    want = routed_delta(x[:3, None], before[:3, None].clone(), A, sB, sb, None, None, i, None, i)[:, 0]
    torch.testing.assert_close(y[:3], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("by_rows", [False, True])
def test_sibling_modules_in_one_launch_equal_each_on_its_own(dtype, dora, packed, by_rows):
    """q/k/v-like siblings of one input, outputs of different widths (slices of one packed product, or
    separate tensors), each with its own tables and ranks (a module that a slot does not adapt: rank 0),
    in one shrink and one expand: the same as the plain products module by module."""
    S, R, inp = 5, 16, 160
    outs = [96, 32, 48]
    ranks = [[0, 16, 8, 4, 0], [0, 0, 8, 16, 16], [0, 16, 16, 4, 8]]
    mods = [tables(S, R, inp, o, rk, seed=k) for k, (o, rk) in enumerate(zip(outs, ranks, strict=True))]
    slots = [1, 3, 0, 2, 4, 1, 3]
    B = len(slots)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 1, inp, generator=gen).to(DEVICE, dtype)
    if packed:
        full = torch.randn(B, 1, sum(outs), generator=gen).to(DEVICE, dtype)
        ys = list(full.split(outs, dim=-1))
    else:
        ys = [torch.randn(B, 1, o, generator=gen).to(DEVICE, dtype) for o in outs]
    biases = [(torch.randn(o, generator=gen) * 0.1).to(DEVICE) for o in outs]
    i = torch.tensor(slots, device=DEVICE)
    want = [routed_delta(x, y.clone(), A, sB, sb, g if dora else None, bias if dora else None, i, None, i)
            for y, (A, sB, sb, g, _), bias in zip(ys, mods, biases, strict=True)]
    uniq, starts, order = routing(slots, 8)
    tabs = [[m[k] for m in mods] for k in (0, 1, 2, 4)]
    extra = ([m[3] for m in mods] if dora else None, biases if dora else None)
    if by_rows:
        segments.rows(x[:, 0], [y[:, 0] for y in ys], *tabs, i, torch.arange(B + 1, device=DEVICE), *extra)
    else:
        segments.lora(x[:, 0], [y[:, 0] for y in ys], *tabs, uniq, starts, order, *extra)
    for y, w in zip(ys, want, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)
        else:
            w32 = w.float()
            assert ((y.float() - w32).abs() <= w32.abs() * 2**-7).all()


def test_decode_batches_of_few_distinct_adapters_take_the_segmented_kernels():
    """Beside compiled hooks, the segmented kernels take a decode batch whose distinct slots average
    SEGMENT_ROWS rows or more; without compiled hooks, or forced, every decode batch; never a prefill."""
    from server.adapters.methods import Routing
    from server.adapters.methods.lora import SEGMENT_ROWS, LoRAStaticPlan
    from server.compiled import Guarded

    def plan(U: int, fused: bool, dispatch: str = "auto") -> LoRAStaticPlan:
        z = torch.zeros(16, dtype=torch.long)
        r = Routing(slots=z, uniq=torch.zeros(U, dtype=torch.long), local=z, order=z, starts=torch.zeros(U + 1),
                    ident=torch.arange(17))
        return LoRAStaticPlan({}, r, False, routed_delta, (lambda *a: None) if fused else None,
                              segmented=Guarded(lambda *a: None, "segmented"), dispatch=dispatch)

    x = torch.zeros(16, 1, 8)
    assert SEGMENT_ROWS == 8  # measured on an H100: the figures in BENCHMARKS.md, GPU notes
    assert [plan(U, True)._segments(x) for U in (1, 2, 4, 8)] == ["segments", "segments", None, None]  # 16 rows
    assert plan(8, False)._segments(x) == "segments"
    assert plan(8, True, "segments")._segments(x) == "segments" and plan(1, True, "rows")._segments(x) == "rows"
    assert plan(1, False)._segments(torch.zeros(16, 3, 8)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("acts", [["relu", "swish", "gelu"], ["gelu_new", "tanh", "leakyrelu", "sigmoid"]])
def test_segmented_bottleneck_products_equal_the_eager_ones(dtype, acts):
    """act(z W_down^T + b_down) W_up^T + b_up per row, each row by its own slot's blocks (widths below the
    table's, an activation per slot), zero for rows of none: against the eager ops row by row, which round
    in bfloat16 after the down product, the activation, the up product and its bias."""
    from server.adapters.methods.bottleneck import NATIVE_ACTS, activation

    S, R, H = 5, 48, 144
    widths = [0, 48, 20, 0, 33]
    g = torch.Generator().manual_seed(3)
    wd = torch.zeros(S, R, H)
    bd = torch.zeros(S, R)
    wu = torch.zeros(H, S, R)
    ub = torch.zeros(S, H)
    names = [acts[s % len(acts)] for s in range(S)]
    for s, r in enumerate(widths):
        if r:
            wd[s, :r] = torch.randn(r, H, generator=g) / H**0.5
            bd[s, :r] = torch.randn(r, generator=g) * 0.1
            wu[:, s, :r] = torch.randn(H, r, generator=g) / r**0.5
            ub[s] = torch.randn(H, generator=g) * 0.1
    wd, bd, wu, ub = (t.to(DEVICE, dtype) for t in (wd, bd, wu, ub))
    width = torch.tensor(widths, dtype=torch.int32, device=DEVICE)
    kact = torch.tensor([NATIVE_ACTS[n] for n in names], dtype=torch.int32, device=DEVICE)
    slots = [1, 4, 0, 2, 1, 3, 4, 2, 1]
    z = torch.randn(len(slots), H, generator=g).to(DEVICE, dtype)
    uniq, starts, order = routing(slots, 8)
    got = segments.bottleneck(z, wd, bd, wu, ub, width, kact, uniq, starts, order)
    for b, s in enumerate(slots):
        r = widths[s]
        if r == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))
            continue
        d = activation(names[s])(F.linear(z[b], wd[s, :r], bd[s, :r]))
        want = (F.linear(d, wu[:, s, :r]) + ub[s]).float()
        # within a few roundings of the terms summed (the eager gelu_new rounds at each of its ops)
        scale = F.linear(d.float().abs(), wu[:, s, :r].float().abs()) + ub[s].float().abs()
        tol = scale * (2**-6 if dtype == torch.bfloat16 else 1e-5) + 1e-6
        assert ((got[b].float() - want).abs() <= tol).all(), (b, s, names[s])


def test_a_kernel_that_fails_is_switched_off_and_the_plain_products_serve():
    """A segmented kernel that raises (a compiler refusing it) leaves the output untouched, the hook computes
    it by the plain products instead, and later calls do not try the kernel again."""
    from server.adapters.methods import Routing
    from server.adapters.methods.lora import LoRAStaticPlan, _StaticModule
    from server.compiled import Guarded

    tries: list[int] = []

    def broken(*a):  # noqa: ANN002, ANN202
        tries.append(1)
        raise RuntimeError("no kernel for you")

    A, sB, sb, _, rank = tables(3, 16, 32, 24, [0, 16, 8])
    st = _StaticModule(3, 16, 24, 32, DEVICE, None)
    st.A, st.sB, st.sb, st.rank = A, sB, sb, rank
    slots = [1, 2, 1, 0]
    uniq, starts, order = routing(slots, 4)
    i = torch.tensor(slots, device=DEVICE)
    r = Routing(slots=i, uniq=uniq, local=torch.tensor(route(slots, 4)[1], device=DEVICE), order=order, starts=starts)
    guard = Guarded(broken, "a broken kernel")
    plan = LoRAStaticPlan({(0, "q_proj"): st}, r, False, routed_delta, None, segmented=guard)
    x = torch.randn(4, 1, 32, device=DEVICE)
    y = torch.randn(4, 1, 24, device=DEVICE)
    want = routed_delta(x, y.clone(), A, sB, sb, None, None, i, None, i)
    for _ in range(2):
        got = plan.linear_out(0, "q_proj", x, y.clone())
        torch.testing.assert_close(got, want)
    assert tries == [1] and guard.error is not None and "no kernel for you" in guard.error
