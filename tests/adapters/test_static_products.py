"""The graph-replay hooks' formulations agree: each adapter family's products written several ways
(every slot's block at once, the batch's distinct blocks gathered, each row's own block, and for LoRA
gathers-products-sums for the compiler) give the same rows. The CUDA tests compile `cases` and check
them against the same references."""

from __future__ import annotations

import pytest
import torch

from server.adapters.methods.bottleneck import activation, static_residual
from server.adapters.methods.ia3 import scale_rows
from server.adapters.methods.lora import fused_delta, routed_delta
from server.engine import fused


def cases(device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (function, its reference, arguments): small random tables of 8 slots, 5 rows. The
    reference reads each row's own block (the batch's "distinct" slots taken as one entry per row)."""
    g = torch.Generator(device=device).manual_seed(0)
    f32 = torch.float32

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device).to(dt)

    B, H, S, R = 5, 64, 8, 4
    x, a, w = r(B, 1, H), r(B, 1, H), r(H)
    i = torch.tensor([0, 3, 1, 7, 3], device=device)
    rows = (i, i, torch.arange(B, device=device))  # slots; one entry per row; each row its own entry
    u = torch.tensor([0, 1, 3, 7], device=device)  # the distinct slots, and each row's index among them
    distinct = (i, u, torch.tensor([0, 2, 1, 3, 2], device=device))
    every = (i, None, i)
    q, k, cos, sin = r(B, 4, 1, 16), r(B, 2, 1, 16), r(B, 1, 16), r(B, 1, 16)
    lora = (x, x, r(S, R, H, dt=f32), r(H, S, R, dt=f32), r(S, H, dt=f32))
    dora = (r(S, H, dt=f32), r(H, dt=f32))
    bn = (r(S, R, H), r(S, R), r(H, S, R), r(S, H), r(S, 5), torch.tensor([0, 1] * 4, device=device),
          torch.rand(S, 3, generator=g, device=device) > 0.5, r(S, 2, H), r(S, 2, H), True, True,
          (activation("relu"), activation("tanh")))
    return {
        "rms_norm": (fused.rms_norm, fused.rms_norm, (x, w, 1e-6)),
        "add_rms_norm": (fused.add_rms_norm, fused.add_rms_norm, (x, a, w, 1e-6)),
        "rope": (fused.rope, fused.rope, (q, k, cos, sin)),
        "silu_mul": (fused.silu_mul, fused.silu_mul, (x, a)),
        "ia3": (scale_rows, scale_rows, (x, r(S, H, dt=f32), i)),
        "lora all slots": (routed_delta, routed_delta, ((*lora, None, None, *every), (*lora, None, None, *rows))),
        "lora distinct": (routed_delta, routed_delta, ((*lora, None, None, *distinct), (*lora, None, None, *rows))),
        "lora fused": (fused_delta, routed_delta, ((*lora, None, None, i), (*lora, None, None, *rows))),
        "dora all slots": (routed_delta, routed_delta, ((*lora, *dora, *every), (*lora, *dora, *rows))),
        "dora distinct": (routed_delta, routed_delta, ((*lora, *dora, *distinct), (*lora, *dora, *rows))),
        "dora fused": (fused_delta, routed_delta, ((*lora, *dora, i), (*lora, *dora, *rows))),
        "bottleneck all slots": (static_residual, static_residual, ((x, a, *every, *bn), (x, a, *rows, *bn))),
        "bottleneck distinct": (static_residual, static_residual, ((x, a, *distinct, *bn), (x, a, *rows, *bn))),
    }


def call(fn, ref, args):
    """(fn's result, the reference's): `args` is one argument tuple for both, or a pair of them."""
    got_args, ref_args = args if isinstance(args[0], tuple) else (args, args)
    return fn(*got_args), ref(*ref_args)


def assert_rows_close(got, want, name: str) -> None:
    """Equal up to one rounding of the output at its largest magnitude: formulations differ in the order
    of their sums (float32) and in where they round (bfloat16: the all-slots bottleneck adds its bias
    after rounding the product, one unit in the last place)."""
    for u, v in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), strict=True):
        eps = 2.0**-7 if v.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(u, v, rtol=0, atol=eps * v.float().abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_formulation_of_the_graph_hooks_gives_the_same_rows(dtype):
    for name, (fn, ref, args) in cases(torch.device("cpu"), dtype).items():
        assert_rows_close(*call(fn, ref, args), name)
