"""Incremental detokenisation: released text concatenates to the whole, stop strings cut it and are never released."""

from __future__ import annotations

from server.engine.textstream import TextStream
from tests.helpers import tiny_tokenizer

TOK = tiny_tokenizer()


def stream(text: str, stop: tuple[str, ...] = ()) -> tuple[str, TextStream]:
    s = TextStream(TOK, stop)
    out = ""
    for t in TOK(text, add_special_tokens=False).input_ids:
        out += s.push(t)
        if s.stopped:
            break
    return out + s.flush(), s


def test_released_text_is_the_decoded_text():
    out, s = stream("the quick brown fox jumps")
    assert out == s.text == TOK.decode(TOK("the quick brown fox jumps", add_special_tokens=False).input_ids)
    assert not s.stopped


def test_stop_string_cuts_and_is_never_released():
    out, s = stream("hello world, this is a tiny", stop=("this",))
    assert s.stopped and "this" not in out and out == s.text and out.rstrip().endswith("world,")


def test_text_that_may_begin_a_stop_string_is_held_back():
    s = TextStream(TOK, ("lazy dog",))
    released = ""
    for t in TOK("the lazy", add_special_tokens=False).input_ids:
        released += s.push(t)
    assert "lazy" not in released  # it could still become "lazy dog"
    assert (released + s.flush()).endswith("lazy")
