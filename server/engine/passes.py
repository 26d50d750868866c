"""Each forward pass: its input tensors, built from the rows' plain state, and the pass itself.

Three kinds: a prefill of newly admitted rows (right-padded, in the rows after the running ones), a
chunk of a long prompt (in the row after the running ones), and a decode step of the running rows,
replayed from a CUDA graph where one is captured, else eager. The engine decides which rows; this
module only turns them into tensors and logits [rows, V] float32.
"""

from __future__ import annotations

import torch

from ..adapters.slots import AdapterSlots
from .graphs import DecodeGraphs
from .model_runner import ModelRunner
from .sequence import Seq


class Passes:
    def __init__(self, runner: ModelRunner, slots: AdapterSlots, graphs: DecodeGraphs | None) -> None:
        self.runner, self.slots, self.graphs = runner, slots, graphs
        self.device = runner.device

    def _fit(self, rows: int, needed: int, used: tuple[int, int]) -> None:
        """Make the cache hold `rows` rows reaching `needed` positions, keeping the `used` (rows, length)."""
        self.runner.cache.fit(rows, needed, *used)

    def prefill(self, seqs: list[Seq], running: list[Seq], used: tuple[int, int]) -> torch.Tensor:
        """The whole prompts of new rows, in cache rows len(running).. on."""
        B, dev = len(seqs), self.device
        lens = [s.prompt_len for s in seqs]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)  # [B, T] right-padded
        for i, s in enumerate(seqs):
            ids[i, : lens[i]] = torch.tensor(s.req.prompt_ids)
        self._fit(used[0] + B, max([T] + [s.cache_len + 1 for s in running]), used)
        return self.runner.forward(ids.to(dev), torch.zeros(B, dtype=torch.long, device=dev),
                                   torch.tensor(lens, device=dev), len(running), self.slots.plan([s.slot for s in seqs]),
                                   kv_len=T, start0=0)

    def chunk(self, s: Seq, size: int, running: list[Seq], used: tuple[int, int]) -> torch.Tensor:
        """The next `size` prompt tokens of a long prompt, in cache row len(running), after what it holds."""
        c0, dev = s.cache_len, self.device
        self._fit(used[0], max([c0 + size] + [r.cache_len + 1 for r in running]), used)
        return self.runner.forward(torch.tensor([s.req.prompt_ids[c0 : c0 + size]], device=dev),
                                   torch.tensor([c0], device=dev), torch.tensor([size], device=dev), len(running),
                                   self.slots.plan([s.slot]), kv_len=c0 + size, start0=c0)

    def decode(self, seqs: list[Seq], used: tuple[int, int]) -> torch.Tensor:
        """One new token for each running row (rows 0..n-1), each at its own position."""
        slots = [s.slot for s in seqs]
        pos = [s.cache_len for s in seqs]
        needed = max(pos) + 1
        if self.graphs is not None and (key := self.graphs.key(slots, needed - 1)) is not None:
            return self.graphs.run([s.tokens[-1] for s in seqs], pos, slots, key)
        dev = self.device
        self._fit(used[0], needed, used)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # [B, 1]
        return self.runner.forward(ids, torch.tensor(pos, device=dev), torch.ones(len(seqs), dtype=torch.long, device=dev),
                                   0, self.slots.plan(slots), kv_len=needed,
                                   start0=pos[0] if all(p == pos[0] for p in pos) else None)
