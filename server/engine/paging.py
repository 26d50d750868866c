"""Each request's pages and the prefix cache: the bridge between the engine's rows and `pages.PagePool`.

A row's positions are its adapter's prefix (virtual tokens: `VIRTUAL` ids), then its prompt, then what
it generates. The salt of its page keys names what computes its K/V: the content digest of its
adapter version (every family changes keys and values: a page serves rows of the same content only),
or the bare model's own. So a replaced or deleted version's pages are never found again by the new
one (its digest differs), two ids uploaded with the same files share, and nothing else can.

A request looks up the longest run of cached pages of its own positions and prefills only the rest,
always at least its last token (a page it would write is never one it shares). A request whose next
page is being computed right now by a row admitted before it (a burst of requests with one system
prompt) waits for it rather than computing it again: it is admitted at the next iteration. A request that asks
for its prompt's logprobs looks nothing up (every prompt token's logits are computed), and on models
whose rotary embedding depends on a row's whole length (LongRoPE) only rows that stay within the
original context use the cache. Pages computed are registered as they fill, decoded ones included
(multi-turn chat resends the model's own replies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import PagedKVCache
from .pages import VIRTUAL, PagePool, page_keys
from .sequence import Seq

BARE = "bare-model"  # the salt of the bare model's pages (adapter digests are hex)


@dataclass(frozen=True)
class Need:
    """What admitting a request takes now."""

    hits: tuple[int, ...]  # the cached pages it starts from
    compute: int  # tokens its prefill computes
    pages: int  # pages `PagePool.available` drops by
    wait: bool = False  # a row admitted before it is computing its next page now: it waits to reuse it


class Paging:
    def __init__(self, cache: PagedKVCache, prefix_caching: bool, reach_limit: int = 0) -> None:
        self.cache = cache
        self.pool = PagePool(cache.n_pages - 1, cache.page_size)  # the cache's last page is its sink
        self.ps = cache.page_size
        self.caching = prefix_caching
        self.reach_limit = reach_limit  # 0: none; else rows reaching past it neither read nor add cached pages
        self.queries = self.hits = 0  # prompt tokens looked up, and found, since start
        self.pending: dict[bytes, int] = {}  # keys of full pages rows are prefilling now -> the row computing it

    # -- keys ---------------------------------------------------------------------------------
    def _cacheable(self, s: Seq) -> bool:
        return self.caching and (not self.reach_limit or s.context_len + s.max_new - len(s.tokens) <= self.reach_limit)

    def keys(self, s: Seq, positions: int) -> list[bytes]:
        """Keys of the full pages among the row's first `positions` positions (kept on the Seq, extended)."""
        want = positions // self.ps
        if len(s.keys) < want:
            ids = [VIRTUAL] * s.prefix_len + list(s.req.prompt_ids) + s.tokens
            salt = s.ref.digest if s.ref is not None and s.ref.digest else BARE
            done = len(s.keys)
            s.keys.extend(page_keys(salt, ids[done * self.ps : want * self.ps], self.ps, s.keys[-1] if s.keys else b""))
        return s.keys[:want]

    # -- admission ----------------------------------------------------------------------------
    def need(self, s: Seq) -> Need:
        """Its cached pages (looked up now) and what else it takes to prefill its whole context."""
        ctx, hits, wait = s.context_len, [], False
        first = not s.resume
        if self._cacheable(s) and (s.req.params.prompt_logprobs is None or not first):
            keys = self.keys(s, ctx - 1)  # at least the last token is computed
            hits = self.pool.lookup(keys)
            wait = len(hits) < len(keys) and keys[len(hits)] in self.pending
        cached = len(hits) * self.ps
        fresh = sum(1 for p in hits if self.pool.ref[p] == 0)  # held by no row: they leave the evictable pages
        pages = self.pool.pages_for(ctx) - len(hits) + fresh
        return Need(tuple(hits), ctx - max(cached, s.prefix_len), pages, wait)

    def open(self, s: Seq, need: Need) -> None:
        """Give an admitted request its cached pages and the pages for the rest of its context."""
        self.pool.open(id(s), need.hits)
        new = self.pool.grow(id(s), s.context_len)
        if new is None:
            self.pool.close(id(s))
            raise RuntimeError("admitted a request the pool has no room for")  # the scheduler checked `need`
        self.cache.zero(new)
        s.cache_len = len(need.hits) * self.ps
        if not s.resume:
            s.cached = max(0, s.cache_len - s.prefix_len)
        if self._cacheable(s):
            for k in self.keys(s, s.context_len)[len(need.hits):]:  # the full pages it computes: others wait for them
                self.pending.setdefault(k, id(s))
            if not s.resume:
                self.queries += s.prompt_len
                self.hits += s.cached

    def next_step(self, running: list[Seq]) -> int:
        """Pages the running rows take in their next decode step."""
        return sum(1 for s in running if self.pool.pages_for(s.cache_len + 1) > len(self.table(s)))

    # -- rows ---------------------------------------------------------------------------------
    def table(self, s: Seq) -> list[int]:
        return self.pool.table(id(s))

    def tables(self, seqs: list[Seq], kv_len: int) -> torch.Tensor:
        """Page tables [B, P] covering kv_len positions (0, the zero page, past a row's pages)."""
        P = self.pool.pages_for(kv_len)
        out = torch.zeros(len(seqs), P, dtype=torch.long)
        for i, s in enumerate(seqs):
            t = self.table(s)[:P]
            out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return out.to(self.cache.device)

    def grow(self, s: Seq, positions: int) -> bool:
        """Pages for the row's first `positions` positions; False, changing nothing, when none are left."""
        new = self.pool.grow(id(s), positions)
        if new is None:
            return False
        self.cache.zero(new)
        return True

    def fork(self, src: Seq, dst: Seq) -> None:
        """`dst` (admitted with `src`'s very context: another choice of one prompt) takes src's pages
        instead of its own: the full ones shared, a partial last one copied."""
        self.pool.close(id(dst))
        pair = self.pool.fork(id(src), id(dst), src.cache_len)
        if pair is not None:
            self.cache.copy_page(*pair)
        dst.cache_len, dst.cached, dst.keys = src.cache_len, src.cached, list(src.keys)

    def register(self, s: Seq) -> None:
        """Offer the row's full pages to the prefix cache (those not yet keyed)."""
        if self._cacheable(s) and s.cache_len // self.ps > 0:
            keys = self.keys(s, s.cache_len)
            self.pool.register(id(s), keys)
            for k in keys:
                if self.pending.get(k) == id(s):
                    del self.pending[k]

    def close(self, s: Seq) -> None:
        """The row leaves (finished, failed or preempted): its pages go back, full ones to the cache."""
        if id(s) in self.pool.tables:
            self.pool.close(id(s))
        self.pending = {k: r for k, r in self.pending.items() if r != id(s)}

    # -- reading ------------------------------------------------------------------------------
    def usage(self) -> float:
        """Pages rows hold over the pool's pages (vLLM's kv_cache_usage_perc)."""
        return self.pool.in_use / (self.pool.n_pages - 1)
