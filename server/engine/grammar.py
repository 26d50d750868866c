"""Structured output: a grammar per row, enforced while decoding, with llguidance.

Why llguidance (against xgrammar and outlines-core, the other two vLLM offers): it is one small wheel
with no dependencies (xgrammar pulls triton, hundreds of MB, into a CPU install), it computes each
row's token mask on the fly in tens of microseconds with no up-front index over the vocabulary
(outlines-core builds one per schema, seconds for a large one), and it takes JSON Schema, regular
expressions and Lark grammars. vLLM, SGLang and llama.cpp use it too.

A request names its grammar as plain data, `GrammarSpec = (kind, text)`:
- ("json_schema", the schema as JSON text), ("json_object", ""): any JSON object;
- ("regex", a regular expression), ("choice", a JSON list of strings): exactly one of them.
The engine compiles it when the request is submitted (a bad one is a 400 then) and keeps one matcher
per row; each step the sampler masks the row's logits to the tokens the grammar allows, and the
engine feeds the chosen token back. Rows without a grammar pay nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from .types import GrammarSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
KINDS = ("json_schema", "json_object", "regex", "choice")
JSON_DEFAULTS = {"whitespace_flexible": False}  # compact JSON: `{"a":1}`, as json.dumps(separators) writes it


class _Wrapped:
    """A tokenizer llguidance cannot read itself (a Metaspace decoder without byte fallback): each token's
    text decoded after an anchor token, and encoding that keeps the tokenizer from prepending a space."""

    def __init__(self, tok: Any, n_vocab: int) -> None:
        self.eos_token_id, self.bos_token_id = tok.eos_token_id, tok.bos_token_id
        special = set(tok.all_special_ids)
        anchor = next(i for i in range(len(tok)) if i not in special)
        self.base = str(tok.decode([anchor]))
        self.tokens = [b"" if i >= len(tok) or i in special else str(tok.decode([anchor, i]))[len(self.base):].encode()
                       for i in range(n_vocab)]
        self.special_token_ids = sorted(special)
        self.tok = tok
        self.pre = tok(self.base, add_special_tokens=False).input_ids

    def __call__(self, s: str | bytes) -> list[int]:
        text = s if isinstance(s, str) else s.decode("utf-8", "replace")
        ids = self.tok(self.base + text, add_special_tokens=False).input_ids
        return ids[len(self.pre):] if ids[: len(self.pre)] == self.pre else ids


class Grammars:
    """Compiles grammar specs for one tokenizer (cached) and makes a matcher per row."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache: int = 64) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._cache = cache

    def _lltokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance
                import llguidance.hf

                try:
                    self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
                except ValueError as e:
                    log.info("llguidance reads this tokenizer through its token texts (%s)", e)
                    self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(self.tokenizer, self.vocab_size)),
                                                      n_vocab=self.vocab_size)
            return self._ll

    def compile(self, spec: GrammarSpec) -> str:
        """The llguidance grammar of a spec, checked against the tokenizer; a bad one is a 400 naming why."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        from llguidance import LLMatcher

        kind, text = spec
        try:
            if kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
            elif kind == "json_object":
                grammar = LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
            elif kind == "regex":
                grammar = LLMatcher.grammar_from_regex(text)
            elif kind == "choice":
                choices = json.loads(text)
                grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
            else:
                raise InvalidRequestError(f"unknown grammar kind {kind!r}; one of {', '.join(KINDS)}")
        except ValueError as e:
            raise InvalidRequestError(f"invalid {kind.replace('_', ' ')}: {e}") from None
        error = LLMatcher.validate_grammar(grammar, self._lltokenizer())
        if error and not error.startswith("WARNING"):
            raise InvalidRequestError(f"invalid {kind.replace('_', ' ')}: {error}")
        with self._lock:
            self._compiled[spec] = grammar
            if len(self._compiled) > self._cache:
                self._compiled.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec) -> Any:
        from llguidance import LLMatcher

        m = LLMatcher(self._lltokenizer(), self.compile(spec), log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"invalid {spec[0].replace('_', ' ')}: {m.get_error()}")
        return m


def mask_rows(logits: torch.Tensor, matchers: list[Any | None], widths: list[int] | None = None) -> torch.Tensor:
    """Logits with each constrained row's disallowed tokens at -inf (one bitmask per vocabulary width, filled
    on the host, applied on the logits' device); rows without a matcher are returned as they were.
    `widths`: each row's vocabulary (its matcher's), default the logits' width; past it the row's logits
    are -inf already."""
    B, V = logits.shape
    groups: dict[int, list[tuple[int, Any]]] = {}
    for i, m in enumerate(matchers):
        if m is not None:
            groups.setdefault(widths[i] if widths else V, []).append((i, m))
    if not groups:
        return logits
    import llguidance.torch as lt
    import torch

    for W, which in groups.items():
        bitmask = lt.allocate_token_bitmask(len(which), W)
        for k, (_, m) in enumerate(which):
            lt.fill_next_token_bitmask(m, bitmask, k)
        idx = torch.tensor([i for i, _ in which], device=logits.device)
        rows = logits.index_select(0, idx)
        x = rows[:, :W].contiguous()
        lt.apply_token_bitmask_inplace(x, bitmask.to(logits.device))
        logits = logits.index_copy(0, idx, x if W == V else torch.cat([x, rows[:, W:]], dim=1))
    return logits
