"""Methods compose: two methods acting on one Linear both apply (input change, then the base product, then
output changes), and two methods at one residual site each serve their own rows."""

from __future__ import annotations

import torch

from server.adapters.methods import MethodPlan
from server.adapters.slots import BatchPlan
from tests.helpers import input_ids, runner_and_slots, tiny_model

ROWS_A, ROWS_B = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])  # row 2: both, row 3: none


def mask(rows: torch.Tensor) -> torch.Tensor:
    return rows.bool()[:, None, None]


class InScale(MethodPlan):  # like an (IA)3 feedforward vector: scales q_proj's input on its rows
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def linear_in(self, layer, name, x):  # noqa: ANN001, ANN201
        return x * (1 + self.rows)[:, None, None] if (layer, name) == (0, "q_proj") else None


class OutAdd(MethodPlan):  # like a LoRA term: adds a function of the original input to q_proj's output
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.5

    def linear_out(self, layer, name, x, y):  # noqa: ANN001, ANN201
        return y + (x @ self.w.T) * self.rows[:, None, None] if (layer, name) == (0, "q_proj") else None


class Both(MethodPlan):  # the two above as one method, the reference for a row that has both
    def __init__(self) -> None:
        self.a, self.b = InScale(torch.ones(4)), OutAdd(torch.ones(4))

    def linear_in(self, layer, name, x):  # noqa: ANN001, ANN201
        return self.a.linear_in(layer, name, x)

    def linear_out(self, layer, name, x, y):  # noqa: ANN001, ANN201
        return self.b.linear_out(layer, name, x, y)


class Residual(MethodPlan):  # a bottleneck-like sub-block output on its rows, exactly h + a elsewhere
    def __init__(self, rows: torch.Tensor, k: float) -> None:
        self.rows, self.k = rows, k

    def residual(self, layer, loc, h, a):  # noqa: ANN001, ANN201
        return torch.where(mask(self.rows), h + self.k * a, h + a) if (layer, loc) == (0, "mlp") else None

    def residual_rows(self, layer, loc):  # noqa: ANN001, ANN201
        return mask(self.rows)


def logits(plans: list[MethodPlan]) -> torch.Tensor:
    runner, _ = runner_and_slots(tiny_model())
    ids = input_ids()[:1].repeat(4, 1)
    B, T = ids.shape
    return runner.forward(ids, start=torch.zeros(B, dtype=torch.long), lengths=torch.full((B,), T), row0=0,
                          plan=BatchPlan((), plans), all_logits=True)


def test_two_methods_on_one_linear_both_run():
    got = logits([InScale(ROWS_A), OutAdd(ROWS_B)])
    only_a, only_b, both, base = logits([InScale(ROWS_A)]), logits([OutAdd(ROWS_B)]), logits([Both()]), logits([])
    assert torch.allclose(got[0], only_a[0], atol=1e-6) and torch.allclose(got[1], only_b[1], atol=1e-6)
    assert torch.allclose(got[2], both[2], atol=1e-6)  # the row with both: input scaled AND term added
    assert torch.equal(got[3], base[3])  # a row with neither is the base model exactly
    for other in (only_a[2], only_b[2], base[2]):  # and both really changed row 2
        assert (got[2] - other).abs().max() > 1e-3


def test_two_residual_methods_at_one_site_each_serve_their_rows():
    r1, r2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    got = logits([Residual(r1, 2.0), Residual(r2, 0.5)])
    first, second, base = logits([Residual(r1, 2.0)]), logits([Residual(r2, 0.5)]), logits([])
    assert torch.equal(got[0], first[0]) and torch.equal(got[1], second[1]) and torch.equal(got[2:], base[2:])
    assert (got[0] - base[0]).abs().max() > 1e-3 and (got[1] - base[1]).abs().max() > 1e-3
