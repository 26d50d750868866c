"""(IA)3: per-row scaling vectors on any Linear of the decoder layers, and exact fold/unfold into weights.

Storage: for each targeted Linear, a table [S, out] (output scaling) and/or [S, in] (input scaling)
of float32 vectors, row 0 all ones. A batch gathers one row per request: x * table[slot_idx].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ...compiled import Compiled
from ..families import Method
from ..spec import MethodWeights
from ..synth import synth_ia3
from .base import AdapterMethod, MethodPlan, MethodRecord, Routing, SlotContext, StepTimer, nbytes

F32 = torch.float32
NAME: Method = "ia3"


@dataclass(frozen=True)
class IA3Vector:
    """One scaled Linear: `out` scales its output (bias included), `in` scales its input."""

    module: str
    side: Literal["in", "out"]
    scale: torch.Tensor  # [out] or [in], float32


@dataclass(frozen=True)
class IA3Weights(MethodWeights):
    """An (IA)3 adapter: one vector per scaled Linear (PEFT's, or AdapterHub's "scale" on down_proj)."""

    vectors: list[IA3Vector]

    @property
    def mergeable(self) -> bool:
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [v.scale for v in self.vectors]


def _scale(t: torch.Tensor, by: torch.Tensor) -> None:
    """t *= by in place, the product taken in float32 as PEFT does."""
    if t.dtype == F32:
        t.mul_(by)
    else:
        t.copy_((t.to(F32) * by).to(t.dtype))


class _Table:
    def __init__(self, n: int, dim: int, device: torch.device) -> None:
        self.data = torch.ones(n, dim, dtype=F32, device=device)  # [S, dim]
        self.slots: set[int] = set()


class IA3Plan(MethodPlan):
    def __init__(self, vecs: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor | None]], timer: StepTimer):
        self.vecs = vecs  # (layer, linear name) -> (in [B,1,in] | None, out [B,1,out] | None)
        self.timer = timer

    def changes_input(self, layer: int, name: str) -> bool:
        v = self.vecs.get((layer, name))
        return v is not None and v[0] is not None

    def linear_in(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor | None:
        v = self.vecs.get((layer, name))
        if v is None or v[0] is None:
            return None
        with self.timer.span(NAME):  # feedforward: y = W (x * l) + b, product in float32 as PEFT does
            return torch.mul(x, v[0], out=torch.empty_like(x))  # (one op: computed in float32, stored in x's dtype)

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        v = self.vecs.get((layer, name))
        if v is None or v[1] is None:
            return None
        with self.timer.span(NAME):  # y = (W x + b) * l, in place: y is this Linear's own output
            return y.mul_(v[1])  # computed in float32 (v's dtype), stored in y's: PEFT's (y.float() * l).to(y.dtype)


def scale_rows(x: torch.Tensor, table: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] times each row's vector of table [S, D], in float32 as PEFT does."""
    return (x.to(F32) * table.index_select(0, slot_idx)[:, None, :]).to(x.dtype)


class IA3StaticPlan(MethodPlan):
    """Every table, gathered by the slot index inside the hook: rows without an (IA)3 adapter read row 0
    (ones), and multiplying by 1.0 in float32 is exact, so this equals IA3Plan on any batch."""

    def __init__(self, inp: dict[tuple[int, str], torch.Tensor], out: dict[tuple[int, str], torch.Tensor],
                 slot_idx: torch.Tensor, scale: Callable[..., torch.Tensor]) -> None:
        self.inp, self.out, self.slot_idx, self.scale = inp, out, slot_idx, scale

    def changes_input(self, layer: int, name: str) -> bool:
        return (layer, name) in self.inp

    def linear_in(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor | None:
        t = self.inp.get((layer, name))
        return None if t is None else self.scale(x, t, self.slot_idx)

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        t = self.out.get((layer, name))
        return None if t is None else self.scale(y, t, self.slot_idx)


class IA3Method(AdapterMethod):
    name = NAME

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        super().__init__(ctx, timer)
        self.out: dict[str, _Table] = {}
        self.inp: dict[str, _Table] = {}
        self.by_slot: dict[int, list[tuple[str, str]]] = {}  # slot -> [(module, 'in'|'out')]  # slot -> [(module, side)]
        self._merged: int | None = None
        self._backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # while folded: the base weights
        self._layout = 0
        self._scale = Compiled(scale_rows, ctx.compile)

    def _table(self, side: str, module: str) -> _Table:
        tables = self.out if side == "out" else self.inp
        if module not in tables:
            out_f, in_f = self.ctx.base.linears[module]
            tables[module] = _Table(self.ctx.num_slots, out_f if side == "out" else in_f, self.ctx.device)
            self._layout += 1
        return tables[module]

    def write(self, slot: int, payload: MethodWeights) -> None:
        self.clear(slot)
        entries: list[tuple[str, str]] = []
        assert isinstance(payload, IA3Weights)
        for v in payload.vectors:
            t = self._table(v.side, v.module)
            t.data[slot].copy_(v.scale)
            t.slots.add(slot)
            entries.append((v.module, v.side))
        self.by_slot[slot] = entries

    def clear(self, slot: int) -> None:
        if self._merged == slot:
            self.unmerge()
        for module, side in self.by_slot.pop(slot, []):
            t = (self.out if side == "out" else self.inp)[module]
            t.data[slot].fill_(1.0)
            t.slots.discard(slot)

    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        used = {s for s in slots if s in self.by_slot and s != self._merged}
        if not used:
            return None
        vecs: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        modules = {m for s in used for m, _ in self.by_slot[s]}
        for module in modules:
            tin, tout = self.inp.get(module), self.out.get(module)
            vin = tin.data.index_select(0, slot_idx)[:, None, :] if tin and tin.slots & used else None
            vout = tout.data.index_select(0, slot_idx)[:, None, :] if tout and tout.slots & used else None
            vecs[self.ctx.base.split(module)] = (vin, vout)
        return IA3Plan(vecs, self.timer)

    def uses(self, slots: list[int]) -> bool:
        return any(s in self.by_slot and s != self._merged for s in slots)

    def static_plan(self, routing: Routing) -> MethodPlan | None:
        split = self.ctx.base.split
        return IA3StaticPlan({split(m): t.data for m, t in self.inp.items()},
                             {split(m): t.data for m, t in self.out.items()}, routing.slots, self._scale)

    @property
    def layout_version(self) -> int:
        return self._layout

    def device_bytes(self) -> int:
        """The resident adapters' rows of the tables (the tables themselves hold a row for every slot), and
        while an adapter is folded in, the copy of the base weights it changed."""
        rows = sum(len(t.slots) * t.data.shape[1] * 4 for t in [*self.out.values(), *self.inp.values()])
        return rows + nbytes(t for pair in self._backup.values() for t in pair)

    # -- folding into the base weights -------------------------------------------------------
    def can_merge(self, slot: int) -> bool:
        return slot in self.by_slot

    @property
    def merged_slot(self) -> int | None:
        return self._merged

    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """W' = W * l (rows for output scaling, bias too; columns for input scaling), in place (so packed
        sibling products, which hold views of these weights, see it). Keeps a copy to restore while folded."""
        if self._merged == slot:
            return
        if self._merged is not None:
            self.unmerge()
        entries = self.by_slot[slot]
        try:
            for module in {m for m, _ in entries}:
                lin = self.ctx.modules[module]
                self._backup[module] = (lin.weight.detach().clone(),
                                        None if lin.bias is None else lin.bias.detach().clone())
        except BaseException:  # nothing is scaled yet: drop the partial copy
            self._backup.clear()
            raise
        self._merged = slot  # from here an unmerge restores whatever the loop below has scaled
        for module, side in entries:  # weights are the base ones here: any earlier merge was undone
            lin = self.ctx.modules[module]
            w = lin.weight
            l_vec = (self.out if side == "out" else self.inp)[module].data[slot]
            if side == "out":
                _scale(w, l_vec[:, None])
                if lin.bias is not None:
                    _scale(lin.bias, l_vec)
            else:
                _scale(w, l_vec[None, :])

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights bit for bit from the copies kept at merge time (never divides)."""
        if self._merged is None:
            return
        for module, (w, b) in self._backup.items():
            lin = self.ctx.modules[module]
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        self._backup.clear()  # a full copy of every folded Linear: not kept past the fold
        self._merged = None


RECORD = MethodRecord(NAME, IA3Method, IA3Weights, mergeable=True, synth=synth_ia3, kinds=("ia3",), demo=("ia3", 0))
