"""The small interface every adapter method implements, and the timer that attributes adapter compute.

A method keeps its adapters in device slots (slot 0 is "no adapter") and, for each batch, builds a
plan: index-routed tensors the forward pass consults at its hook points: a Linear call, the residual
add of a sub-block, and at the two ends of the model the token embedding and the LM head. Nothing
outside this package switches on the method type.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..families import Method, label
from ..spec import BaseModelInfo, Location, MethodWeights


class StepTimer:
    """Accumulates seconds spent in adapter-only work per adapter type label.

    On CPU the work is synchronous, so wall time around it is its cost. On CUDA it records event
    pairs and resolves them when `collect` is called after the step has synchronised.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = True
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def span(self, label: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((label, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[label] += time.perf_counter() - t0

    def add(self, label: str, seconds: float) -> None:
        self._cpu[label] += seconds

    def collect(self) -> dict[str, float]:
        """Seconds per label since the last collect; synchronises CUDA events first."""
        out = dict(self._cpu)
        if self._events:
            self._events[-1][2].synchronize()
            for label, s, e in self._events:
                out[label] = out.get(label, 0.0) + s.elapsed_time(e) / 1000.0
            self._events.clear()
        self._cpu.clear()
        return out


class MethodPlan:
    """Per-batch routing of one method. Hooks return None where the method has nothing to do; on rows
    it does not serve, a hook must be the identity exactly (scale 1, add 0, residual h + a)."""

    def linear_in(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The Linear's input as this method changes it (an input scale), before the base product."""
        return None

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The Linear's output as this method changes it: output scales and additive terms, which may
        read the Linear's original input `x`."""
        return None

    def experts_out(self, layer: int, name: str, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor | None:
        """A routed MLP's expert product `name` as this method changes it, per (token, expert) pair:
        x [P, in], experts and rows [P] (each pair's expert and batch row), y [P, out]."""
        return None

    def linear_out_group(self, layer: int, names: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]
                         ) -> list[torch.Tensor] | None:
        """`linear_out` of sibling Linears that read the same input x (q/k/v, gate/up; outputs ys), in one go
        where the method can; None: `linear_out` of each in turn."""
        return None

    def changes_input(self, layer: int, name: str) -> bool:
        """Whether `linear_in` has work here. If no method's has, the runner may compute this Linear in one
        product with its siblings (q/k/v, gate/up) and apply `linear_out` to its slice."""
        return False

    def residual(self, layer: int, loc: Location, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """The sub-block's output (h + a for a plain decoder layer; h + N(a) where the architecture norms
        the sub-layer's output before the add, as Gemma does: `SlotContext.out_norms`) as this method
        computes it, from the sub-layer's output a."""
        return None

    def residual_rows(self, layer: int, loc: Location) -> torch.Tensor:
        """[B, 1, 1] bool: the rows this method's `residual` serves here (used when two methods act at one site)."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, embedding: torch.nn.Module) -> torch.Tensor | None:
        """The input embeddings [B, T, H] of token ids [B, T] (row b of the batch), where this method gives
        some rows their own; `embedding` is the base model's module. One method at most acts here."""
        return None

    def logits(self, h: torch.Tensor, rows: list[int] | None, head: Callable[[torch.Tensor], torch.Tensor],
               finish: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """float32 logits [N, ..., V] of normed hidden states h [N, ..., H], whose entry n is batch row
        rows[n] (None: row n), where this method gives some rows an LM head of their own; `head` is the
        base model's, `finish` what the model does after any head (soft-capping, float32). V is the widest
        row's vocabulary; a row's ids past its own are -inf. One method at most acts here."""
        return None


@dataclass(frozen=True)
class Routing:
    """A fixed-shape batch's routing for graph replay, read only inside hooks (the tensors are buffers
    the graph reads, refilled every step). `slots` [B]: each row's slot. `uniq` [U]: the batch's
    distinct slots (U a bucket, padded with repeats no row points at). `local` [B]: each row's index
    into `uniq`. A product over per-slot blocks can then read each adapter the batch uses once
    (`distinct`) instead of every slot's block."""

    slots: torch.Tensor
    uniq: torch.Tensor
    local: torch.Tensor
    order: torch.Tensor | None = None  # [B] the rows sorted by `local` (rows of one distinct slot together)
    starts: torch.Tensor | None = None  # [U + 1]: distinct slot k's rows are order[starts[k]:starts[k + 1]]
    ident: torch.Tensor | None = None  # [B + 1]: 0..B, for kernels that take every row as its own segment

    def distinct(self, num_slots: int) -> bool:
        """Whether to gather the batch's distinct blocks (a copy: about three times their bytes moved)
        rather than take one product over every slot's block in place (each slot's bytes once)."""
        return 3 * self.uniq.shape[0] < num_slots


def route(slots: list[int], U: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The host side of a `Routing` for rows using `slots`, with U >= the distinct slots: (uniq [U] the
    distinct slots, padded with repeats of the first that no row points at; local [B] each row's index
    in uniq; order [B] the rows sorted by it; starts [U + 1] where each distinct slot's rows begin in
    order, padded entries empty)."""
    uniq = sorted(set(slots))
    where = {s: k for k, s in enumerate(uniq)}
    local = [where[s] for s in slots]
    order = sorted(range(len(slots)), key=local.__getitem__)
    starts = [0] * (U + 1)
    for k in local:
        starts[k + 1] += 1
    for k in range(U):
        starts[k + 1] += starts[k]
    return uniq + uniq[:1] * (U - len(uniq)), local, order, starts


Synth = Callable[[str, Path, Any, int], Path]  # (kind, folder, model config, seed) -> the folder, written


@dataclass(frozen=True)
class MethodRecord:
    """One adapter method, registered once (`methods.RECORDS`): everything else about it derives from here.

    `weights`: the payload type its slots take. `mergeable`: its adapters can be folded into the base
    weights (so rows may also be counted under `<name>_merged`); whether one adapter can is its weights'
    `mergeable`. `synth` writes an untrained adapter in its library's layout for the synthetic kinds in
    `kinds` (with `sized`, a kind may be followed by a size: "lora8"). `demo`: the kind and seed of the
    playground's demo adapter of this method, if it has one."""

    name: Method
    impl: type[AdapterMethod]
    weights: type[MethodWeights]
    mergeable: bool = False
    synth: Synth | None = None
    kinds: tuple[str, ...] = ()
    sized: bool = False
    demo: tuple[str, int] | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """Its metric labels: its name, and folded, `<name>_merged`."""
        return (label(self.name), *((label(self.name, merged=True),) if self.mergeable else ()))

    def makes(self, kind: str) -> bool:
        return any(kind == k or (self.sized and kind.startswith(k) and kind[len(k):].isdigit()) for k in self.kinds)


def nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class KVPrefix:
    """Entries a row's KV cache holds before its prompt in every layer (prompt and prefix tuning)."""

    keys: torch.Tensor  # [L, n_kv, N, d], post-rotary, the cache's dtype and device
    values: torch.Tensor  # [L, n_kv, N, d]
    rope_shift: int  # real token t: cache position N + t, rotary position N + t + rope_shift

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class SlotContext:
    """What a method needs to allocate and route: the base model's shape, the slot count, where to put tensors."""

    base: BaseModelInfo
    num_slots: int  # including slot 0
    device: torch.device
    dtype: torch.dtype
    modules: dict[str, torch.nn.Linear]  # full name -> the base model's Linear
    compile: bool = False  # compile the graph-replay hooks into fused kernels (CUDA, --compile-kernels)
    # the bare model's keys and values [L, n_kv, N, d] for input embeddings [N, H] at positions 0..N-1
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    # (layer, location) -> the norm the architecture applies to that sub-layer's output before the residual
    # add (Gemma's post_attention_layernorm, post_feedforward_layernorm); empty where there is none
    out_norms: dict[tuple[int, str], Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    # the base model's input embedding and LM head modules (the vocabulary's two ends)
    embedding: torch.nn.Module | None = None
    head: torch.nn.Module | None = None
    native: bool = False  # on the CPU, small batches' hooks may run native kernels (server/kernels, --compile-kernels)


class AdapterMethod(ABC):
    """One adapter method's slot storage. `write` overwrites a slot; `clear` resets it to identity.

    Each method names itself (`name`, its entry in `families`), which is also the label its compute
    time and its requests are counted under; a method that can be folded into the weights says so
    with `can_merge` and reports `<name>_merged` while folded.
    """

    name: Method
    # Acts only at the two ends of the model (the token embedding, the LM head): a captured decode step
    # serves its rows from embeddings made before it, and leaves their logits to be made after it.
    at_ends: bool = False

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        self.ctx = ctx
        self.timer = timer

    @abstractmethod
    def write(self, slot: int, payload: MethodWeights) -> None:
        """Overwrite `slot` with one adapter's part that this method serves (its weights type)."""

    @abstractmethod
    def clear(self, slot: int) -> None: ...

    def slot_bytes(self, payload: MethodWeights) -> int:
        """Device bytes a slot holding `payload` takes (what the byte budget of the device tier counts):
        by default its tensors at 4 bytes a value, as the float32 methods store them."""
        return nbytes(payload.tensors())

    @abstractmethod
    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        """Routing for a batch whose row i uses slot `slots[i]`; None when no row uses this method."""

    def device_bytes(self) -> int:
        return 0

    def prefix(self, slot: int) -> KVPrefix | None:
        """The entries a row of this slot starts with in its KV cache, if the method works that way."""
        return None

    # Graph replay: a plan for any mix of slots, fixed at capture time.
    def uses(self, slots: list[int]) -> bool:
        """Whether any row of this batch has work for this method (a folded adapter has none)."""
        return False

    def static_plan(self, routing: Routing) -> MethodPlan | None:
        """A plan that reads `routing`'s buffers only inside its hooks, so one captured graph serves
        every mix of this method's slots (with as many distinct slots as the graph was captured for).
        None: this method has no such plan, and batches that use it run eagerly.
        """
        return None

    @property
    def layout_version(self) -> int:
        """Changes when the storage a static plan captured is replaced (a new table, new shapes)."""
        return 0

    # Merging: only methods whose adapters are linear in the weights implement these.
    def can_merge(self, slot: int) -> bool:
        """Whether the method can fold `slot` in (AdapterSlots also asks the adapter and the base weights)."""
        return False

    def merge(self, slot: int) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    @property
    def merged_slot(self) -> int | None:
        return None

    def export(self, slot: int, model: torch.nn.Module) -> None:
        """Write `slot`'s part into `model` for good, for a standalone copy (`adapter-server merge`) of a part
        that is never folded while serving. Only methods whose parts a standalone model can hold do this."""
        raise NotImplementedError
