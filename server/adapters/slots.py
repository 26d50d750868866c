"""Device slots for every method, and the per-batch plan the forward pass consults.

Slot 0 is "no adapter". External callers speak in adapter ids; from here down only integer slots
exist. Writing a slot is the only way adapters reach the model; the model itself is never patched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ..architectures import architecture, decoder
from ..compiled import raise_recompile_limit
from .families import label
from .methods import RECORDS, AdapterMethod, MethodPlan, Routing, StepTimer
from .methods.base import KVPrefix, SlotContext
from .methods.prefix import Encoder
from .spec import AdapterWeights, BaseModelInfo, Location


class BatchPlan:
    """The routing for one batch: which rows use which slot, as index tensors and per-row weights."""

    def __init__(self, slots: tuple[int, ...], plans: list[MethodPlan]) -> None:
        self.slots = slots
        self.plans = plans

    def linear(self, layer: int, name: str, module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Every method's input changes in order, the base product, then every method's output changes in
        order (see the methods package for the rule)."""
        xi = x
        for p in self.plans:
            if (t := p.linear_in(layer, name, xi)) is not None:
                xi = t
        return self.linear_out(layer, name, x, module(xi))

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every method's output change of the Linear `name`, whose input was `x` and base output `y`."""
        for p in self.plans:
            if (t := p.linear_out(layer, name, x, y)) is not None:
                y = t
        return y

    def linear_out_group(self, layer: int, names: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]
                         ) -> list[torch.Tensor]:
        """`linear_out` of sibling Linears of one input x (outputs ys), each method in order, in one go where
        the method can."""
        for p in self.plans:
            if (t := p.linear_out_group(layer, names, x, ys)) is not None:
                ys = t
                continue
            for i, n in enumerate(names):
                if (u := p.linear_out(layer, n, x, ys[i])) is not None:
                    ys[i] = u
        return ys

    def changes_input(self, layer: int, name: str) -> bool:
        return any(p.changes_input(layer, name) for p in self.plans)

    def experts_out(self, layer: int, name: str, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        """Every method's change of a routed MLP's expert product `name` (gate_up_proj, down_proj), per
        (token, expert) pair: inputs x [P, in], each pair's expert and batch row [P], outputs y [P, out]."""
        for p in self.plans:
            if (t := p.experts_out(layer, name, x, experts, rows, y)) is not None:
                y = t
        return y

    def embed(self, ids: torch.Tensor, embedding: torch.nn.Module) -> torch.Tensor:
        """The input embeddings [B, T, H] of ids [B, T]: the base module's, or where a method gives rows
        their own (an adapter's trained embedding), that method's."""
        for p in self.plans:
            if (e := p.embed(ids, embedding)) is not None:
                return e
        return embedding(ids)

    def logits(self, h: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
               finish: Callable[[torch.Tensor], torch.Tensor], rows: list[int] | None = None) -> torch.Tensor:
        """float32 logits [N, ..., V] of normed hidden states h [N, ..., H] (entry n is batch row rows[n], or
        row n): `finish(head(h))`, or where a method gives rows their own LM head, that method's (rows of a
        smaller vocabulary than the widest are -inf past theirs)."""
        for p in self.plans:
            if (z := p.logits(h, rows, head, finish)) is not None:
                return z
        return finish(head(h))

    def residual(self, layer: int, loc: Location, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """One method's sub-block output, or, where several act at this site, each row's own method's;
        None where none acts (the plain decoder layer's h + a, or h + N(a) where the architecture norms
        the sub-layer's output before the add, which the runner may fuse with the next norm)."""
        out: torch.Tensor | None = None
        for p in self.plans:
            y = p.residual(layer, loc, h, a)
            if y is not None:
                out = y if out is None else torch.where(p.residual_rows(layer, loc), y, out)
        return out


def out_norms(model: torch.nn.Module) -> dict[tuple[int, str], Callable[[torch.Tensor], torch.Tensor]]:
    """(layer, location) -> the norm the architecture puts on that sub-layer's output before its residual add."""
    arch = architecture(str(model.config.model_type))  # type: ignore[union-attr]
    names = {"attn": arch.attn_out_norm, "mlp": arch.mlp_out_norm}
    layers = decoder(model).layers  # type: ignore[attr-defined]
    return {(i, loc): getattr(layer, n) for i, layer in enumerate(layers) for loc, n in names.items() if n}


class AdapterSlots:
    """Owns every method's slot storage; builds (and caches) batch plans; folds (IA)3 into weights."""

    def __init__(self, model: torch.nn.Module, num_slots: int, device: torch.device, dtype: torch.dtype,
                 timer: StepTimer, plan_cache: int = 16, compile_kernels: bool = False,
                 encode: Encoder | None = None, native: bool = True) -> None:
        base = BaseModelInfo.from_model(model)
        modules = {n: m for n, m in model.named_modules() if n in base.linears}
        if compile_kernels:
            raise_recompile_limit()
        ctx = SlotContext(base, num_slots + 1, device, dtype, modules, compile_kernels, encode, out_norms(model),
                          model.get_input_embeddings(), model.get_output_embeddings(), native)  # type: ignore[operator]
        self.base = base
        self.timer = timer
        self.num_slots = num_slots
        self.device = device
        self.methods: dict[str, AdapterMethod] = {n: r.impl(ctx, timer) for n, r in RECORDS.items()}
        self.slot_method: dict[int, str] = {}  # slot -> its adapter's family
        self._slot_parts: dict[int, list[str]] = {}  # slot -> every method holding a part of its adapter
        self._foldable: set[int] = set()  # slots whose adapter folds exactly (AdapterWeights.mergeable)
        self._plans: OrderedDict[tuple[int, ...], BatchPlan] = OrderedDict()
        self._plan_cache = plan_cache

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Overwrite `slot` with an adapter (1 <= slot <= num_slots): every part by the method that serves it."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots}")
        for method, payload in weights.parts.items():
            if not isinstance(payload, RECORDS[method].weights):
                raise TypeError(f"a {method} part takes {RECORDS[method].weights.__name__}, not {type(payload).__name__}")
        self.unmerge()  # a method may read the base weights as it writes (DoRA's norms): never a folded one
        self.clear(slot)
        self.slot_method[slot] = weights.method
        self._slot_parts[slot] = list(weights.parts)
        for method, payload in weights.parts.items():
            self.methods[method].write(slot, payload)
        if weights.mergeable:
            self._foldable.add(slot)
        self._plans.clear()

    def clear(self, slot: int) -> None:
        self.slot_method.pop(slot, None)
        self._foldable.discard(slot)
        for m in self._slot_parts.pop(slot, []):
            self.methods[m].clear(slot)
            self._plans.clear()

    def bytes_for(self, weights: AdapterWeights) -> int:
        """Device bytes a slot holding this adapter takes (what the device tier's byte budget counts)."""
        return sum(self.methods[m].slot_bytes(p) for m, p in weights.parts.items())

    def plan(self, slots: list[int], ends_only: bool = False, cached: bool = True) -> BatchPlan:
        """The batch plan of rows on `slots` (cached per composition unless not `cached`: a one-off, such as
        a prefill's plan token by token); with `ends_only`, only the methods acting at the two ends of the
        model (a replayed decode step runs everything else)."""
        key = (*slots, -1) if ends_only else tuple(slots)
        p = self._plans.get(key)
        if p is not None:
            self._plans.move_to_end(key)
            return p
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)  # [B]
        plans = [mp for m in self.methods.values() if (not ends_only or m.at_ends) and (mp := m.plan(slots, idx)) is not None]
        p = BatchPlan(tuple(slots), plans)
        if not cached:
            return p
        self._plans[key] = p
        if len(self._plans) > self._plan_cache:
            self._plans.popitem(last=False)
        return p

    # -- graph replay -------------------------------------------------------------------------
    def graph_key(self, slots: list[int]) -> tuple[tuple[str, int], ...] | None:
        """The methods a batch needs, each with its storage layout version: batches with equal keys can
        replay one captured graph whatever their slot mix. None when a needed method has no static plan.
        A method acting only at the two ends of the model is in the key too: its rows' ends run outside
        the graph (`ends`)."""
        key = []
        for name, m in self.methods.items():
            if m.uses(slots):
                if m.at_ends:
                    key.append((name, 0))
                    continue
                if type(m).static_plan is AdapterMethod.static_plan:
                    return None
                key.append((name, m.layout_version))
        return tuple(key)

    def ends(self, key: tuple[tuple[str, int], ...]) -> bool:
        """Whether batches of this graph key make their embeddings and logits outside the captured step."""
        return any(self.methods[name].at_ends for name, _ in key)

    def routed(self, key: tuple[tuple[str, int], ...]) -> bool:
        """Whether a method of this graph key routes rows inside the captured step (by the slot buffer)."""
        return any(not self.methods[name].at_ends for name, _ in key)

    def static_plan(self, routing: Routing, key: tuple[tuple[str, int], ...]) -> BatchPlan:
        """The plan for the methods of `key`, routed by the fixed buffers of `routing` (the methods acting
        only at the ends have none: their ends run outside the step)."""
        plans = [p for name, _ in key if not self.methods[name].at_ends
                 and (p := self.methods[name].static_plan(routing)) is not None]
        return BatchPlan((), plans)

    # -- merging ------------------------------------------------------------------------------
    def can_merge(self, slot: int) -> bool:
        """The adapter folds exactly, the base weights take a fold, and its method can fold it."""
        m = self.slot_method.get(slot)
        return (slot in self._foldable and self.base.fold_refusal is None and m is not None
                and self.methods[m].can_merge(slot))

    @property
    def merged_slot(self) -> int | None:
        for m in self.methods.values():
            if m.merged_slot is not None:
                return m.merged_slot
        return None

    def merge(self, slot: int) -> None:
        """Fold `slot`'s adapter into the base weights, after undoing any other fold."""
        if self.merged_slot not in (None, slot):
            self.unmerge()
        self.methods[self.slot_method[slot]].merge(slot)
        self._plans.clear()

    def export(self, slot: int, model: torch.nn.Module) -> None:
        """Write every part of `slot`'s adapter into `model` for good (`adapter-server merge`): its family's
        fold, and each other part's own export (a trained embedding or LM head). Not for a served model."""
        family = self.slot_method[slot]
        for m in self._slot_parts[slot]:
            if m == family and slot in self._foldable:
                self.merge(slot)
            else:
                self.methods[m].export(slot, model)

    def unmerge(self) -> None:
        for m in self.methods.values():
            if m.merged_slot is not None:
                m.unmerge()
                self._plans.clear()

    def prefix(self, slot: int) -> KVPrefix | None:
        """The KV entries a row of `slot` starts with (prompt and prefix tuning), or None."""
        m = self.slot_method.get(slot)
        return None if m is None else self.methods[m].prefix(slot)

    def adapter_type(self, slot: int) -> str:
        """The metric label of rows on `slot` now (a folded adapter reports its merged label)."""
        return label(self.slot_method.get(slot), merged=slot != 0 and self.merged_slot == slot)

    def method_of(self, slot: int) -> str | None:
        return self.slot_method.get(slot)

    def device_bytes(self) -> int:
        return sum(m.device_bytes() for m in self.methods.values())
