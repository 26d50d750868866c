"""LoRA (HF PEFT): y = W x + s * (B (A x) + b_B) on any Linear of the decoder layers, per row.

Storage is per (module, slot) at each adapter's real rank, in float32 (PEFT keeps adapter weights in
float32 over a lower-precision base and casts the sum back). The scaling is folded into B and b_B
when a slot is written. A batch plan concatenates, per module, the A and B of the adapters the batch
uses (once per batch composition) and routes rows with a column mask, so one batch of any mix of
LoRA adapters is two small products per targeted Linear, and a rank-8 row never pays for a
rank-64 neighbour beyond the concatenation:

    d = x @ A_cat.T masked to the row's own columns     # [B, T, R]
    y = (y + d @ (s B)_cat.T + (s b)[row])               # in float32, then the base dtype

DoRA (PEFT `use_dora`) is the same plus a per-output-row magnitude scale g = m / ||W + s B A||_row,
computed once when the slot is written: y = W x + b + (g - 1) (W x) + g s B (A x), in PEFT's order of
operations. Rows of plain LoRA, or of no adapter, have g = 1, where those extra terms are exactly 0.

Graph replay has no static plan for LoRA yet: batches with LoRA rows decode eagerly on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..families import Method
from ..spec import AdapterWeights
from .base import AdapterMethod, MethodPlan, SlotContext, StepTimer

F32 = torch.float32
NAME: Method = "lora"


@dataclass(frozen=True)
class LoRAModule:
    """One adapted Linear, as the file holds it, with its scaling s (alpha / r, or alpha / sqrt(r))."""

    module: str
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    bias: torch.Tensor | None  # [out] (lora_bias)
    scale: float
    magnitude: torch.Tensor | None = None  # [out] DoRA's m

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class LoRAWeights:
    modules: list[LoRAModule]

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in self.modules for t in (m.A, m.B, m.bias, m.magnitude) if t is not None]


@dataclass
class _Slot:
    A: torch.Tensor  # [r, in] float32 on the device
    sB: torch.Tensor  # [out, r] s * B
    sb: torch.Tensor | None  # [out] s * b_B
    g: torch.Tensor | None = None  # [out] DoRA's m / ||W + s B A||_row

    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in (self.A, self.sB, self.sb, self.g) if t is not None)


@dataclass
class _ModulePlan:
    A: torch.Tensor  # [R, in]: the batch's adapters side by side
    sB: torch.Tensor  # [out, R]
    colmask: torch.Tensor | None  # [B, 1, R] bool; None when every row uses the one adapter here
    bias: torch.Tensor | None  # [B, 1, out] per-row s * b_B (zeros for rows without one)
    g: torch.Tensor | None = None  # [B, 1, out] DoRA scale per row (ones for other rows)
    base_bias: torch.Tensor | None = None  # [out] the Linear's own bias, which DoRA does not scale


class LoRAPlan(MethodPlan):
    def __init__(self, mods: dict[tuple[int, str], _ModulePlan], timer: StepTimer) -> None:
        self.mods, self.timer = mods, timer

    def acts_on(self, layer: int, name: str) -> bool:
        return (layer, name) in self.mods

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        p = self.mods.get((layer, name))
        if p is None:
            return None
        with self.timer.span(NAME):
            d = F.linear(x.to(F32), p.A)  # [B, T, R]
            if p.colmask is not None:
                d = torch.where(p.colmask, d, 0.0)
            delta = F.linear(d, p.sB)  # [B, T, out]
            if p.bias is not None:
                delta = delta + p.bias
            y32 = y.to(F32)
            if p.g is None:
                return (y32 + delta).to(y.dtype)
            wx = y32 if p.base_bias is None else y32 - p.base_bias  # W x: the bias is not scaled
            return (y32 + (p.g - 1) * wx + p.g * delta).to(y.dtype)


class LoRAMethod(AdapterMethod):
    name = NAME

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        super().__init__(ctx, timer)
        self.mods: dict[str, dict[int, _Slot]] = {}  # module -> slot -> weights

    def write(self, slot: int, weights: AdapterWeights) -> None:
        w = weights.payload
        assert isinstance(w, LoRAWeights)
        self.clear(slot)
        dev = self.ctx.device
        for m in w.modules:
            sb = None if m.bias is None else (m.bias * m.scale).to(dev)
            self.mods.setdefault(m.module, {})[slot] = _Slot(m.A.to(dev), (m.B * m.scale).to(dev), sb, self._g(m))

    def _g(self, m: LoRAModule) -> torch.Tensor | None:
        """DoRA's per-row scale, from the base weight as it is now (never folded: see `can_merge`)."""
        if m.magnitude is None:
            return None
        W = self.ctx.modules[m.module].weight.detach().to(F32)
        dev = W.device
        norm = torch.linalg.norm(W + m.scale * (m.B.to(dev) @ m.A.to(dev)), dim=1)  # [out]
        return m.magnitude.to(dev) / norm

    def clear(self, slot: int) -> None:
        for slots in self.mods.values():
            slots.pop(slot, None)

    def uses(self, slots: list[int]) -> bool:
        return any(s in per for per in self.mods.values() for s in slots)

    def device_bytes(self) -> int:
        return sum(w.nbytes() for per in self.mods.values() for w in per.values())

    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        mods = {}
        for module, per in self.mods.items():
            present = sorted({s for s in slots if s in per})
            if present:
                mods[self.ctx.base.split(module)] = self._module(module, slots, slot_idx, present, per)
        return LoRAPlan(mods, self.timer) if mods else None

    def _module(self, module: str, slots: list[int], slot_idx: torch.Tensor, present: list[int],
                per: dict[int, _Slot]) -> _ModulePlan:
        dev, B = self.ctx.device, len(slots)
        ws = [per[s] for s in present]
        A = torch.cat([w.A for w in ws])  # [R, in]
        sB = torch.cat([w.sB for w in ws], dim=1)  # [out, R]
        uniform = len(present) == 1 and all(s == present[0] for s in slots)
        colmask = None
        if not uniform:
            owner = torch.cat([torch.full((w.A.shape[0],), s, device=dev) for s, w in zip(present, ws, strict=True)])
            colmask = (slot_idx[:, None] == owner[None, :])[:, None, :]  # [B, 1, R]
        bias = g = None
        if any(w.sb is not None for w in ws):
            bias = torch.zeros(B, 1, sB.shape[0], device=dev, dtype=F32)
            for s, w in zip(present, ws, strict=True):
                if w.sb is not None:
                    bias[[i for i, x in enumerate(slots) if x == s], 0] = w.sb
        if any(w.g is not None for w in ws):
            g = torch.ones(B, 1, sB.shape[0], device=dev, dtype=F32)
            for s, w in zip(present, ws, strict=True):
                if w.g is not None:
                    g[[i for i, x in enumerate(slots) if x == s], 0] = w.g
        base_bias = self.ctx.modules[module].bias
        return _ModulePlan(A, sB, colmask, bias, g, None if g is None or base_bias is None else base_bias.detach().to(F32))


class DoRAMethod(LoRAMethod):
    """DoRA rows: LoRA's storage and plan, with the magnitude scale (its own family and label)."""

    name = "dora"
