"""Each forward pass: its input tensors, built from the rows' plain state, and the pass itself.

Three kinds: a prefill of newly admitted rows (right-padded, each from what its pages already hold), a
chunk of a long prompt, and a decode step of the running rows, replayed from a CUDA graph where one is
captured, else eager. The engine decides which rows, and `paging.Paging` which pages they hold; this
module only turns them into tensors and logits [rows, V] float32.
"""

from __future__ import annotations

import torch

from ..adapters.slots import AdapterSlots
from .graphs import DecodeGraphs
from .model_runner import ModelRunner
from .paging import Paging
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
    def __init__(self, runner: ModelRunner, slots: AdapterSlots, graphs: DecodeGraphs | None, paging: Paging) -> None:
        self.runner, self.slots, self.graphs, self.paging = runner, slots, graphs, paging
        self.device = runner.device

    def _prefixes(self, seqs: list[Seq]) -> list[int]:
        """Write each row's adapter prefix (prompt and prefix tuning) into its pages, where the prefix cache
        did not hold it already; the rotary shift of each row."""
        shifts = []
        for s in seqs:
            p = self.slots.prefix(s.slot)
            if p is not None and s.cache_len < s.prefix_len:
                c = s.cache_len
                self.runner.cache.write_positions(self.paging.table(s), c, p.keys[:, :, c:], p.values[:, :, c:])
            shifts.append(0 if p is None else p.rope_shift)
        return shifts

    def _shifts(self, seqs: list[Seq]) -> list[int]:
        return [p.rope_shift if (p := self.slots.prefix(s.slot)) is not None else 0 for s in seqs]

    def prefill(self, seqs: list[Seq], lead: list[int]) -> tuple[torch.Tensor, dict[int, list[PromptScore]]]:
        """What each new row's pages do not hold yet of its context, after its adapter's prefix. Only the
        rows that lead themselves (`leaders`) are run; the others, the `n` choices of one request, take
        their leader's logits here and its pages after (paging.fork)."""
        B = len(seqs)
        uniq = [i for i in range(B) if lead[i] == i]
        at = {i: k for k, i in enumerate(uniq)}  # leader i is row k of the pass
        want: dict[int, int] = {}  # a leader whose prompt is scored -> the most alternatives any of its rows asks for
        for j, s in enumerate(seqs):
            if (k := s.req.params.prompt_logprobs) is not None and not s.resume:
                want[lead[j]] = max(want.get(lead[j], 0), k)
        logits, full = self._prefill([seqs[i] for i in uniq], [at[i] for i in want])
        scores: dict[int, list[PromptScore]] = {}
        for r, (i, k) in enumerate(want.items()):
            got = prompt_scores(full[r, : seqs[i].prompt_len], seqs[i].req.prompt_ids, 0, k)  # type: ignore[index]
            scores.update({j: got for j, s in enumerate(seqs)
                           if lead[j] == i and s.req.params.prompt_logprobs is not None and not s.resume})
        if len(uniq) == B:
            return logits, scores
        return logits[torch.tensor([at[lead[i]] for i in range(B)], device=logits.device)], scores

    def leaders(self, seqs: list[Seq]) -> list[int]:
        """For each row, the row whose pass computed it (itself, or the first with its very context)."""
        first: dict[tuple[tuple[int, ...], int, int, int], int] = {}
        return [first.setdefault((s.fill_ids, s.slot, s.prefix_len, s.cache_len), i) for i, s in enumerate(seqs)]

    def _prefill(self, seqs: list[Seq], scored: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`seqs` from their cached start to their whole context; every position's logits of the rows
        `scored` too (their whole prompt: a row whose prompt is scored looked nothing up)."""
        B, dev = len(seqs), self.device
        starts = [max(s.cache_len, s.prefix_len) for s in seqs]
        lens = [s.context_len - a for s, a in zip(seqs, starts, strict=True)]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)  # [B, T] right-padded
        for i, s in enumerate(seqs):
            ids[i, : lens[i]] = torch.tensor(s.fill_ids[starts[i] - s.prefix_len :])
        kv_len = max(a + n for a, n in zip(starts, lens, strict=True))
        shifts = self._prefixes(seqs)
        # rows of unequal lengths run as their real tokens only (the runner's `_packed`): each token a row
        tokens = None if sum(lens) == B * T else \
            self.slots.plan([s.slot for s, n in zip(seqs, lens, strict=True) for _ in range(n)], cached=False)
        return self.runner.forward_full(
            ids.to(dev), start=torch.tensor(starts, device=dev), lengths=torch.tensor(lens, device=dev),
            plan=self.slots.plan([s.slot for s in seqs]), kv_len=kv_len,
            rope_shift=torch.tensor(shifts, device=dev) if any(shifts) else None,
            full_rows=scored or None, tables=self.paging.tables(seqs, kv_len), token_plan=tokens)

    def chunk(self, s: Seq, size: int) -> tuple[torch.Tensor, dict[int, list[PromptScore]]]:
        """The next `size` tokens of a long context, after what its pages hold (the first chunk after the
        adapter's prefix)."""
        dev = self.device
        c0 = max(s.cache_len, s.prefix_len)
        done = c0 - s.prefix_len
        shift = self._prefixes([s])[0]
        k = None if s.resume else s.req.params.prompt_logprobs
        logits, full = self.runner.forward_full(
            torch.tensor([s.fill_ids[done : done + size]], device=dev), start=torch.tensor([c0], device=dev),
            lengths=torch.tensor([size], device=dev), plan=self.slots.plan([s.slot]), kv_len=c0 + size,
            rope_shift=torch.tensor([shift], device=dev) if shift else None, full_rows=None if k is None else [0],
            tables=self.paging.tables([s], c0 + size))
        if k is None or full is None:
            return logits, {}
        return logits, {0: prompt_scores(full[0], s.req.prompt_ids, done, k)}

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        """One new token for each running row, each at its own position."""
        slots = [s.slot for s in seqs]
        pos = [s.cache_len for s in seqs]
        needed = max(pos) + 1
        shift = self._shifts(seqs)
        if self.graphs is not None and (key := self.graphs.key(slots, needed - 1)) is not None:
            rope = [p + d for p, d in zip(pos, shift, strict=True)] if any(shift) else None
            return self.graphs.run([s.tokens[-1] for s in seqs], pos, slots, key,
                                   [self.paging.table(s) for s in seqs], rope)
        dev = self.device
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # [B, 1]
        return self.runner.forward(ids, start=torch.tensor(pos, device=dev),
                                   lengths=torch.ones(len(seqs), dtype=torch.long, device=dev),
                                   plan=self.slots.plan(slots), kv_len=needed,
                                   rope_shift=torch.tensor(shift, device=dev) if any(shift) else None,
                                   tables=self.paging.tables(seqs, needed))
