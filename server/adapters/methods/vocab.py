"""An adapter's own vocabulary at the two ends of the model: trained input embeddings and LM heads, per row.

What PEFT saves beyond the decoder layers (docs/adapters.md §10): a trained copy of the embedding or of the
LM head (`modules_to_save`), trained rows of them (trainable tokens), LoRA on either, and with tokens
added, a larger vocabulary. The format reader reduces all of these to one `VocabSide` per end: how many
ids it has, then either a table of its own (a trained copy) or the rows it replaces or
adds over the base table, and a LoRA pair on top. It serves beside an adapter's family in the same slot
(LoRA with a trained head), or alone (PEFT's TRAINABLE_TOKENS type, this method's own label).

Per row, in every pass, eager or not:
- embedding: the base module embeds every row once (ids past its table clamped); each adapter with an
  embedding side then gives its rows theirs: its table through the base module's own forward (so a
  scaled embedding, Gemma's, scales it), or its rows where the ids hit them (scaled as the module
  scales), then its LoRA delta, `s * B A[:, id]` (scaled too, as PEFT does), in float32;
- LM head: the bare head runs once, over the rows whose adapters have no table of their own; each
  adapter with a head side then changes its rows' logits: the columns of its rows, its extra columns
  (ids past the base's), its LoRA delta; a table of its own runs over its rows only. The architecture's
  soft-cap follows each, and a row of a smaller vocabulary gets -inf past its own ids, so sampling and
  logprobs see exactly its vocabulary.

Nothing of this is folded into the shared weights while serving; `adapter-server merge` writes it into
a standalone model (export.py). A decode step replayed from a CUDA graph serves these rows too: their
embeddings are made before the replay and their logits after it, the layers in between replayed
(`at_ends`, engine/graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..families import Method
from ..spec import MethodWeights
from ..synth import synth_tokens
from .base import AdapterMethod, MethodPlan, MethodRecord, SlotContext, StepTimer, nbytes

F32 = torch.float32
NAME: Method = "vocab"


@dataclass(frozen=True)
class VocabSide:
    """One end of an adapter's vocabulary (the input embedding, or the LM head), as it differs from the base."""

    size: int  # ids (rows) this end has: the base's, or more (tokens added), or fewer (a vocabulary resized down)
    table: torch.Tensor | None = None  # [size, H]: a table of its own (float32 on the host, the model's dtype in a slot)
    index: torch.Tensor | None = None  # [n] long: the rows it replaces or adds over the base table
    rows: torch.Tensor | None = None  # [n, H] (as `table`)
    lora_A: torch.Tensor | None = None  # embedding: [r, size]; LM head: [r, H] (float32)
    lora_B: torch.Tensor | None = None  # embedding: [H, r]; LM head: [size, r]
    lora_scale: float = 1.0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.table, self.rows, self.lora_A, self.lora_B) if t is not None]


@dataclass(frozen=True)
class VocabWeights(MethodWeights):
    """An adapter's own vocabulary: its embedding and LM head ends (None: the base's), `size` ids at both."""

    size: int
    embed: VocabSide | None = None
    head: VocabSide | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for side in (self.embed, self.head) if side is not None for t in side.tensors()]

    @property
    def exportable(self) -> bool:
        return True

    @property
    def vocab_size(self) -> int:
        return self.size


@dataclass
class _Side:
    """One end of one slot on the device."""

    size: int
    table: torch.Tensor | None
    index: torch.Tensor | None
    rows: torch.Tensor | None
    remap: torch.Tensor | None  # embedding only: [size] long, each id's entry in `rows` or -1
    A: torch.Tensor | None
    sB: torch.Tensor | None  # B with the scaling folded in (float32)

    def nbytes(self) -> int:
        return nbytes([self.table, self.index, self.rows, self.remap, self.A, self.sB])


def _configs(model: torch.nn.Module) -> list[Any]:
    """The model's config and its text model's (a multimodal folder), where the vocabulary is recorded."""
    cfg: Any = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return [cfg] if text is cfg else [cfg, text]


def embed_scale(module: torch.nn.Module) -> torch.Tensor | None:
    """The factor a scaled embedding module multiplies its rows by (Gemma's sqrt(hidden)), as PEFT reads it."""
    s = getattr(module, "embed_scale", None)
    if s is None:
        return None
    return s if isinstance(s, torch.Tensor) else torch.tensor(float(s))


@dataclass(frozen=True)
class _Heads:
    """The LM head's routing for one set of entries (see VocabPlan._groups)."""

    groups: dict[int, tuple[_Side, torch.Tensor, torch.Tensor | None]]  # slot -> (end, entries, rows of the bare logits)
    plain: torch.Tensor | None  # the entries the bare head computes, when not all of them
    any_plain: bool
    bare: tuple[torch.Tensor, torch.Tensor] | None  # entries of no head end, and their rows of the bare logits
    width: int  # the widest vocabulary among the entries


class VocabPlan(MethodPlan):
    """The rows of one batch whose adapters have an end of their own, grouped by slot."""

    def __init__(self, method: VocabMethod, slots: list[int]) -> None:
        self.m, self.slots, self.timer = method, slots, method.timer
        dev = method.ctx.device
        self.embeds = [(side, torch.tensor([i for i, x in enumerate(slots) if x == s], device=dev))
                       for s, side in method.embeds.items() if s in set(slots)]
        # ids past the base table occur only in rows of an adapter with more: clamp them for the base lookup
        self.clamp = any(side.size > method.base_vocab for side, _ in self.embeds)
        self._heads = self._groups(slots)

    def embed(self, ids: torch.Tensor, embedding: torch.nn.Module) -> torch.Tensor | None:
        if not self.embeds:
            return None
        e = embedding(ids.clamp(max=self.m.base_vocab - 1) if self.clamp else ids)  # [B, T, H]
        scale = embed_scale(embedding)
        with self.timer.span(NAME):
            for side, rows in self.embeds:
                e[rows] = self._embed_rows(side, ids[rows], e[rows], embedding, scale)
        return e

    @staticmethod
    def _embed_rows(side: _Side, x: torch.Tensor, base: torch.Tensor, embedding: torch.nn.Module,
                    scale: torch.Tensor | None) -> torch.Tensor:
        """The embeddings [n, T, H] of one adapter's rows' ids x [n, T], whose base embeddings are `base`."""
        if side.table is not None:  # the module's own forward over the adapter's table
            e = torch.func.functional_call(embedding, {"weight": side.table}, (x,))
        elif side.index is not None:
            assert side.remap is not None and side.rows is not None
            at = side.remap[x]  # [n, T]: each id's replaced row, or -1
            new = side.rows[at.clamp(min=0)]  # [n, T, H]
            if scale is not None:
                new = new * scale.to(new.dtype)
            e = torch.where((at >= 0)[..., None], new, base)
        else:
            e = base
        if side.A is not None:  # PEFT's embedding LoRA: (A^T[id] @ B^T) * s, times the module's scale, in float32
            assert side.sB is not None
            d = F.embedding(x, side.A.t()) @ side.sB.t()  # [n, T, H]
            if scale is not None:
                d = d * scale.to(F32)
            e = (e + d).to(e.dtype)
        return e

    def _groups(self, slots: list[int]) -> _Heads | None:
        """How the head runs over entries whose entry n is slot slots[n] (None: no adapter of theirs has a
        head end): each adapter's end with its entries and their rows among the bare head's, the entries
        the bare head computes, those that keep its logits as they are, and the widest vocabulary."""
        heads = self.m.heads
        mine = {s: heads[s] for s in dict.fromkeys(slots) if s in heads}
        if not mine:
            return None
        dev, base = self.m.ctx.device, self.m.base_vocab
        plain = [n for n, s in enumerate(slots) if s not in mine or mine[s].table is None]
        at = {n: k for k, n in enumerate(plain)}  # entry -> its row of the bare head's logits

        def tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=dev)

        groups = {}
        for s, side in mine.items():
            entries = [n for n, x in enumerate(slots) if x == s]
            groups[s] = (side, tensor(entries), None if side.table is not None else tensor([at[n] for n in entries]))
        bare = [n for n in plain if slots[n] not in mine]
        width = max([base] * bool(bare) + [side.size for side in mine.values()])
        return _Heads(groups, tensor(plain) if 0 < len(plain) < len(slots) else None, bool(plain),
                      (tensor(bare), tensor([at[n] for n in bare])) if bare else None, width)

    def logits(self, h: torch.Tensor, rows: list[int] | None, head: Callable[[torch.Tensor], torch.Tensor],
               finish: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        g = self._heads if rows is None else self._groups([self.slots[r] for r in rows])
        if g is None:
            return None
        y = None
        if g.any_plain:  # the bare head, once, over every entry without a table of its own
            y = head(h if g.plain is None else h[g.plain])
        with self.timer.span(NAME):
            own = {s: self._head_rows(side, h[idx], None if local is None else y[local])  # type: ignore[index]
                   for s, (side, idx, local) in g.groups.items()}
        if y is not None and g.plain is None and g.width == y.shape[-1]:
            out = finish(y)  # every entry's bare logits; its adapter's entries are overwritten below
        else:
            out = h.new_full((*h.shape[:-1], g.width), float("-inf"), dtype=F32)
            if g.bare is not None:
                out[g.bare[0], ..., : self.m.base_vocab] = finish(y[g.bare[1]])  # type: ignore[index]
        for s, (side, idx, _) in g.groups.items():
            out[idx, ..., : side.size] = finish(own[s])
            if side.size < g.width:
                out[idx, ..., side.size :] = float("-inf")
        return out

    def _head_rows(self, side: _Side, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The logits [n, ..., size] of one adapter's entries (hidden states h), whose bare-head logits are y
        (None when it has a table of its own), in the model's dtype, before the soft-cap."""
        base = self.m.base_vocab
        if side.table is not None:
            bias = getattr(self.m.ctx.head, "bias", None)
            z = F.linear(h, side.table, bias)
        else:
            assert y is not None
            z = y[..., : side.size] if side.size <= base else F.pad(y, (0, side.size - base))
            if side.index is not None:  # the columns of its own rows, as PEFT's trainable tokens compute them
                assert side.rows is not None
                z = z.index_copy(-1, side.index, F.linear(h, side.rows))
        if side.A is not None:  # PEFT's LoRA on the head: in float32, cast back
            assert side.sB is not None
            z = (z.to(F32) + (h.to(F32) @ side.A.t()) @ side.sB.t()).to(z.dtype)
        return z


class VocabMethod(AdapterMethod):
    name = NAME
    at_ends = True

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        super().__init__(ctx, timer)
        self.embeds: dict[int, _Side] = {}
        self.heads: dict[int, _Side] = {}
        self.base_vocab = ctx.base.vocab_size

    def _side(self, v: VocabSide, embed: bool) -> _Side:
        dev, dt = self.ctx.device, self.ctx.dtype

        def put(t: torch.Tensor | None, dtype: torch.dtype = dt) -> torch.Tensor | None:
            return None if t is None else t.to(device=dev, dtype=dtype).contiguous()

        module = self.ctx.embedding if embed else self.ctx.head
        if self._as_table(v, embed):
            # most rows trained: a table of its own computes once, where rows over the base would compute twice
            assert module is not None
            w: torch.Tensor = module.weight.detach()  # type: ignore[operator]
            table = torch.cat([w, w.new_zeros(max(0, v.size - w.shape[0]), w.shape[1])])[: v.size].clone()
            table[v.index.to(dev)] = v.rows.to(device=dev, dtype=table.dtype)  # type: ignore[union-attr]
            v = VocabSide(v.size, table, None, None, v.lora_A, v.lora_B, v.lora_scale)
        index = put(v.index, torch.long)
        remap = None
        if embed and index is not None:
            remap = torch.full((v.size,), -1, dtype=torch.long, device=dev)
            remap[index] = torch.arange(index.shape[0], device=dev)
        sB = None if v.lora_B is None else put(v.lora_B * v.lora_scale, F32)
        return _Side(v.size, put(v.table), index, put(v.rows), remap, put(v.lora_A, F32), sB)

    def _as_table(self, v: VocabSide, embed: bool) -> bool:
        """Whether an end of trained rows is kept as a table of its own: most of its rows are trained, and the
        base's are plain weights to copy the rest from (not a quantized head's)."""
        module = self.ctx.embedding if embed else self.ctx.head
        return (v.index is not None and v.table is None and 2 * len(v.index) > v.size and module is not None
                and not getattr(module, "quantized", False))

    def write(self, slot: int, payload: MethodWeights) -> None:
        assert isinstance(payload, VocabWeights)
        self.clear(slot)
        if payload.embed is not None:
            self.embeds[slot] = self._side(payload.embed, embed=True)
        if payload.head is not None:
            self.heads[slot] = self._side(payload.head, embed=False)

    def clear(self, slot: int) -> None:
        self.embeds.pop(slot, None)
        self.heads.pop(slot, None)

    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        return VocabPlan(self, slots) if self.uses(slots) else None

    def uses(self, slots: list[int]) -> bool:
        return any(s in self.embeds or s in self.heads for s in slots)

    def device_bytes(self) -> int:
        return sum(s.nbytes() for s in (*self.embeds.values(), *self.heads.values()))

    @torch.no_grad()
    def export(self, slot: int, model: torch.nn.Module) -> None:
        """Both ends of `slot` as tables of the model's own: their rows and LoRA folded in, the vocabulary
        resized to the adapter's, and the head untied from the embedding where the two now differ."""
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
        E = self._table(self.embeds.get(slot), emb.weight, embed=True)
        W = self._table(self.heads.get(slot), head.weight, embed=False)
        tied = head.weight is emb.weight
        emb.weight = torch.nn.Parameter(E, requires_grad=False)
        emb.num_embeddings = E.shape[0]
        if tied and torch.equal(E, W):
            head.weight = emb.weight
        else:
            head.weight = torch.nn.Parameter(W, requires_grad=False)
            for cfg in {id(c): c for c in _configs(model)}.values():
                cfg.tie_word_embeddings = False  # saved, and loaded again, as two tables
        head.out_features = W.shape[0]
        for cfg in _configs(model):
            if hasattr(cfg, "vocab_size"):
                cfg.vocab_size = E.shape[0]

    @staticmethod
    def _table(side: _Side | None, base: torch.Tensor, embed: bool) -> torch.Tensor:
        """One end's whole table [size, H]: its own, or the base's with its rows; plus its LoRA's s B A."""
        if side is None:
            return base.detach().clone()
        V0 = base.shape[0]
        if side.table is not None:
            t = side.table.clone()
        elif side.size <= V0:
            t = base.detach()[: side.size].clone()
        else:
            t = torch.cat([base.detach(), base.new_zeros(side.size - V0, base.shape[1])])
        if side.index is not None:
            assert side.rows is not None
            t[side.index] = side.rows
        if side.A is not None:
            assert side.sB is not None
            delta = (side.sB @ side.A).t() if embed else side.sB @ side.A  # [size, H]
            t = (t.to(F32) + delta).to(t.dtype)
        return t

    def slot_bytes(self, payload: MethodWeights) -> int:
        """Tables and rows in the model's dtype, LoRA in float32, row indices (and the embedding's id map) in int64."""
        assert isinstance(payload, VocabWeights)
        total = 0
        for side, embed in ((payload.embed, True), (payload.head, False)):
            if side is None:
                continue
            if self._as_table(side, embed):
                total += side.size * self.ctx.base.hidden_size * self.ctx.dtype.itemsize
                total += sum(t.numel() for t in (side.lora_A, side.lora_B) if t is not None) * 4
                continue
            total += sum(t.numel() for t in (side.table, side.rows) if t is not None) * self.ctx.dtype.itemsize
            total += sum(t.numel() for t in (side.lora_A, side.lora_B) if t is not None) * 4
            if side.index is not None:
                total += side.index.numel() * 8 + (side.size * 8 if embed else 0)
        return total


RECORD = MethodRecord(NAME, VocabMethod, VocabWeights, synth=synth_tokens, kinds=("tokens", "head"), sized=True)
