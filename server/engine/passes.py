"""Each forward pass: its input tensors, built from the rows' plain state, and the pass itself.

Three kinds: a prefill of newly admitted rows (right-padded, in the rows after the running ones), a
chunk of a long prompt (in the row after the running ones), and a decode step of the running rows,
replayed from a CUDA graph where one is captured, else eager. The engine decides which rows, and
`rows.Rows` where they sit; this module only turns them into tensors and logits [rows, V] float32.
"""

from __future__ import annotations

import torch

from ..adapters.slots import AdapterSlots
from .graphs import DecodeGraphs
from .model_runner import ModelRunner
from .rows import Rows
from .sequence import Seq
from .types import TopLogprobs

PromptScore = tuple[float, TopLogprobs]  # a prompt token's logprob and its most likely alternatives


def prompt_scores(full: torch.Tensor, prompt: tuple[int, ...], first: int, k: int) -> list[PromptScore]:
    """From the logits at prompt positions first.. (`full` [T, V]), each following prompt token's logprob and
    the k most likely tokens there: scores of tokens first+1 .. first+T (those the prompt has)."""
    n = min(full.shape[0], len(prompt) - 1 - first)
    if n <= 0:
        return []
    lsm = torch.log_softmax(full[:n].float(), dim=-1)
    nxt = torch.tensor(prompt[first + 1 : first + 1 + n], device=full.device)
    lps = lsm.gather(1, nxt[:, None])[:, 0].tolist()
    if not k:
        return [(lp, ()) for lp in lps]
    vals, ids = torch.topk(lsm, k, dim=-1)
    return [(lp, tuple(zip(i, v, strict=True))) for lp, i, v in zip(lps, ids.tolist(), vals.tolist(), strict=True)]


class Passes:
    def __init__(self, runner: ModelRunner, slots: AdapterSlots, graphs: DecodeGraphs | None) -> None:
        self.runner, self.slots, self.graphs = runner, slots, graphs
        self.device = runner.device

    def _fit(self, rows: Rows, extra: int, needed: int) -> None:
        """Make the cache hold the rows in use and `extra` more, reaching `needed` positions (at least what
        the running rows reach), keeping what the rows in use hold."""
        used = rows.used()
        self.runner.cache.fit(used[0] + extra, max(needed, rows.reach()), *used)

    def _prefixes(self, seqs: list[Seq], row0: int) -> list[int]:
        """Copy each new row's adapter prefix (prompt and prefix tuning) into its cache row; the rotary
        shift of each row."""
        cache, shifts = self.runner.cache, []
        for i, s in enumerate(seqs):
            p = self.slots.prefix(s.slot)
            if p is not None and s.prompt_done == 0:
                cache.write_prefix(row0 + i, p.keys, p.values)
            shifts.append(0 if p is None else p.rope_shift)
        return shifts

    def _shifts(self, seqs: list[Seq]) -> list[int]:
        return [p.rope_shift if (p := self.slots.prefix(s.slot)) is not None else 0 for s in seqs]

    def prefill(self, seqs: list[Seq], rows: Rows) -> tuple[torch.Tensor, dict[int, list[PromptScore]]]:
        """The whole prompts of new rows, in cache rows rows.next_row.. on, each after its adapter's prefix.
        Rows with the same prompt, adapter slot and prefix (the `n` choices of one request) are computed
        once: the first of them is run, and its cache row copied to the others."""
        B, row0 = len(seqs), rows.next_row
        first: dict[tuple[tuple[int, ...], int, int], int] = {}
        lead = [first.setdefault((s.req.prompt_ids, s.slot, s.prefix_len), i) for i, s in enumerate(seqs)]
        uniq = [i for i in range(B) if lead[i] == i]
        at = {i: k for k, i in enumerate(uniq)}  # computed into rows row0 + k; each row i must end in row0 + i
        want: dict[int, int] = {}  # a leader whose prompt is scored -> the most alternatives any of its rows asks for
        for j, s in enumerate(seqs):
            if (k := s.req.params.prompt_logprobs) is not None:
                want[lead[j]] = max(want.get(lead[j], 0), k)
        logits, full = self._prefill([seqs[i] for i in uniq], rows, B, [at[i] for i in want])
        scores: dict[int, list[PromptScore]] = {}
        for r, (i, k) in enumerate(want.items()):
            got = prompt_scores(full[r, : seqs[i].prompt_len], seqs[i].req.prompt_ids, 0, k)  # type: ignore[index]
            scores.update({j: got for j, s in enumerate(seqs) if lead[j] == i and s.req.params.prompt_logprobs is not None})
        if len(uniq) == B:
            return logits, scores
        for i in reversed(range(B)):  # every source row lies at or before its destination: copy from the end
            src, s = at[lead[i]], seqs[i]
            if src != i:
                self.runner.cache.move_row(row0 + src, row0 + i, s.prefix_len + s.prompt_len)
        return logits[torch.tensor([at[lead[i]] for i in range(B)], device=logits.device)], scores

    def _prefill(self, seqs: list[Seq], rows: Rows, new_rows: int, scored: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`seqs` in rows rows.next_row.. on, with room made for `new_rows` new rows; every position's logits
        of the rows `scored` too."""
        B, dev, row0 = len(seqs), self.device, rows.next_row
        lens = [s.prompt_len for s in seqs]
        starts = [s.prefix_len for s in seqs]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)  # [B, T] right-padded
        for i, s in enumerate(seqs):
            ids[i, : lens[i]] = torch.tensor(s.req.prompt_ids)
        same = all(a == starts[0] for a in starts)  # else the runner writes only the real tokens
        reach = [starts[0] + T] if same else [a + n for a, n in zip(starts, lens, strict=True)]
        self._fit(rows, new_rows, max(reach))
        shifts = self._prefixes(seqs, row0)
        return self.runner.forward_full(
            ids.to(dev), start=torch.tensor(starts, device=dev), lengths=torch.tensor(lens, device=dev), row0=row0,
            plan=self.slots.plan([s.slot for s in seqs]), kv_len=max(a + n for a, n in zip(starts, lens, strict=True)),
            start0=starts[0] if same else None, rope_shift=torch.tensor(shifts, device=dev) if any(shifts) else None,
            full_rows=scored or None)

    def chunk(self, s: Seq, size: int, rows: Rows) -> tuple[torch.Tensor, dict[int, list[PromptScore]]]:
        """The next `size` prompt tokens of a long prompt, in cache row rows.next_row, after what it holds
        (the first chunk after the adapter's prefix)."""
        done, dev = s.prompt_done, self.device
        c0 = s.prefix_len + done
        self._fit(rows, 0, c0 + size)
        shift = self._prefixes([s], rows.next_row)[0]
        k = s.req.params.prompt_logprobs
        logits, full = self.runner.forward_full(
            torch.tensor([s.req.prompt_ids[done : done + size]], device=dev), start=torch.tensor([c0], device=dev),
            lengths=torch.tensor([size], device=dev), row0=rows.next_row, plan=self.slots.plan([s.slot]),
            kv_len=c0 + size, start0=c0, rope_shift=torch.tensor([shift], device=dev) if shift else None,
            full_rows=None if k is None else [0])
        if k is None or full is None:
            return logits, {}
        return logits, {0: prompt_scores(full[0], s.req.prompt_ids, done, k)}

    def decode(self, seqs: list[Seq], rows: Rows) -> torch.Tensor:
        """One new token for each running row (rows 0..n-1), each at its own position."""
        slots = [s.slot for s in seqs]
        pos = [s.cache_len for s in seqs]
        needed = max(pos) + 1
        shift = self._shifts(seqs)
        if self.graphs is not None and (key := self.graphs.key(slots, needed - 1)) is not None:
            rope = [p + d for p, d in zip(pos, shift, strict=True)] if any(shift) else None
            return self.graphs.run([s.tokens[-1] for s in seqs], pos, slots, key, rope)
        dev = self.device
        self._fit(rows, 0, needed)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # [B, 1]
        return self.runner.forward(ids, start=torch.tensor(pos, device=dev),
                                   lengths=torch.ones(len(seqs), dtype=torch.long, device=dev), row0=0,
                                   plan=self.slots.plan(slots), kv_len=needed,
                                   start0=pos[0] if all(p == pos[0] for p in pos) else None,
                                   rope_shift=torch.tensor(shift, device=dev) if any(shift) else None)
