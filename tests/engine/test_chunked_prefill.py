"""Chunked prefill: a prompt over the per-iteration budget is prefilled a chunk per iteration while the
running rows keep decoding, and every row still equals its solo run."""

from __future__ import annotations

import pytest

from server.engine.types import GenerationRequest, GenerationResult, TokenEvent
from tests.helpers import CORPUS, Collector, fixture_dir, make_engine, req, run_until_done

LONG = CORPUS[:150]  # about 30 tokens of the tiny tokenizer


def case_req(engine, i: int, adapter: str | None, prompt: str, new: int) -> GenerationRequest:
    return req(engine, i, adapter, prompt, max_new_tokens=new)


def build(tmp_path, name: str, budget: int, graphs: str):
    e = make_engine(tmp_path / name, slots=4, budget=budget, graphs=graphs)
    for a in ("seq_bn", "ia3_default", "prefix_tuning"):
        e.registry.add_folder(a, fixture_dir(a))
    return e


def tokens(c: Collector) -> int:
    return sum(isinstance(ev, TokenEvent) for ev in c.events)


@pytest.mark.parametrize(("graphs", "long_adapter"), [("off", "seq_bn"), ("on", "seq_bn"), ("on", "prefix_tuning")])
def test_long_prompt_is_chunked_while_running_rows_decode(tmp_path, graphs, long_adapter):
    shorts = [(None, "hello world", 40), ("seq_bn", "the quick brown fox", 4), ("ia3_default", "numbers 0123", 40)]
    long_case = (long_adapter, LONG, 8)
    ref = build(tmp_path, "ref", 4096, graphs)  # no chunking: every prompt fits the budget
    solo = []
    for i, case in enumerate([*shorts, long_case]):
        c = Collector()
        ref.submit(case_req(ref, i, *case), c)
        run_until_done(ref, [c])
        solo.append(c.result)
    n_long = len(ref.tokenizer(LONG).input_ids)
    budget = 6
    assert n_long > 3 * budget

    e = build(tmp_path, "chunked", budget, graphs)
    cols = [Collector() for _ in range(4)]
    for i, case in enumerate(shorts):
        e.submit(case_req(e, i, *case), cols[i])
    while not all(tokens(c) for c in cols[:3]):  # (a short prompt over 6 tokens is chunked too)
        e.step()
    e.submit(case_req(e, 3, *long_case), cols[3])
    before = [tokens(c) for c in cols[:3]]
    steps = 0
    while tokens(cols[3]) == 0:
        e.step()
        steps += 1
        if steps > 50:
            raise AssertionError("the long prompt never produced a token")
    assert cols[1].result is not None  # a running row finished mid-chunking: the long prompt's row moved
    chunks = -(-n_long // budget)
    assert steps == chunks  # one chunk per iteration
    gained = [tokens(c) - b for c, b in zip(cols[:3], before, strict=True)]
    # every running row decoded one token per iteration meanwhile (the short one finished during it)
    assert gained[0] == gained[2] == steps and gained[1] == 4 - before[1] < steps
    run_until_done(e, cols)
    for c, want in zip(cols, solo, strict=True):
        got = c.result
        assert isinstance(got, GenerationResult) and got.finish_reason == "length"
        assert got.token_ids == want.token_ids
        assert max(abs(x - y) for x, y in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4
    if graphs == "on":
        assert e.graphs is not None and e.graphs.eager_steps > 0


def test_cancel_during_chunked_prefill_frees_the_row_and_the_pin(tmp_path):
    e = build(tmp_path, "c", 6, "off")
    c = Collector()
    h = e.submit(req(e, 0, "seq_bn", LONG, max_new_tokens=8), c)
    e.step()
    assert e.rows.chunking is not None
    h.cancel()
    e.step()
    assert e.rows.chunking is None and isinstance(c.result, GenerationResult) and c.result.finish_reason == "cancelled"
    assert e.registry.record("seq_bn").pins == 0
    after = Collector()
    e.submit(req(e, 1, "seq_bn", "hello world", max_new_tokens=4), after)
    run_until_done(e, [after])
    assert after.result.finish_reason == "length"
