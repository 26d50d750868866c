"""Bottleneck adapters (Pfeiffer seq_bn, Houlsby double_seq_bn, parallel par_bn and their flags), per row.

Storage is per (layer, location, slot) at each adapter's real width: a par_bn of width 288 costs
288 rows, a seq_bn of width 36 costs 36. A batch plan concatenates the weights of the adapters the
batch uses (once per batch composition, reused by every decode step) and routes rows with a column
mask, so one batch of any mix of adapters is two matmuls per sub-block:

    d = f(LN?(z) @ Wd_cat.T + bd_cat) masked to the row's own columns   # [B, T, R]
    u = (d @ Wu_cat + b_up[row]) * s[row]                               # [B, T, H]

The library's placements reduce to per-row coefficients on h (sub-block input) and a (sub-layer
output), derived from AdapterHub's pre_forward / forward / post_forward:
    z = cxa*a + cxh*h                 input of B
    r = cra*a + crh*h                 residual added inside the adapter
    out = core(u, r) + cfh*h          core = u + r, LN_after(u) + r, or LN_after(u + r)
A row without an adapter here gets u = 0, r = a, cfh = 1: out = a + h, exactly the base model.

On bases AdapterHub serves through its plugin interface (Qwen3, Gemma) the bottleneck is hooked on the
sub-layer's output and the model adds the residual itself (the library forces original_ln_after off).
Without a post-norm that is the same formula. Where the architecture norms the sub-layer's output before
the add (Gemma's post-norms N), N is the library's "original" layer norm: the input is z = N(a + h) when
original_ln_before (N(a + h) is also the residual when residual_before_ln is false), and the sub-block
returns h + N(core(u, r)); a row without an adapter gets h + N(a), the base model. (The library reads
the last layer's norm as the "original" one at every layer: see `BottleneckMethod.norms`.)
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import get_activation

from ... import kernels
from ...compiled import Compiled
from ..families import Method
from ..spec import Location, MethodWeights
from ..synth import BN_PRESETS, synth_bottleneck
from .base import AdapterMethod, MethodPlan, MethodRecord, Routing, SlotContext, StepTimer, nbytes
from .layout import StaticLayout

Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BottleneckOptions:
    """The AdapterHub flags that change where the bottleneck reads and what the sub-block returns."""

    parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    adapter_residual_before_ln: bool
    non_linearity: str


@dataclass(frozen=True)
class BottleneckBlock:
    """The adapter at one (layer, location): B(z) = s * (W_up f(W_down LN?(z) + b_down) + b_up)."""

    layer: int
    location: Location
    down_w: torch.Tensor  # [r, H]
    down_b: torch.Tensor  # [r]
    up_w: torch.Tensor  # [H, r]
    up_b: torch.Tensor  # [H]
    scale: torch.Tensor  # [H]  (a float, a learned scalar or a channel vector, expanded)
    ln_before: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight [H], bias [H])
    ln_after: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def width(self) -> int:
        return int(self.down_w.shape[0])


@dataclass(frozen=True)
class BottleneckWeights(MethodWeights):
    """A bottleneck adapter: its placement options and one block per (layer, location)."""

    options: BottleneckOptions
    blocks: list[BottleneckBlock]

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for b in self.blocks:
            out += [b.down_w, b.down_b, b.up_w, b.up_b]
            for pair in (b.ln_before, b.ln_after):
                if pair is not None:
                    out += list(pair)
        return out


NAME: Method = "bottleneck"
log = logging.getLogger(__name__)
LN_EPS = 1e-5  # the adapter's own nn.LayerNorm, not the model's RMSNorm
# The native kernel (server/kernels/bottleneck_rows.cpp): bfloat16 sites whose rows all end as (u + a) + h
# without layer norms, in batches of up to NATIVE_TOKENS tokens (decode); its activations by name. Sites
# with an adapter wider than NATIVE_WIDTH take it when those adapters' tokens are WIDE_TOKENS: at one token
# oneDNN's bfloat16 product of a width-288 par_bn beat it (+2.0 against +2.3 ms a step), at 16 they tie
# (+5.0, +5.2), at 4 it wins (+3.1 against +5.2); narrow ones gain at every size (seq_bn, batch 1: +1.7 ->
# +1.1 ms; 16: +3.4 -> +1.7). In a larger batch it takes a site whose wide adapters have at most 8 tokens:
# the kernel reads each adapter's rows for its own tokens, where PyTorch's path multiplies every token by
# every adapter's columns.
NATIVE_TOKENS = 64
NATIVE_WIDTH = 64
WIDE_TOKENS = range(2, 9)
WIDE_BY_ROWS = True  # False: the rule by the batch's tokens (before 2026-12-06; benchmarks A/B it)
NATIVE_ACTS = {"relu": 0, "swish": 1, "silu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3, "tanh": 4,
               "leakyrelu": 5, "sigmoid": 6}
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
BOTTLENECK_ROWS = [_I64, _I64, _I64, _P, _P, _P, _P, _P, ctypes.c_int]


def activation(name: str):  # noqa: ANN201
    return F.leaky_relu if name == "leakyrelu" else get_activation(name)


def coefficients(o: BottleneckOptions) -> tuple[float, float, float, float, float, int]:
    """(cxa, cxh, cra, crh, cfh, ln_after_mode) for one adapter's options; mode 1 LN(u)+r, 2 LN(u+r)."""
    if o.parallel:  # pre_forward returns (h, h); post_forward adds a, then h if original_ln_after
        cxa, cxh, cra, crh, arbln = 0.0, 1.0, 1.0, 0.0, False
    else:
        cxa, cxh = 1.0, 1.0 if o.original_ln_before else 0.0
        cra, crh = (1.0, 0.0) if o.residual_before_ln else (cxa, cxh)
        arbln = o.adapter_residual_before_ln
    return cxa, cxh, cra, crh, 1.0 if o.original_ln_after else 0.0, 2 if arbln else 1


@dataclass
class _Block:
    """One adapter at one (layer, location), on the device, at its own width r."""

    down_w: torch.Tensor  # [r, H]
    down_b: torch.Tensor  # [r]
    up_w: torch.Tensor  # [H, r]  s * W_up (the scaling folded in), a transposed view of an [r, H] block
    up_b: torch.Tensor  # [H]     s * b_up
    ln_before: tuple[torch.Tensor, torch.Tensor] | None
    ln_after: tuple[torch.Tensor, torch.Tensor] | None

    def nbytes(self) -> int:
        return nbytes([self.down_w, self.down_b, self.up_w, self.up_b,
                       *(t for p in (self.ln_before, self.ln_after) if p for t in p)])


@dataclass
class _SitePlan:
    """Routing at one (layer, location) for one batch. Row tensors are [B, 1, X].

    The scaling s is folded into the up-projection when a slot is written, so u needs no multiply.
    Fast paths, decided once per batch composition: `z_from` when every adapter row reads the same
    input; `plain_out` when every row (adapter or not) ends as (u + a) + h; `colmask` None when all
    rows use the same adapter here (then `ub` is a plain [H] bias fused into the matmul).
    """

    wd: torch.Tensor  # [R, H]
    bd: torch.Tensor  # [R]
    wu_t: torch.Tensor  # [H, R]  (s * W_up, for F.linear)
    colmask: torch.Tensor | None  # [B, 1, R] bool: column belongs to the row's adapter
    acts: list[tuple[object, torch.Tensor | None]]  # (fn, column mask [R] or None for all)
    ub: torch.Tensor  # [H] when colmask is None, else [B, 1, H]  (s * b_up)
    coef: torch.Tensor  # [5, B, 1, 1]: cxa, cxh, cra, crh, cfh
    z_from: str | None  # "a+h", "a", "h", or None for the per-row coefficients
    plain_out: bool
    lnb: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row mask [B,1,1], w [B,1,H], b [B,1,H])
    lna: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # (mode1, mode2 masks, w, b)
    rows: torch.Tensor  # [B, 1, 1] bool: rows with an adapter at this site
    native: _NativeSite | None = None  # where the native kernel may compute the site (on the CPU)


class _NativeSite:
    """One site's blocks as the native kernel reads them (bottleneck_rows.cpp): per adapter of the batch,
    in the order `loc` numbers them, its four blocks, width, input (0: a + h, 1: a, 2: h) and activation."""

    def __init__(self, loc: torch.Tensor, blocks: list[_Block], z_modes: list[int], acts: list[int]) -> None:
        self.keep = (loc, blocks)  # the tensors whose memory the pointers name
        self.loc = loc.data_ptr()
        self.width = max(b.down_w.shape[0] for b in blocks)
        wide = [k for k, b in enumerate(blocks) if b.down_w.shape[0] > NATIVE_WIDTH]
        self.wide_rows = sum(int(x) in wide for x in loc.tolist())  # rows of an adapter wider than NATIVE_WIDTH
        vals = [len(blocks)]
        for b, z, act in zip(blocks, z_modes, acts, strict=True):
            vals += [b.down_w.data_ptr(), b.down_b.data_ptr(), b.up_w.data_ptr(), b.up_b.data_ptr(), b.down_w.shape[0],
                     z, act]
        self.table = (ctypes.c_int64 * len(vals))(*vals)


class BottleneckPlan(MethodPlan):
    def __init__(self, sites: dict[tuple[int, Location], _SitePlan], timer: StepTimer, hidden: int,
                 norms: Callable[[int, Location], tuple[Norm | None, Norm | None]],
                 kernel: Callable[..., int] | None = None) -> None:
        self.sites = sites
        self.timer = timer
        self.hidden = hidden
        self.norms = norms
        self.kernel = kernel

    def residual(self, layer: int, loc: Location, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        p = self.sites.get((layer, loc))
        if p is None:
            return None
        with self.timer.span(NAME):
            out_norm, hub_norm = self.norms(layer, loc)
            if p.native is not None and out_norm is None and (y := self._native(p.native, h, a)) is not None:
                return y
            return self._apply(p, h, a, out_norm, hub_norm)

    def _native(self, n: _NativeSite, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """The site by the native kernel, for a batch it takes: a few tokens, bfloat16, contiguous rows."""
        B, T, H = h.shape
        wide_ok = B * T in WIDE_TOKENS or (WIDE_BY_ROWS and B * T > 1 and n.wide_rows * T < WIDE_TOKENS.stop)
        if B * T > NATIVE_TOKENS or (n.width > NATIVE_WIDTH and not wide_ok):
            return None
        if not (h.is_contiguous() and a.is_contiguous()) or a.dtype != h.dtype:
            return None
        out = torch.empty_like(h)
        assert self.kernel is not None
        self.kernel(B * T, T, H, h.data_ptr(), a.data_ptr(), out.data_ptr(), n.loc, n.table, torch.get_num_threads())
        return out

    def residual_rows(self, layer: int, loc: Location) -> torch.Tensor:
        return self.sites[(layer, loc)].rows

    def _apply(self, p: _SitePlan, h: torch.Tensor, a: torch.Tensor, out_norm: Norm | None,
               hub_norm: Norm | None) -> torch.Tensor:
        cxa, cxh, cra, crh, cfh = p.coef
        if p.z_from == "a+h":
            z = a + h  # [B, T, H]
        elif p.z_from == "a":
            z = a
        elif p.z_from == "h":
            z = h
        else:
            z = a * cxa + h * cxh
        if out_norm is not None:  # hooked (module docstring): AdapterHub's "original" norm
            lnz = (cxa == 1) & (cxh == 1)
            zn = hub_norm(z)  # type: ignore[misc]
            z = torch.where(lnz, zn, z)
        if p.lnb is not None:
            m, w, b = p.lnb
            z = torch.where(m, F.layer_norm(z, (self.hidden,), eps=LN_EPS) * w + b, z)
        d = F.linear(z, p.wd, p.bd)  # [B, T, R]
        if len(p.acts) == 1:
            d = p.acts[0][0](d)  # type: ignore[operator]
        else:
            parts = [torch.where(cm, fn(d), 0.0) for fn, cm in p.acts if cm is not None]  # type: ignore[operator]
            d = torch.stack(parts).sum(0)
        if p.colmask is not None:
            d = torch.where(p.colmask, d, 0.0)
        if p.plain_out and out_norm is None:  # (a + h) + d @ W_up + b_up in one GEMM with the residual as its input term
            s = z if p.z_from == "a+h" else a + h
            H = self.hidden
            out = torch.addmm(s.reshape(-1, H), d.reshape(-1, d.shape[-1]), p.wu_t.t()).view_as(a)
            return out.add_(p.ub)
        u = F.linear(d, p.wu_t, p.ub) if p.colmask is None else F.linear(d, p.wu_t).add_(p.ub)  # [B, T, H]
        r = a * cra + h * crh
        if out_norm is not None:
            r = torch.where(lnz & (cra == 1) & (crh == 1), zn, r)  # residual_before_ln false: the normed input
        if p.lna is None:
            core = u + r
        else:
            m1, m2, w, b = p.lna
            ln_in = torch.where(m2, u + r, u)
            ln = F.layer_norm(ln_in, (self.hidden,), eps=LN_EPS) * w + b
            core = torch.where(m2, ln, torch.where(m1, ln + r, u + r))
        return core + h * cfh if out_norm is None else h + out_norm(core)


IDENTITY = (1.0, 0.0, 1.0, 0.0, 1.0)  # cxa, cxh, cra, crh, cfh of a row without an adapter: a + h


class _StaticSite:
    """One (layer, location) laid out for every slot at once, for graph replay: each slot's block
    zero-padded to a common width R. A slot without an adapter here has zero weights and identity
    coefficients: u = f(0) @ 0 + 0 = 0, so it gives a + h exactly; padded columns meet zero columns of
    the up-projection, so they add exactly 0."""

    def __init__(self, S: int, R: int, H: int, lnb: bool, lna: bool, dev: torch.device, dt: torch.dtype) -> None:
        self.R, self.has_lnb, self.has_lna = R, lnb, lna
        self.wd, self.bd = torch.zeros(S, R, H, device=dev, dtype=dt), torch.zeros(S, R, device=dev, dtype=dt)
        self.wu = torch.zeros(H, S, R, device=dev, dtype=dt)  # [H, S*R] as one matrix for the all-slots product
        self.ub = torch.zeros(S, H, device=dev, dtype=dt)
        self.coef = torch.tensor(IDENTITY, device=dev, dtype=dt).repeat(S, 1)  # [S, 5]
        self.act = torch.zeros(S, dtype=torch.long, device=dev)
        self.has = torch.zeros(S, dtype=torch.bool, device=dev)  # slot has a block here
        # for the segmented kernels (server/kernels/segments.py): each slot's own width (0: none) and its
        # activation by the kernels' numbering (NATIVE_ACTS; -1: one they lack)
        self.width = torch.zeros(S, dtype=torch.int32, device=dev)
        self.kact = torch.zeros(S, dtype=torch.int32, device=dev)
        self.ln = torch.zeros(S, 3, dtype=torch.bool, device=dev)  # before, after mode 1, after mode 2
        self.lnw = torch.ones(S, 2, H, device=dev, dtype=dt)  # before, after
        self.lnb = torch.zeros(S, 2, H, device=dev, dtype=dt)

    def put(self, slot: int, b: _Block | None, opts: BottleneckOptions | None, act: int) -> None:
        for t in (self.wd, self.bd, self.ub, self.ln, self.lnb, self.has, self.width, self.kact):
            t[slot] = 0
        self.wu[:, slot] = 0
        self.lnw[slot] = 1
        if b is None or opts is None:
            self.coef[slot] = torch.tensor(IDENTITY, dtype=self.coef.dtype)
            self.act[slot] = 0
            return
        r = b.down_w.shape[0]
        self.has[slot] = True
        self.width[slot], self.kact[slot] = r, NATIVE_ACTS.get(opts.non_linearity, -1)
        self.wd[slot, :r], self.bd[slot, :r] = b.down_w, b.down_b
        self.wu[:, slot, :r], self.ub[slot] = b.up_w, b.up_b
        *c, mode = coefficients(opts)
        self.coef[slot] = torch.tensor(c, dtype=self.coef.dtype)
        self.act[slot] = act
        if b.ln_before is not None:
            self.ln[slot, 0] = True
            self.lnw[slot, 0], self.lnb[slot, 0] = b.ln_before
        if b.ln_after is not None:
            self.ln[slot, mode] = True
            self.lnw[slot, 1], self.lnb[slot, 1] = b.ln_after

    def fits(self, b: _Block) -> bool:
        return b.down_w.shape[0] <= self.R and (b.ln_before is None or self.has_lnb) and (b.ln_after is None or self.has_lna)


def static_residual(h: torch.Tensor, a: torch.Tensor, i: torch.Tensor, u: torch.Tensor | None, j: torch.Tensor,
                    wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor, ub: torch.Tensor, coef: torch.Tensor,
                    act: torch.Tensor, ln: torch.Tensor, lnw: torch.Tensor, lnb: torch.Tensor, has_lnb: bool,
                    has_lna: bool, acts: tuple[object, ...], out_norm: Norm | None = None,
                    hub_norm: Norm | None = None) -> torch.Tensor:
    """The general formula for rows routed by slots i [B], over one site's padded tables (`_StaticSite`);
    h, a [B, T, H]. The two products take the blocks of the batch's distinct slots u [U] (gathered, each
    once; j [B] is each row's index in u), or with u None every slot's block in place (j = i); either
    way each row keeps its own columns. (Measured on an H200 and dropped: a block per row, which for a
    width-2048 bottleneck moved 4x the bytes of the all-slots product.)"""
    z, zn, lnz = static_input(h, a, i, coef, ln, lnw, lnb, has_lnb, out_norm, hub_norm)
    H = h.shape[-1]
    if u is not None:
        wd, bd, wu = wd.index_select(0, u), bd.index_select(0, u), wu.index_select(1, u)
    N, R = wd.shape[:2]
    B, T = z.shape[:2]
    d = F.linear(z, wd.reshape(N * R, H), bd.reshape(N * R))  # [B, T, N*R]
    if len(acts) == 1:
        d = acts[0](d)  # type: ignore[operator]
    else:
        ai = act.index_select(0, i)[:, None, None]
        out = acts[0](d)  # type: ignore[operator]
        for k, fn in enumerate(acts[1:], start=1):
            out = torch.where(ai == k, fn(d), out)  # type: ignore[operator]
        d = out
    if N > 1:
        own = (torch.arange(N, device=i.device)[None, :] == j[:, None])[:, None, :, None]  # [B, 1, N, 1]
        d = torch.where(own, d.view(B, T, N, R), 0.0).view(B, T, N * R)
    u_ = F.linear(d, wu.reshape(H, N * R)) + ub.index_select(0, i)[:, None, :]  # [B, T, H]
    return static_output(h, a, i, u_, coef, ln, lnw, lnb, has_lna, out_norm, zn, lnz)


def static_input(h: torch.Tensor, a: torch.Tensor, i: torch.Tensor, coef: torch.Tensor, ln: torch.Tensor,
                 lnw: torch.Tensor, lnb: torch.Tensor, has_lnb: bool, out_norm: Norm | None = None,
                 hub_norm: Norm | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The general formula's adapter input z [B, T, H] (and, where the site is hooked, the normed input zn
    and the rows lnz that take it), before the products."""
    H = h.shape[-1]
    cxa, cxh = coef.index_select(0, i).t()[:2, :, None, None]  # each [B, 1, 1]
    z = a * cxa + h * cxh
    zn = lnz = None
    if out_norm is not None:  # hooked: see BottleneckPlan._apply
        lnz = (cxa == 1) & (cxh == 1)
        zn = hub_norm(z)  # type: ignore[misc]
        z = torch.where(lnz, zn, z)
    if has_lnb:
        lni = ln.index_select(0, i)[:, None, None, :]  # [B, 1, 1, 3]
        lw, lb = lnw.index_select(0, i)[:, :, None, :], lnb.index_select(0, i)[:, :, None, :]  # [B, 2, 1, H]
        z = torch.where(lni[..., 0], F.layer_norm(z, (H,), eps=LN_EPS) * lw[:, 0] + lb[:, 0], z)
    return z, zn, lnz


def static_output(h: torch.Tensor, a: torch.Tensor, i: torch.Tensor, u_: torch.Tensor, coef: torch.Tensor,
                  ln: torch.Tensor, lnw: torch.Tensor, lnb: torch.Tensor, has_lna: bool, out_norm: Norm | None,
                  zn: torch.Tensor | None, lnz: torch.Tensor | None) -> torch.Tensor:
    """The general formula's sub-block output from the up product u_ [B, T, H] (its bias added)."""
    H = h.shape[-1]
    _, _, cra, crh, cfh = coef.index_select(0, i).t()[:, :, None, None]  # each [B, 1, 1]
    r = a * cra + h * crh
    if out_norm is not None:
        r = torch.where(lnz & (cra == 1) & (crh == 1), zn, r)  # type: ignore[operator,arg-type]
    if has_lna:
        lni = ln.index_select(0, i)[:, None, None, :]  # [B, 1, 1, 3]
        lw, lb = lnw.index_select(0, i)[:, :, None, :], lnb.index_select(0, i)[:, :, None, :]  # [B, 2, 1, H]
        m1, m2 = lni[..., 1], lni[..., 2]
        x = F.layer_norm(torch.where(m2, u_ + r, u_), (H,), eps=LN_EPS) * lw[:, 1] + lb[:, 1]
        core = torch.where(m2, x, torch.where(m1, x + r, u_ + r))
    else:
        core = u_ + r
    return core + h * cfh if out_norm is None else h + out_norm(core)


class BottleneckStaticPlan(MethodPlan):
    """The general formula of the module docstring for any slot mix, every per-row weight chosen by the
    routing buffers inside the hook. The products read the blocks of the batch's distinct slots (gathered)
    or every slot's block in place, whichever moves fewer bytes for the number of distinct slots the graph
    was captured for (`Routing.distinct`), as the eager plan reads only the batch's adapters."""

    def __init__(self, sites: dict[tuple[int, Location], _StaticSite], acts: tuple[object, ...],
                 routing: Routing, fn: Callable[..., torch.Tensor],
                 norms: Callable[[int, Location], tuple[Norm | None, Norm | None]],
                 segmented: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None = None) -> None:
        self.sites, self.acts, self.routing, self.fn, self.norms = sites, acts, routing, fn, norms
        self.segmented = segmented  # (input, the segmented products, output), where the kernels take every activation

    def residual_rows(self, layer: int, loc: Location) -> torch.Tensor:
        return self.sites[(layer, loc)].has.index_select(0, self.routing.slots)[:, None, None]

    def residual(self, layer: int, loc: Location, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        st = self.sites.get((layer, loc))
        if st is None:
            return None
        r = self.routing
        out_norm, hub_norm = self.norms(layer, loc)
        if self.segmented is not None and h.shape[1] == 1 and r.order is not None and r.starts is not None:
            inp, products, out = self.segmented  # decode: the products by the segmented kernels
            z, zn, lnz = inp(h, a, r.slots, st.coef, st.ln, st.lnw, st.lnb, st.has_lnb, out_norm, hub_norm)
            u_ = products(z[:, 0].contiguous(), st.wd, st.bd, st.wu, st.ub, st.width, st.kact, r.uniq, r.starts,
                          r.order)
            return out(h, a, r.slots, u_[:, None], st.coef, st.ln, st.lnw, st.lnb, st.has_lna, out_norm, zn, lnz)
        u, j = (r.uniq, r.local) if r.distinct(st.wd.shape[0]) else (None, r.slots)
        return self.fn(h, a, r.slots, u, j, st.wd, st.bd, st.wu, st.ub, st.coef, st.act, st.ln, st.lnw, st.lnb,
                       st.has_lnb, st.has_lna, self.acts, out_norm, hub_norm)


class BottleneckMethod(AdapterMethod):
    name = NAME
    # Graph hooks of decode steps through the segmented kernels (server/kernels/segments.py; on CUDA, or in
    # Triton's interpreter elsewhere), where every activation of the layout is one they compute. Off by
    # default: not yet measured on a GPU (LoRA's are, lora.py).
    segment_kernels = False

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        super().__init__(ctx, timer)
        self.sites: dict[tuple[int, Location], dict[int, _Block]] = {}
        self.options: dict[int, BottleneckOptions] = {}
        # graph replay only: built on the first static plan, then kept in step with writes
        self.static = StaticLayout[tuple[int, Location], _StaticSite](self)
        self._act_names: list[str] = []
        self._acts: dict[tuple[str, ...], tuple[object, ...]] = {}
        self._residual = Compiled(static_residual, ctx.compile)
        self._segmented: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None = None
        if self.segment_kernels:
            from ...kernels import segments

            if segments.available():
                self._segmented = (Compiled(static_input, ctx.compile), segments.bottleneck,
                                   Compiled(static_output, ctx.compile))
            else:
                log.warning("segmented bottleneck kernels unavailable: %s", segments.ERROR)
        native = ctx.native and ctx.device.type == "cpu" and ctx.dtype == torch.bfloat16
        self._kernel = kernels.load("bottleneck_rows", BOTTLENECK_ROWS) if native else None

    def write(self, slot: int, payload: MethodWeights) -> None:
        w = payload
        assert isinstance(w, BottleneckWeights)
        self.clear(slot)
        dev, dt = self.ctx.device, self.ctx.dtype

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=dev, dtype=dt).contiguous()

        for b in w.blocks:
            self.sites.setdefault((b.layer, b.location), {})[slot] = self._block(b, put)
        self.options[slot] = w.options
        self.static.written(slot)

    @staticmethod
    def _block(b: BottleneckBlock, put) -> _Block:  # noqa: ANN001
        pair = lambda p: None if p is None else (put(p[0]), put(p[1]))  # noqa: E731
        s = b.scale  # [H]: per output channel, so s * (W d + b) = (s W) d + s b
        # s * W_up [H, r] as the transposed view of an [r, H] block: the native kernel reads its rows
        return _Block(put(b.down_w), put(b.down_b), put((b.up_w * s[:, None]).t()).t(), put(b.up_b * s),
                      pair(b.ln_before), pair(b.ln_after))

    def clear(self, slot: int) -> None:
        had = self.options.pop(slot, None) is not None
        for blocks in self.sites.values():
            blocks.pop(slot, None)
        if had:
            self.static.cleared(slot)

    # -- graph replay: the static layout's sites are the residual adds (layout.py) ----------------
    def fits_static(self, slot: int, tables: dict[tuple[int, Location], _StaticSite]) -> bool:
        """A wider block, a new site, a new activation or layer norm does not fit."""
        opts = self.options.get(slot)
        if opts is not None and opts.non_linearity not in self._act_names:
            return False
        return all(slot not in blocks or (key in tables and tables[key].fits(blocks[slot]))
                   for key, blocks in self.sites.items())

    def put_static(self, key: tuple[int, Location], table: _StaticSite, slot: int) -> None:
        opts = self.options.get(slot)
        table.put(slot, self.sites.get(key, {}).get(slot), opts,
                  self._act_names.index(opts.non_linearity) if opts is not None else 0)

    def widths(self, key: tuple[int, Location]) -> list[int]:
        return [b.down_w.shape[0] for b in self.sites.get(key, {}).values()]

    def build_static(self) -> dict[tuple[int, Location], _StaticSite]:
        S, H, dev, dt = self.ctx.num_slots, self.ctx.base.hidden_size, self.ctx.device, self.ctx.dtype
        self._act_names = sorted({o.non_linearity for o in self.options.values()}) or ["relu"]
        out = {}
        for key, blocks in self.sites.items():
            if not blocks:
                continue
            R = max(b.down_w.shape[0] for b in blocks.values())
            st = _StaticSite(S, R, H, any(b.ln_before is not None for b in blocks.values()),
                             any(b.ln_after is not None for b in blocks.values()), dev, dt)
            for slot, b in blocks.items():
                opts = self.options[slot]
                st.put(slot, b, opts, self._act_names.index(opts.non_linearity))
            out[key] = st
        return out

    def uses(self, slots: list[int]) -> bool:
        return any(s in self.options for s in slots)

    def static_plan(self, routing: Routing) -> MethodPlan | None:
        tables = self.static.tables()
        names = tuple(self._act_names)
        if names not in self._acts:  # the same function objects every time: a compiled hook guards on them
            self._acts[names] = tuple(activation(n) for n in names)
        seg = self._segmented if all(n in NATIVE_ACTS for n in names) else None
        return BottleneckStaticPlan(tables, self._acts[names], routing, self._residual, self.norms, seg)

    @property
    def layout_version(self) -> int:
        return self.static.version

    def device_bytes(self) -> int:
        return sum(b.nbytes() for blocks in self.sites.values() for b in blocks.values())

    def slot_bytes(self, payload: MethodWeights) -> int:
        """Its blocks, stored in the model's dtype."""
        return sum(t.numel() for t in payload.tensors()) * self.ctx.dtype.itemsize

    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        if not any(s in self.options for s in slots):
            return None
        sites = {}
        for key, blocks in self.sites.items():
            present = sorted({s for s in slots if s in blocks})
            if present:
                sites[key] = self._site(slots, slot_idx, present, blocks)
        return BottleneckPlan(sites, self.timer, self.ctx.base.hidden_size, self.norms, self._kernel) if sites else None

    def norms(self, layer: int, loc: Location) -> tuple[Norm | None, Norm | None]:
        """(the architecture's norm on this sub-layer's output, the norm AdapterHub hooks in as "original"):
        AdapterHub 1.3.0's interface binds its norm getter late, in a loop over the layers, so every layer's
        bottleneck reads the LAST layer's norm of that kind (adapters/methods/bottleneck.py, init_bottleneck).
        That is what it trains and computes, so it is what we serve. (None, None) without output norms."""
        own = self.ctx.out_norms.get((layer, loc))
        return (None, None) if own is None else (own, self.ctx.out_norms[(self.ctx.base.num_layers - 1, loc)])

    def _site(self, slots: list[int], slot_idx: torch.Tensor, present: list[int], blocks: dict[int, _Block]) -> _SitePlan:
        dev, dt, H, B = self.ctx.device, self.ctx.dtype, self.ctx.base.hidden_size, len(slots)
        blks = [blocks[s] for s in present]
        # 1. the batch's adapters side by side along the bottleneck axis, and who owns each column
        wd = torch.cat([b.down_w for b in blks])  # [R, H]
        bd = torch.cat([b.down_b for b in blks])  # [R]
        wu_t = torch.cat([b.up_w for b in blks], dim=1)  # [H, R]
        owner = torch.cat([torch.full((b.down_w.shape[0],), s, device=dev) for s, b in zip(present, blks, strict=True)])
        uniform = len(present) == 1 and all(x == present[0] for x in slots)
        colmask = None if uniform else (slot_idx[:, None] == owner[None, :])[:, None, :]  # [B, 1, R]
        # 2. activations: one function for the usual case, else one column mask per function
        by_act: dict[str, list[int]] = {}
        for s in present:
            by_act.setdefault(self.options[s].non_linearity, []).append(s)
        if len(by_act) == 1:
            acts: list[tuple[object, torch.Tensor | None]] = [(activation(next(iter(by_act))), None)]
        else:
            acts = [(activation(n), torch.isin(owner, torch.tensor(ss, device=dev))) for n, ss in by_act.items()]
        # 3. per-row vectors and coefficients; rows without an adapter here keep the identity defaults
        ub = torch.zeros(B, 1, H, device=dev, dtype=dt)
        coef = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=dev, dtype=dt).view(5, 1, 1, 1).repeat(1, B, 1, 1)
        lnb_m = torch.zeros(B, 1, 1, dtype=torch.bool, device=dev)
        lnb_w, lnb_b = torch.ones(B, 1, H, device=dev, dtype=dt), torch.zeros(B, 1, H, device=dev, dtype=dt)
        lna_m1, lna_m2 = lnb_m.clone(), lnb_m.clone()
        lna_w, lna_b = lnb_w.clone(), lnb_b.clone()
        any_lnb = any_lna = False
        inputs, outs = set(), set()
        for s, b in zip(present, blks, strict=True):
            rows = [i for i, x in enumerate(slots) if x == s]
            ub[rows, 0] = b.up_b
            *c, mode = coefficients(self.options[s])
            coef[:, rows] = torch.tensor(c, device=dev, dtype=dt).view(5, 1, 1, 1)
            inputs.add((c[0], c[1]))
            outs.add((c[2], c[3], c[4]))
            if b.ln_before is not None:
                any_lnb = True
                lnb_m[rows], lnb_w[rows, 0], lnb_b[rows, 0] = True, b.ln_before[0], b.ln_before[1]
            if b.ln_after is not None:
                any_lna = True
                (lna_m2 if mode == 2 else lna_m1)[rows] = True
                lna_w[rows, 0], lna_b[rows, 0] = b.ln_after[0], b.ln_after[1]
        z_from = {(1.0, 1.0): "a+h", (1.0, 0.0): "a", (0.0, 1.0): "h"}.get(next(iter(inputs))) if len(inputs) == 1 else None
        plain_out = outs == {(1.0, 0.0, 1.0)} and not any_lna  # every row: (u + a) + h, as rows without one
        native = None
        names = [self.options[s].non_linearity for s in present]
        if self._kernel is not None and plain_out and not any_lnb and all(n in NATIVE_ACTS for n in names):
            zs = [{(1.0, 1.0): 0, (1.0, 0.0): 1, (0.0, 1.0): 2}[coefficients(self.options[s])[:2]] for s in present]
            loc = torch.tensor([present.index(s) if s in present else -1 for s in slots], dtype=torch.long)
            native = _NativeSite(loc, blks, zs, [NATIVE_ACTS[n] for n in names])
        return _SitePlan(
            wd, bd, wu_t, colmask, acts, blks[0].up_b if uniform else ub, coef, z_from, plain_out,
            (lnb_m, lnb_w, lnb_b) if any_lnb else None,
            (lna_m1, lna_m2, lna_w, lna_b) if any_lna else None,
            torch.isin(slot_idx, torch.tensor(present, device=dev))[:, None, None],
            native,
        )


RECORD = MethodRecord(NAME, BottleneckMethod, BottleneckWeights, synth=synth_bottleneck,
                      kinds=(*BN_PRESETS, "compacter"), demo=("seq_bn", 2))
