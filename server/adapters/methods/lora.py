"""LoRA (HF PEFT): y = W x + s * (B (A x) + b_B) on any Linear of the decoder layers, per row.

Storage is per (module, slot) at each adapter's real rank, in float32 (PEFT keeps adapter weights in
float32 over a lower-precision base and casts the sum back); s * B is kept transposed in memory. The
scaling is folded into B and b_B when a slot is written. Each row adds its own adapter's delta, in
float32, to its base output, and the sum is rounded once to the base dtype:

    y = y + s B (A x) + s b_B                          # per row, its adapter's blocks

A batch plan routes rows by the adapters present, per module, in one of four ways:
- on the CPU, the native kernel (server/kernels/lora_rows.cpp): one call per Linear, or per group of
  sibling Linears of one input (`linear_out_group`), each row reading its own adapter's blocks (for
  decode-sized batches at any rank, and longer ones up to rank NATIVE_RANK);
- one adapter: two products over the batch, rows of other adapters masked to zero;
- several adapters in long runs of rows (prefill): two products per run;
- several adapters in short runs: grouped products over the rows of each adapter, gathered and
  zero-padded to the largest group (stacks of the set's blocks, kept per set of adapters).

DoRA (PEFT `use_dora`) is the same plus a per-output-row magnitude scale g = m / ||W + s B A||_row,
computed once when the slot is written: y = W x + b + (g - 1) (W x) + g s B (A x), in PEFT's order of
operations. Rows of plain LoRA, or of no adapter, have g = 1, where those extra terms are exactly 0.

For graph replay, a static layout mirrors every slot zero-padded to a common rank per module (built
on first use, written in place after): the products gather the blocks of the batch's distinct slots,
or, when those are a third of the slots or more, take every slot's block side by side; each row keeps
its own columns. Compiled (CUDA), the hooks read each row's own block instead (`fused_delta`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ... import kernels
from ...compiled import Compiled, Guarded
from ...engine.moe import group_offsets, grouped_linear
from ..families import Method
from ..spec import MethodWeights
from ..synth import synth_lora
from .base import AdapterMethod, MethodPlan, MethodRecord, Routing, SlotContext, StepTimer, nbytes
from .layout import StaticLayout

F32 = torch.float32
STACKED = 4  # sets of adapters whose blocks stay stacked for grouped products (LoRAMethod._stacked)
RUN_TOKENS = 16  # rows of several adapters go by runs of one adapter when runs average this many tokens
NATIVE_TYPES = (torch.float32, torch.bfloat16)
# The native kernel (lora_rows.cpp) takes batches of up to NATIVE_TOKENS tokens at any rank, and longer ones
# (prefill) where no adapter's rank passes NATIVE_RANK: its products beat the PyTorch path's (whose float32
# add into a bfloat16 output costs three passes) up to there. 2,048 tokens, rank 16: 1.2 against 2.3 ms;
# rank 64: 6.0 against 4.1 ms (this machine, gate_proj of SmolLM2, 8 adapters).
NATIVE_TOKENS = 64
NATIVE_RANK = 32
# With compiled hooks, graph-replayed decode batches go by the segmented kernels when their distinct slots
# average this many rows or more (each kernel tile is 16 rows of one adapter), else by the compiled per-row
# form. H100, Llama-3.1-8B shapes, batch 16, LoRA r16 on every Linear: one adapter +25% per step against
# +35%; eight adapters of two rows each +43% against +36% (benchmarks/gpu_lora.py, 2026-12-06).
SEGMENT_ROWS = 8
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
LORA_ROWS = [_I64, _I64, _I64, _P, ctypes.c_int, _I64, _P, _P, _P, ctypes.c_int, ctypes.c_int]
NAME: Method = "lora"
log = logging.getLogger(__name__)


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
class LoRAExperts:
    """LoRA on one fused expert weight of a routed MLP (PEFT `target_parameters`): expert e's weight
    [out, in] gains s * B[e] @ A[e]."""

    module: str  # the experts module, e.g. model.layers.0.mlp.experts
    param: str  # gate_up_proj or down_proj
    A: torch.Tensor  # [E, r, in]
    B: torch.Tensor  # [E, out, r]
    scale: float


@dataclass(frozen=True)
class LoRAWeights(MethodWeights):
    modules: list[LoRAModule]
    experts: list[LoRAExperts] = field(default_factory=list)

    @property
    def mergeable(self) -> bool:
        """A LoRA bias would need a bias in the base Linear to fold into: Llama's have none. Expert LoRA
        is served unfolded."""
        return all(m.bias is None for m in self.modules) and not self.experts

    def tensors(self) -> list[torch.Tensor]:
        return ([t for m in self.modules for t in (m.A, m.B, m.bias, m.magnitude) if t is not None]
                + [t for x in self.experts for t in (x.A, x.B)])


def _pad8(r: int) -> int:
    """Ranks padded to a multiple of 8: torch's grouped product wants every stride a multiple of 16 bytes."""
    return -(-r // 8) * 8


class _ExpertTable:
    """One expert weight's LoRA for the slots that hold one: block row 1.. per owning slot, row 0 all
    zeros, each zero-padded to rank R: A [rows * E, R, in], s * B [rows * E, out, R] (group row * E + e).
    `row` [S] maps each slot to its block row (0: none), so rows of other slots and of none add exactly 0
    and one table serves every batch and graph replay (`row` is written in place; the blocks are replaced,
    which drops the captured graphs, only when they grow)."""

    def __init__(self, S: int, E: int, R: int, out: int, inp: int, dev: torch.device, capacity: int = 2) -> None:
        self.E, self.R, self.out, self.inp, self.dev = E, R, out, inp, dev
        self.A = torch.zeros(capacity * E, R, inp, device=dev, dtype=F32)
        self.sB = torch.zeros(capacity * E, out, R, device=dev, dtype=F32)
        self.row = torch.zeros(S, dtype=torch.long, device=dev)
        self.rows: dict[int, int] = {}  # slot -> block row
        self.free: list[int] = list(range(capacity - 1, 0, -1))

    @property
    def capacity(self) -> int:
        return self.A.shape[0] // self.E

    def _grow(self, capacity: int, R: int) -> None:
        A = torch.zeros(capacity * self.E, R, self.inp, device=self.dev, dtype=F32)
        sB = torch.zeros(capacity * self.E, self.out, R, device=self.dev, dtype=F32)
        n = self.A.shape[0]
        A[:n, : self.R], sB[:n, :, : self.R] = self.A, self.sB
        self.free += list(range(capacity - 1, self.capacity - 1, -1))
        self.A, self.sB, self.R = A, sB, R

    def put(self, slot: int, x: LoRAExperts) -> bool:
        """Write `slot`'s blocks; whether the tables were replaced (grown)."""
        grown = False
        R = max(self.R, _pad8(x.A.shape[1]))
        if slot not in self.rows and not self.free:
            self._grow(2 * self.capacity, R)
            grown = True
        elif R > self.R:
            self._grow(self.capacity, R)
            grown = True
        k = self.rows[slot] if slot in self.rows else self.free.pop()
        self.rows[slot] = k
        blocks = slice(k * self.E, (k + 1) * self.E)
        r = x.A.shape[1]
        self.A[blocks], self.sB[blocks] = 0, 0
        self.A[blocks, :r] = x.A.to(self.dev)
        self.sB[blocks, :, :r] = (x.B * x.scale).to(self.dev)
        self.row[slot] = k
        return grown

    def clear(self, slot: int) -> None:
        k = self.rows.pop(slot)
        self.row[slot] = 0
        blocks = slice(k * self.E, (k + 1) * self.E)
        self.A[blocks], self.sB[blocks] = 0, 0
        self.free.append(k)

    def nbytes(self) -> int:
        return nbytes((self.A, self.sB))

    def delta(self, x: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + s B A x per pair, from its own (slot, expert) block: the pairs grouped by block, two grouped
        products (no loop over experts or adapters)."""
        group, perm = torch.sort(self.row[slots] * self.E + experts)
        offsets = group_offsets(group, self.A.shape[0])
        d = grouped_linear(x.to(F32)[perm], self.A, offsets)  # [P, R]
        d = grouped_linear(d, self.sB, offsets)  # [P, out]
        delta = torch.empty_like(d)
        delta[perm] = d
        return (y.to(F32) + delta).to(y.dtype)

    def delta_static(self, x: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same for the fixed-shape decode step: each pair's block gathered, batched products. Its
        pairs are few (rows x top-k), and no grouped product means no host read of group sizes."""
        g = self.row[slots] * self.E + experts
        d = torch.bmm(self.A[g], x.to(F32)[:, :, None])  # [P, R, 1]
        return (y.to(F32) + torch.bmm(self.sB[g], d)[:, :, 0]).to(y.dtype)


class _ExpertLoRA:
    """The expert tables of one method: (layer, param) -> table."""

    def __init__(self, ctx: SlotContext) -> None:
        self.ctx = ctx
        self.tables: dict[tuple[int, str], _ExpertTable] = {}

    def write(self, slot: int, experts: list[LoRAExperts]) -> bool:
        """Whether a table was added or replaced (graphs read the old ones)."""
        changed = False
        for x in experts:
            key = (self.ctx.base.split(x.module)[0], x.param)
            t = self.tables.get(key)
            if t is None:
                E, r = x.A.shape[0], x.A.shape[1]
                _, out, inp = self.ctx.base.experts[x.module][x.param]
                t = self.tables[key] = _ExpertTable(self.ctx.num_slots, E, _pad8(r), out, inp, self.ctx.device)
                changed = True
            changed = t.put(slot, x) or changed
        return changed

    def clear(self, slot: int) -> bool:
        """Whether a table was removed (its last owner left)."""
        changed = False
        for key, t in list(self.tables.items()):
            if slot in t.rows:
                t.clear(slot)
                if not t.rows:
                    del self.tables[key]
                    changed = True
        return changed

    def used(self, slots: list[int]) -> dict[tuple[int, str], _ExpertTable]:
        return {k: t for k, t in self.tables.items() if any(s in t.rows for s in slots)}

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values())


@dataclass
class _Slot:
    A: torch.Tensor  # [r, in] float32 on the device
    sB: torch.Tensor  # [out, r] s * B
    sb: torch.Tensor | None  # [out] s * b_B
    g: torch.Tensor | None = None  # [out] DoRA's m / ||W + s B A||_row

    def nbytes(self) -> int:
        return nbytes((self.A, self.sB, self.sb, self.g))  # float32, all


@dataclass
class _Grouped:
    """Rows grouped by adapter, for batches of several adapters: one batched product over the n adapters
    present, each of its m rows against its own adapter's block only (zero-padded to the largest rank
    present, which adds exactly 0), instead of every row against every adapter's columns."""

    take: torch.Tensor  # [n * m] the row of x for each place (padding places read row 0)
    put: torch.Tensor  # [n * m] the row of the result for each place (padding places write row B, dropped)
    At: torch.Tensor  # [n, in, R]
    sBt: torch.Tensor  # [n, R, out]
    place: torch.Tensor | None = None  # [B] each row's place, when every row has one (a gather, not a scatter)


@dataclass
class _Native:
    """One module's blocks as the native kernel reads them (lora_rows.cpp): per adapter of the batch (in
    the order `loc` numbers them), its A [r, in] and s * B transposed [r, out], both contiguous, and its
    DoRA scale g and bias s * b_B where it has them; an adapter without this module has none (rank 0, its
    rows add nothing here). `bias`: the Linear's own bias in float32 (DoRA does not scale it)."""

    loc: torch.Tensor  # [B] int64: each row's adapter among the batch's, -1 for rows of none
    out: int
    blocks: list[_Slot | None]
    bias: torch.Tensor | None = None


class _NativeCall:
    """The constant part of one kernel call over sibling modules: which outputs they change, and their
    blocks as the kernel reads them."""

    def __init__(self, kernel: Callable[..., int], use: list[int], mods: list[_Native]) -> None:
        self.kernel = kernel
        self.keep = mods  # the tensors whose memory the pointers name
        self.use = use
        self.loc = mods[0].loc.data_ptr()
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        vals = [len(mods), len(mods[0].blocks)]
        for m in mods:
            vals += [m.out, ptr(m.bias)]
            for w in m.blocks:
                vals += [0] * 5 if w is None else [w.A.data_ptr(), w.sB.data_ptr(), w.A.shape[0], ptr(w.g), ptr(w.sb)]
        self.mods = (ctypes.c_int64 * len(vals))(*vals)
        self.ys = ctypes.c_int64 * (2 * len(mods))
        self.rank = max((w.A.shape[0] for m in mods for w in m.blocks if w is not None), default=0)


@dataclass
class _ModulePlan:
    A: torch.Tensor | None  # [R, in]: the one adapter here (None: grouped)
    sB: torch.Tensor | None  # [out, R]
    colmask: torch.Tensor | None  # [B, 1, 1] bool, the rows that use it; None when every row does
    bias: torch.Tensor | None  # [B, 1, out] per-row s * b_B (zeros for rows without one)
    g: torch.Tensor | None = None  # [B, 1, out] DoRA scale per row (ones for other rows)
    base_bias: torch.Tensor | None = None  # [out] the Linear's own bias, which DoRA does not scale
    grouped: Callable[[], _Grouped] | None = None  # several adapters: the grouped products (built on first use)
    runs: list[tuple[int, int, _Slot]] | None = None  # several adapters: rows s:e of one adapter each
    native: _Native | None = None  # where the native kernel may add the delta (on the CPU)

    def by_runs(self, x: torch.Tensor) -> bool:
        """Several adapters, in runs long enough (prefill) to go by two products per run of rows of one
        adapter; shorter runs (decode) go by the grouped products over the adapters."""
        return self.runs is not None and len(self.runs) * RUN_TOKENS <= x.shape[0] * x.shape[1]


def add_delta(y: torch.Tensor, delta: torch.Tensor, g: torch.Tensor | None, base_bias: torch.Tensor | None
              ) -> torch.Tensor:
    """y + delta, or for DoRA y + (g - 1) W x + g delta (W x: y without the base bias, which DoRA does
    not scale), in PEFT's order of operations, in float32, then y's dtype. g = 1 makes it y + delta."""
    y32 = y.to(F32)
    if g is None:
        return (y32 + delta).to(y.dtype)
    wx = y32 if base_bias is None else y32 - base_bias
    return (y32 + (g - 1) * wx + g * delta).to(y.dtype)


class LoRAPlan(MethodPlan):
    def __init__(self, mods: dict[tuple[int, str], _ModulePlan], timer: StepTimer, label: str,
                 experts: dict[tuple[int, str], _ExpertTable], slot_idx: torch.Tensor, kernel: Callable | None) -> None:
        self.mods, self.timer, self.label = mods, timer, label
        self.experts, self.slot_idx = experts, slot_idx
        self.kernel = kernel
        self._calls: dict[tuple[int, tuple[str, ...]], _NativeCall | None] = {}

    def experts_out(self, layer: int, name: str, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor | None:
        t = self.experts.get((layer, name))
        if t is None:
            return None
        with self.timer.span(self.label):
            return t.delta(x, experts, self.slot_idx[rows], y)

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        p = self.mods.get((layer, name))
        if p is None:
            return None
        if p.native is not None and self.linear_out_group(layer, (name,), x, [y]) is not None:
            return y
        with self.timer.span(self.label):
            if p.g is not None or p.bias is not None:  # DoRA scales the base output; a bias joins the delta first
                return add_delta(y, self._delta(p, x), p.g, p.base_bias)
            # y + delta in float32, rounded once to y's dtype (as PEFT adds its float32 delta): an in-place
            # add of a float32 tensor into y computes in float32 and rounds once, in one pass over y
            if p.by_runs(x):
                return self._add_runs(p, x, y)
            return y.add_(self._delta(p, x))

    def linear_out_group(self, layer: int, names: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]
                         ) -> list[torch.Tensor] | None:
        """Sibling Linears of one input in one native call, where every adapted one may take it."""
        key = (layer, names)
        if key not in self._calls:
            self._calls[key] = self._call(layer, names)
        c = self._calls[key]
        if c is None or not self._native(c, x, ys):
            return None
        return ys

    def _call(self, layer: int, names: tuple[str, ...]) -> _NativeCall | None:
        use = [i for i, n in enumerate(names) if (layer, n) in self.mods]
        nat = [self.mods[(layer, names[i])].native for i in use]
        if self.kernel is None or not use or any(n is None for n in nat):
            return None
        return _NativeCall(self.kernel, use, nat)  # type: ignore[arg-type]

    def _native(self, c: _NativeCall, x: torch.Tensor, ys: list[torch.Tensor]) -> bool:
        """Add each row's delta into ys in place by the native kernel, if this call is one it takes: float32
        or bfloat16, rows laid out evenly, a few tokens (decode) or low ranks (NATIVE_TOKENS, NATIVE_RANK)."""
        if x.dim() != 3 or x.dtype not in NATIVE_TYPES or not x.is_contiguous():
            return False
        B, T = x.shape[:2]
        if B * T > NATIVE_TOKENS and c.rank > NATIVE_RANK:
            return False
        t0 = time.perf_counter()
        vals = []
        for i in c.use:
            y = ys[i]
            if y.dtype != x.dtype or y.stride(2) != 1 or (T > 1 and y.stride(0) != T * y.stride(1)):
                return False
            vals += [y.data_ptr(), y.stride(1) if T > 1 else y.stride(0)]
        bf16 = x.dtype == torch.bfloat16
        c.kernel(B * T, T, x.shape[2], x.data_ptr(), bf16, x.shape[2], c.loc, c.mods, c.ys(*vals), bf16,
                    torch.get_num_threads())
        if self.timer.enabled:
            self.timer.add(self.label, time.perf_counter() - t0)
        return True

    @staticmethod
    def _add_runs(p: _ModulePlan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [B, T, out] + each row's s * B A x, in place, by two products per run of rows of one adapter
        (rows of none, or of an adapter without this module, add nothing)."""
        assert p.runs is not None
        x32 = x.to(F32)
        for s, e, w in p.runs:
            out[s:e].add_(F.linear(F.linear(x32[s:e], w.A), w.sB))
        return out

    @staticmethod
    def _by_groups(gr: _Grouped, x: torch.Tensor) -> torch.Tensor:
        """[B, T, out]: each row's s * B A x by the grouped products (one per adapter present), brought back
        to the rows by a gather where every row has a place, else by a scatter onto zeros (rows without
        this module's adapter add 0; CPU index_add_ would loop row by row)."""
        B, T = x.shape[:2]
        xg = x.to(F32).index_select(0, gr.take).view(gr.At.shape[0], -1, x.shape[-1])  # [n, m*T, in]
        dg = torch.bmm(torch.bmm(xg, gr.At), gr.sBt).view(-1, T, gr.sBt.shape[2])  # [n*m, T, out]
        if gr.place is not None:
            return dg.index_select(0, gr.place)
        return dg.new_zeros(B + 1, T, dg.shape[2]).index_copy_(0, gr.put, dg)[:B]

    @staticmethod
    def _shrink(p: _ModulePlan, x: torch.Tensor) -> torch.Tensor:
        """[B, T, R]: the one adapter's A x, zero for rows that do not use it."""
        assert p.A is not None
        d = F.linear(x.to(F32), p.A)
        return d if p.colmask is None else torch.where(p.colmask, d, 0.0)

    def _delta(self, p: _ModulePlan, x: torch.Tensor) -> torch.Tensor:
        """Each row's s * B A x (+ s * b_B), float32 [B, T, out]."""
        if p.by_runs(x):
            delta = self._add_runs(p, x, x.new_zeros(*x.shape[:2], p.runs[0][2].sB.shape[0], dtype=F32))  # type: ignore[index]
        elif p.grouped is not None:
            delta = self._by_groups(p.grouped(), x)
        else:
            assert p.sB is not None
            delta = F.linear(self._shrink(p, x), p.sB)
        return delta if p.bias is None else delta + p.bias


class _StaticModule:
    """One module laid out for every slot at once: zero-padded to rank R, s folded into B and b."""

    def __init__(self, S: int, R: int, out: int, inp: int, dev: torch.device, base_bias: torch.Tensor | None) -> None:
        self.R = R
        self.A = torch.zeros(S, R, inp, device=dev, dtype=F32)
        self.sB = torch.zeros(out, S, R, device=dev, dtype=F32)  # [out, S*R] as one matrix
        self.sb = torch.zeros(S, out, device=dev, dtype=F32)
        self.g = torch.ones(S, out, device=dev, dtype=F32)
        self.rank = torch.zeros(S, device=dev, dtype=torch.int32)  # each slot's own rank (0: none): the segmented kernels read no more
        self.base_bias = base_bias

    def put(self, slot: int, w: _Slot | None) -> None:
        self.A[slot], self.sB[:, slot], self.sb[slot], self.g[slot], self.rank[slot] = 0, 0, 0, 1, 0
        if w is None:
            return
        r = w.A.shape[0]
        self.rank[slot] = r
        self.A[slot, :r], self.sB[:, slot, :r] = w.A, w.sB
        if w.sb is not None:
            self.sb[slot] = w.sb
        if w.g is not None:
            self.g[slot] = w.g


def routed_delta(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, sB: torch.Tensor, sb: torch.Tensor,
                 g: torch.Tensor | None, base_bias: torch.Tensor | None, i: torch.Tensor, u: torch.Tensor | None,
                 j: torch.Tensor) -> torch.Tensor:
    """Two products over the blocks of the batch's distinct slots u [U] (gathered: each adapter read
    once, whatever rows use it; j [B] each row's index in u), or with u None over every slot's block
    in place (j = i); each row keeps its own columns. x [B, T, in], A [S, R, in], sB [out, S, R],
    sb [S, out], g [S, out] or None (LoRA), i [B] slots."""
    if u is not None:
        A, sB = A.index_select(0, u), sB.index_select(1, u)
    N, R, inp = A.shape
    B, T = x.shape[:2]
    d = F.linear(x.to(F32), A.reshape(N * R, inp))  # [B, T, N*R]
    if N > 1:
        own = (torch.arange(N, device=i.device)[None, :] == j[:, None])[:, None, :, None]  # [B, 1, N, 1]
        d = torch.where(own, d.view(B, T, N, R), 0.0).view(B, T, N * R)
    delta = F.linear(d, sB.reshape(-1, N * R)) + sb.index_select(0, i)[:, None, :]
    return add_delta(y, delta, None if g is None else g.index_select(0, i)[:, None, :], base_bias)


def fused_delta(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, sB: torch.Tensor, sb: torch.Tensor,
                g: torch.Tensor | None, base_bias: torch.Tensor | None, i: torch.Tensor) -> torch.Tensor:
    """Each row's own block as gathers, products and sums, for the compiler: it turns each product into
    one kernel that reads every row's block in place (rows of one adapter share it through the cache).
    Eagerly it builds [B, T, R, in]: compiled use only (`LoRAMethod.fused_hooks`). Unlike the
    bottleneck's wide blocks, a LoRA block is small enough that reading it once per row costs less than
    the gathers and extra kernels of the routed products."""
    d = (x.to(F32)[:, :, None, :] * A[i][:, None, :, :]).sum(-1)  # [B, T, R]
    Bi = sB.permute(1, 0, 2)[i]  # [B, out, R]
    delta = (d[:, :, None, :] * Bi[:, None, :, :]).sum(-1) + sb[i][:, None, :]  # [B, T, out]
    return add_delta(y, delta, None if g is None else g[i][:, None, :], base_bias)


class LoRAStaticPlan(MethodPlan):
    """Inside a captured graph: no timing spans (events cannot be captured). Zero-padded blocks and zero
    bias add exactly 0, and DoRA's scale of 1 is exact, so rows of other slots are untouched. The
    products read the batch's distinct blocks or every slot's, whichever moves fewer bytes
    (`Routing.distinct`)."""

    def __init__(self, mods: dict[tuple[int, str], _StaticModule], routing: Routing, magnitude: bool,
                 routed: Callable[..., torch.Tensor], fused: Callable[..., torch.Tensor] | None,
                 experts: dict[tuple[int, str], _ExpertTable] | None = None,
                 segmented: Guarded | None = None, group: bool = True, dispatch: str = "auto") -> None:
        self.mods, self.routing, self.magnitude = mods, routing, magnitude
        self.routed, self.fused, self.segmented, self.group = routed, fused, segmented, group
        self.dispatch = dispatch
        self.experts = experts or {}

    def experts_out(self, layer: int, name: str, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor | None:
        t = self.experts.get((layer, name))
        return None if t is None else t.delta_static(x, experts, self.routing.slots[rows], y)

    def linear_out_group(self, layer: int, names: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]
                         ) -> list[torch.Tensor] | None:
        """Sibling Linears of one input (q/k/v, gate/up) in the same two launches of the segmented kernels,
        where their tables have one padded rank (else None: each on its own)."""
        use = [(i, st) for i, n in enumerate(names) if (st := self.mods.get((layer, n))) is not None]
        sts = [st for _, st in use]
        mode = self._segments(x)
        if not use or not self.group or mode is None or len({st.R for st in sts}) > 1 or (
                self.magnitude and len({st.base_bias is None for st in sts}) > 1):
            return None
        return ys if self._segmented(mode, x, [ys[i] for i, _ in use], sts) else None

    def _segments(self, x: torch.Tensor) -> str | None:
        """How the segmented kernels take this call, if they do: decode steps only (one token a row); by
        default ("auto") by segments, and with compiled hooks beside them only for batches whose distinct
        slots average SEGMENT_ROWS rows or more; forced "segments" or "rows" (every row its own) for any
        decode batch."""
        r = self.routing
        if self.segmented is None or self.segmented.error is not None or x.shape[1] != 1 or r.order is None:
            return None
        if self.dispatch != "auto":
            return self.dispatch if self.dispatch != "rows" or r.ident is not None else None
        return "segments" if self.fused is None or r.slots.shape[0] >= SEGMENT_ROWS * r.uniq.shape[0] else None

    def _segmented(self, mode: str, x: torch.Tensor, ys: list[torch.Tensor], sts: list[_StaticModule]) -> bool:
        """ys += the deltas by the segmented kernels (`mode`: by segments, or by rows), in place; whether they
        ran (else ys are untouched)."""
        r = self.routing
        dora = self.magnitude
        bias = dora and sts[0].base_bias is not None
        assert self.segmented is not None and r.order is not None and r.starts is not None
        route = (r.slots, r.ident) if mode == "rows" else (r.uniq, r.starts, r.order)
        return self.segmented(mode, x[:, 0], [y[:, 0] for y in ys], [st.A for st in sts], [st.sB for st in sts],
                              [st.sb for st in sts], [st.rank for st in sts], *route,
                              [st.g for st in sts] if dora else None, [st.base_bias for st in sts] if bias else None)

    def linear_out(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        st = self.mods.get((layer, name))
        if st is None:
            return None
        r, g = self.routing, st.g if self.magnitude else None
        if (mode := self._segments(x)) is not None and self._segmented(mode, x, [y], [st]):
            return y
        if self.fused is not None:
            return self.fused(x, y, st.A, st.sB, st.sb, g, st.base_bias, r.slots)
        u, j = (r.uniq, r.local) if r.distinct(st.A.shape[0]) else (None, r.slots)
        return self.routed(x, y, st.A, st.sB, st.sb, g, st.base_bias, r.slots, u, j)


class LoRAMethod(AdapterMethod):
    name = NAME
    magnitude = False  # DoRA's per-row scale
    # Compiled graph hooks as `fused_delta` (each row's block, read in place) rather than `routed_delta`: on an
    # H100 (8B, batch 16) one rank-16 LoRA cost +40% against +69%, eight mixed +42% against +108%.
    fused_hooks = True
    # Graph hooks of decode steps as the segmented kernels (server/kernels/segments.py). None: on CUDA where
    # Triton is there; True: also without CUDA (Triton's interpreter: the tests); False: never.
    segment_kernels: bool | None = None
    group_segments = True  # sibling Linears (q/k/v, gate/up) in the same launches of the segmented kernels
    # Which decode batches they take: "auto" (SEGMENT_ROWS), or every one "segments" or "rows" (each row its
    # own segment, no 16-row tiles; not yet measured on a GPU). The benchmarks A/B these.
    segment_dispatch = "auto"

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        super().__init__(ctx, timer)
        self.mods: dict[str, dict[int, _Slot]] = {}  # module -> slot -> weights
        self.experts = _ExpertLoRA(ctx)  # LoRA on routed MLPs' expert weights: the owning slots' tables, also for graphs
        self.written: set[int] = set()  # slots holding an adapter: `uses` runs every step, in O(rows)
        self.static = StaticLayout[str, _StaticModule](self)  # graph replay only, built on first use
        self._merged: int | None = None
        self._backup: dict[str, torch.Tensor] = {}  # module -> base weight, while a slot is folded in
        # set of adapters -> module -> their blocks stacked for the grouped products (`_stacked`)
        self._stacks: OrderedDict[tuple[int, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._routed = Compiled(routed_delta, ctx.compile)
        self._fused = Compiled(fused_delta) if ctx.compile and self.fused_hooks else None
        self._kernel = kernels.load("lora_rows", LORA_ROWS) if ctx.native and ctx.device.type == "cpu" else None
        self._segmented = self._segment_kernel()
        self._group = self.group_segments
        self._dispatch = self.segment_dispatch

    def _segment_kernel(self) -> Guarded | None:
        want = self.segment_kernels
        if want is False or (want is None and self.ctx.device.type != "cuda"):
            return None
        from ...kernels import segments

        if not segments.available():
            log.warning("segmented LoRA kernels unavailable, graph hooks use PyTorch products: %s", segments.ERROR)
            return None
        return Guarded(lambda mode, *a: (segments.rows if mode == "rows" else segments.lora)(*a),
                       "the segmented LoRA kernels")

    def write(self, slot: int, payload: MethodWeights) -> None:
        w = payload
        assert isinstance(w, LoRAWeights)
        self.clear(slot)  # drops every stack holding the slot (no stack holds a slot not written)
        dev = self.ctx.device
        for m in w.modules:
            sb = None if m.bias is None else (m.bias * m.scale).to(dev)
            sB = (m.B * m.scale).to(dev).t().contiguous().t()  # [out, r] over [r, out] memory: the kernel's layout
            self.mods.setdefault(m.module, {})[slot] = _Slot(m.A.to(dev).contiguous(), sB, sb, self._g(m))
        if self.experts.write(slot, w.experts):
            self.static.drop()
        self.written.add(slot)
        self.static.written(slot)

    def _g(self, m: LoRAModule) -> torch.Tensor | None:
        """DoRA's per-row scale, from the base weight as it is now: unfolded, since AdapterSlots.write
        undoes any fold before writing a slot."""
        if m.magnitude is None:
            return None
        W = self.ctx.modules[m.module].weight.detach().to(F32)
        dev = W.device
        norm = torch.linalg.norm(W + m.scale * (m.B.to(dev) @ m.A.to(dev)), dim=1)  # [out]
        return m.magnitude.to(dev) / norm

    def clear(self, slot: int) -> None:
        if self._merged == slot:
            self.unmerge()
        if slot not in self.written:
            return
        self._stacks.clear()  # a stack holding this slot's blocks would serve a later occupant's rows
        for slots in self.mods.values():
            slots.pop(slot, None)
        if self.experts.clear(slot):
            self.static.drop()
        self.written.discard(slot)
        self.static.cleared(slot)

    # -- graph replay: the static layout's sites are the adapted Linears (layout.py) ---------------
    def fits_static(self, slot: int, tables: dict[str, _StaticModule]) -> bool:
        """A new module, or a higher rank, does not fit."""
        return all(slot not in per or (module in tables and per[slot].A.shape[0] <= tables[module].R)
                   for module, per in self.mods.items())

    def put_static(self, key: str, table: _StaticModule, slot: int) -> None:
        table.put(slot, self.mods.get(key, {}).get(slot))

    def widths(self, key: str) -> list[int]:
        return [w.A.shape[0] for w in self.mods.get(key, {}).values()]

    def build_static(self) -> dict[str, _StaticModule]:
        out = {}
        for module, per in self.mods.items():
            if not per:
                continue
            lin = self.ctx.modules[module]
            bias = None if lin.bias is None else lin.bias.detach().to(F32)
            out_f, in_f = self.ctx.base.linears[module]
            st = _StaticModule(self.ctx.num_slots, max(w.A.shape[0] for w in per.values()), out_f, in_f,
                               self.ctx.device, bias)
            for slot, w in per.items():
                st.put(slot, w)
            out[module] = st
        return out

    def static_plan(self, routing: Routing) -> MethodPlan | None:
        split = self.ctx.base.split
        return LoRAStaticPlan({split(m): st for m, st in self.static.tables().items()}, routing, self.magnitude,
                              self._routed, self._fused, dict(self.experts.tables), self._segmented, self._group,
                              self._dispatch)

    @property
    def layout_version(self) -> int:
        return self.static.version

    def uses(self, slots: list[int]) -> bool:
        return any(s in self.written and s != self._merged for s in slots)

    def device_bytes(self) -> int:
        """The slots' blocks, their stacks for grouped products, and while an adapter is folded in, the copy
        of the base weights it changed."""
        blocks = sum(w.nbytes() for per in self.mods.values() for w in per.values())
        stacked = nbytes(t for per in self._stacks.values() for pair in per.values() for t in pair)
        return blocks + stacked + self.experts.nbytes() + nbytes(self._backup.values())

    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        mods = {}
        batch = sorted({s for s in slots if s in self.written and s != self._merged})  # the native kernel's numbering
        loc = torch.tensor([batch.index(s) if s in batch else -1 for s in slots]) if self._kernel is not None else None
        runs, start = [], 0  # consecutive rows of one slot
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                runs.append((start, i, slots[start]))
                start = i
        for module, per in self.mods.items():
            present = sorted({s for s in slots if s in per and s != self._merged})
            if present:
                p = mods[self.ctx.base.split(module)] = self._module(module, slots, slot_idx, present, per, runs)
                if loc is not None:
                    p.native = _Native(loc, per[present[0]].sB.shape[0], [per.get(s) for s in batch], p.base_bias)
        experts = self.experts.used([s for s in slots if s != self._merged])
        return LoRAPlan(mods, self.timer, self.name, experts, slot_idx, self._kernel) if mods or experts else None

    def _module(self, module: str, slots: list[int], slot_idx: torch.Tensor, present: list[int],
                per: dict[int, _Slot], runs: list[tuple[int, int, int]]) -> _ModulePlan:
        dev, B = self.ctx.device, len(slots)
        ws = [per[s] for s in present]
        A = sB = colmask = grouped = mine = None
        if len(present) > 1:
            grouped = functools.cache(lambda: self._grouped(module, slots, present, ws))
            mine = [(s, e, per[x]) for s, e, x in runs if x in present]
        else:
            A, sB = ws[0].A, ws[0].sB  # the slot's own blocks, read in place
            if any(s != present[0] for s in slots):
                colmask = (slot_idx == present[0]).view(B, 1, 1)  # rows of other adapters, or none, add 0
        bias = g = None
        if any(w.sb is not None for w in ws):
            bias = torch.zeros(B, 1, ws[0].sB.shape[0], device=dev, dtype=F32)
            for s, w in zip(present, ws, strict=True):
                if w.sb is not None:
                    bias[[i for i, x in enumerate(slots) if x == s], 0] = w.sb
        if any(w.g is not None for w in ws):
            g = torch.ones(B, 1, ws[0].sB.shape[0], device=dev, dtype=F32)
            for s, w in zip(present, ws, strict=True):
                if w.g is not None:
                    g[[i for i, x in enumerate(slots) if x == s], 0] = w.g
        base_bias = self.ctx.modules[module].bias
        return _ModulePlan(A, sB, colmask, bias, g, None if g is None or base_bias is None else base_bias.detach().to(F32),
                           grouped, mine)

    def _grouped(self, module: str, slots: list[int], present: list[int], ws: list[_Slot]) -> _Grouped:
        dev, B = self.ctx.device, len(slots)
        rows = [[i for i, s in enumerate(slots) if s == p] for p in present]
        m = max(len(r) for r in rows)
        take = [r[k] if k < len(r) else 0 for r in rows for k in range(m)]
        put = [r[k] if k < len(r) else B for r in rows for k in range(m)]
        At, sBt = self._stacked(module, tuple(present), ws)
        where = {r: k for k, r in enumerate(put)}
        place = torch.tensor([where[b] for b in range(B)], device=dev) if all(b in where for b in range(B)) else None
        return _Grouped(torch.tensor(take, device=dev), torch.tensor(put, device=dev), At, sBt, place)

    def _stacked(self, module: str, present: tuple[int, ...], ws: list[_Slot]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of the adapters `present` side by side for the grouped products, [n, in, R] and
        [n, R, out], zero-padded to the largest rank. Kept per set of adapters (the last STACKED sets),
        not per batch: rows join and leave every step while the set of adapters they use seldom changes,
        and stacking copies every block of the set (156 MB for eight rank-16 LoRAs on SmolLM2)."""
        per = self._stacks.get(present)
        if per is None:
            per = self._stacks[present] = {}
            while len(self._stacks) > STACKED:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(present)
        if module not in per:
            R = max(w.A.shape[0] for w in ws)
            At = torch.zeros(len(ws), ws[0].A.shape[1], R, device=self.ctx.device, dtype=F32)
            sBt = torch.zeros(len(ws), R, ws[0].sB.shape[0], device=self.ctx.device, dtype=F32)
            for j, w in enumerate(ws):
                r = w.A.shape[0]
                At[j, :, :r], sBt[j, :r] = w.A.t(), w.sB.t()
            per[module] = (At, sBt)
        return per[module]

    # -- folding into the base weights -------------------------------------------------------
    def can_merge(self, slot: int) -> bool:
        """Whether this adapter may be folded is its weights' `mergeable` and the base's (AdapterSlots asks both)."""
        return slot in self.written

    @property
    def merged_slot(self) -> int | None:
        return self._merged

    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """W' = W + s B A (DoRA: g (W + s B A), rows scaled), computed in float32 and cast as PEFT's merge
        does. The base weights are copied first and restored bit for bit by `unmerge`."""
        if self._merged == slot:
            return
        self.unmerge()
        self._merged = slot  # from here an unmerge restores every module copied so far, should a copy fail
        for module, per in self.mods.items():
            w = per.get(slot)
            if w is None:
                continue
            weight = self.ctx.modules[module].weight
            self._backup[module] = weight.detach().clone()
            new = weight.to(F32) + w.sB @ w.A
            if w.g is not None:
                new = w.g[:, None] * new
            weight.copy_(new.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        for module, base in self._backup.items():
            self.ctx.modules[module].weight.copy_(base)
        self._backup.clear()  # a full copy of every folded Linear: not kept past the fold
        self._merged = None


class DoRAMethod(LoRAMethod):
    """DoRA rows: LoRA's storage and plan, with the magnitude scale (its own family and label)."""

    name: Method = "dora"
    magnitude = True


RECORD = MethodRecord(NAME, LoRAMethod, LoRAWeights, mergeable=True, synth=synth_lora, kinds=("lora",), sized=True,
                      demo=("lora", 1))
DORA_RECORD = MethodRecord(DoRAMethod.name, DoRAMethod, LoRAWeights, mergeable=True, synth=synth_lora, kinds=("dora",),
                           sized=True)
