"""Prompt tuning, P-tuning and prefix tuning: key/value entries a row's KV cache holds before its prompt.

All three reduce to the same thing at serving time (docs/adapters.md §6):
- prefix tuning saves, for N virtual positions, each layer's keys and values as they go into the
  cache (post-rotary: they are never rotated again);
- prompt tuning and P-tuning save N input embeddings placed before the prompt. Attention is causal
  and the virtual tokens come first, so their keys and values do not depend on the request: they are
  computed once, when the slot is written, by the bare model at positions 0..N-1, and then served
  exactly like a prefix.

A row of such an adapter starts with its N entries copied into cache positions 0..N-1 of every
layer; its real token t sits at cache position N + t and takes rotary position N + t + rope_shift
(0 for PEFT, which shifts real positions by N; -N for AdapterHub, which does not). Nothing acts at
the Linear or residual hooks, so these rows share every pass, eager or replayed, with any others,
and a finished row frees its prefix with its cache row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..families import Method
from ..spec import MethodWeights
from ..synth import synth_prompt
from .base import AdapterMethod, KVPrefix, MethodPlan, MethodRecord, SlotContext, StepTimer, nbytes


@dataclass(frozen=True)
class PrefixWeights(MethodWeights):
    """Prefix tuning: each layer's keys and values for N virtual positions, [L, n_kv, N, d] each."""

    keys: torch.Tensor
    values: torch.Tensor
    rope_shift: int = 0

    @property
    def virtual_tokens(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


@dataclass(frozen=True)
class PromptWeights(MethodWeights):
    """Prompt tuning and P-tuning: N input embeddings [N, H] placed before the prompt."""

    embeddings: torch.Tensor

    @property
    def virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings]


Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # embeddings [N, H] -> K, V [L, n_kv, N, d]


class PrefixMethod(AdapterMethod):
    name: Method = "prefix"

    def __init__(self, ctx: SlotContext, timer: StepTimer) -> None:
        super().__init__(ctx, timer)
        self.slots: dict[int, KVPrefix] = {}

    def _entries(self, payload: MethodWeights) -> KVPrefix:
        w = payload
        assert isinstance(w, PrefixWeights)
        dev, dt = self.ctx.device, self.ctx.dtype
        return KVPrefix(w.keys.to(dev, dt), w.values.to(dev, dt), w.rope_shift)

    def write(self, slot: int, payload: MethodWeights) -> None:
        self.slots[slot] = self._entries(payload)

    def clear(self, slot: int) -> None:
        self.slots.pop(slot, None)

    def plan(self, slots: list[int], slot_idx: torch.Tensor) -> MethodPlan | None:
        return None  # nothing at the hooks: the entries are in the rows' caches

    def prefix(self, slot: int) -> KVPrefix | None:
        return self.slots.get(slot)

    def device_bytes(self) -> int:
        return nbytes(t for p in self.slots.values() for t in (p.keys, p.values))

    def slot_bytes(self, payload: MethodWeights) -> int:
        """Keys and values [L, n_kv, N, d] each, in the cache's dtype."""
        b = self.ctx.base
        return 2 * b.num_layers * b.num_kv_heads * payload.virtual_tokens * b.head_dim * self.ctx.dtype.itemsize


class PromptMethod(PrefixMethod):
    name: Method = "prompt"

    def _entries(self, payload: MethodWeights) -> KVPrefix:
        w = payload
        assert isinstance(w, PromptWeights)
        if self.ctx.encode is None:
            raise RuntimeError("prompt tuning needs the model runner's prefix encoder in SlotContext")
        k, v = self.ctx.encode(w.embeddings.to(self.ctx.device, self.ctx.dtype))
        return KVPrefix(k, v, 0)


PREFIX_RECORD = MethodRecord(PrefixMethod.name, PrefixMethod, PrefixWeights, synth=synth_prompt, kinds=("prefix",),
                             sized=True)
PROMPT_RECORD = MethodRecord(PromptMethod.name, PromptMethod, PromptWeights, synth=synth_prompt, kinds=("prompt",),
                             sized=True)
