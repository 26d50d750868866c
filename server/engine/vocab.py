"""The vocabularies requests speak: the base model's tokenizer, and those adapters bring with tokens added.

A request is tokenised, templated, detokenised, stopped and constrained (structured output) with the
tokenizer of the adapter version it runs on, and samples over that adapter's token ids only (its
embedding's and LM head's rows: `size`). An adapter without a tokenizer of its own speaks the base
model's. A `Vocabulary` is that pair; its `key` names it in a request, so that the engine can tell a
request tokenised for one version from the version it pins (a replace may land in between).

Adapters that share a tokenizer (same files, same fingerprint) share one loaded copy and its compiled
grammars; the cache holds the few most recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterChangedError
from .grammar import Grammars

BASE = "base"  # the key's tokenizer part for the base model's tokenizer


@dataclass(frozen=True)
class Vocabulary:
    key: str  # "<tokenizer fingerprint, or 'base'>:<size>"
    tokenizer: Any
    size: int  # token ids its rows embed and score (the width of their logits)
    eos: frozenset[int]  # ids that end a sequence, besides the base model's own
    grammars: Grammars

    @property
    def chat_template(self) -> str:
        return str(getattr(self.tokenizer, "chat_template", "") or "")


def key_of(fingerprint: str | None, size: int) -> str:
    return f"{fingerprint or BASE}:{size}"


class Vocabularies:
    """Vocabulary objects by key, made on first use; the base model's always, adapters' in a small LRU."""

    def __init__(self, base_tokenizer: Any, base_size: int, capacity: int = 32) -> None:
        self._tokenizers: OrderedDict[str, Any] = OrderedDict()  # fingerprint -> loaded tokenizer
        self._made: OrderedDict[str, Vocabulary] = OrderedDict()
        self._base_tok, self.base_size, self.capacity = base_tokenizer, base_size, capacity
        self._lock = threading.Lock()
        self.base = self._make(key_of(None, base_size), base_tokenizer, base_size, frozenset())

    @staticmethod
    def _make(key: str, tok: Any, size: int, eos: frozenset[int]) -> Vocabulary:
        return Vocabulary(key, tok, size, eos, Grammars(tok, size))

    def get(self, fingerprint: str | None, size: int | None, load: Callable[[], tuple[str, Any] | None]) -> Vocabulary:
        """The vocabulary of an adapter whose tokenizer has this fingerprint (None: the base model's) and whose
        rows have `size` ids (None: the base's). `load` reads its tokenizer files when they are not loaded
        yet: AdapterChangedError when they turn out to be other files (the adapter was replaced meanwhile)."""
        size = size or self.base_size
        key = key_of(fingerprint, size)
        if key == self.base.key:
            return self.base
        with self._lock:
            if key in self._made:
                self._made.move_to_end(key)
                return self._made[key]
            tok = self._base_tok if fingerprint is None else self._tokenizers.get(fingerprint)
        if tok is None:
            got = load()  # outside the lock: it reads files
            if got is None or got[0] != fingerprint:
                if got is not None:
                    self._keep(*got)
                raise AdapterChangedError("the adapter was replaced while this request was being prepared; send it again")
            tok = self._keep(*got)
        # the end-of-sequence ids an adapter's own tokenizer names (it may add its own, `<|im_end|>` say)
        eos = frozenset() if fingerprint is None else eos_ids(getattr(tok, "eos_token_id", None))
        return self._put(self._made, key, self._make(key, tok, size, eos))

    def _keep(self, fingerprint: str, tok: Any) -> Any:
        return self._put(self._tokenizers, fingerprint, tok)

    def _put(self, cache: OrderedDict[str, Any], key: str, value: Any) -> Any:
        """The entry of `key` (a racing thread's, if it put one first), most recently used now; the least
        recently used ones past the capacity go."""
        with self._lock:
            value = cache.setdefault(key, value)
            cache.move_to_end(key)
            while len(cache) > self.capacity:
                cache.popitem(last=False)
        return value


def eos_ids(*values: Any) -> frozenset[int]:
    """The token ids in end-of-sequence settings (a tokenizer's or a generation config's `eos_token_id`:
    an id, a list of ids, or None)."""
    ids: set[int] = set()
    for v in values:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return frozenset(ids)
