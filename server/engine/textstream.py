"""Incremental detokenisation with stop strings: text is released only once no stop string can still begin in it."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already accounted for
        self.read = 0
        self.text = ""  # all text so far (up to a stop string)
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        """Add one token; return newly released text. Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        prev = self._decode(self.ids[self.prefix : self.read])
        cur = self._decode(self.ids[self.prefix :])
        if cur.endswith("\ufffd") or len(cur) <= len(prev):
            return ""  # an incomplete multi-byte character: wait for the next token
        self.text += cur[len(prev) :]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            start = max(0, self.sent - self.hold - 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        upto = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
