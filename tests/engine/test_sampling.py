"""Sampling: one vectorised pass, counter-based per-row noise, exact draws, filters, row independence."""

from __future__ import annotations

import math

import torch

from server.engine.sampling import RowSampling, exponential_noise, filter_logits, row_keys, sample
from server.engine.types import SamplingParams


def rows(*params: SamplingParams, seed: int = 0, step: int = 0) -> list[RowSampling]:
    return [RowSampling(p, seed + i, step) for i, p in enumerate(params)]


def test_greedy_rows_take_the_argmax_and_logprobs_are_the_raw_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    toks, lps, ok, _ = sample(logits, rows(*[SamplingParams()] * 3), want_logprobs=True)
    assert ok == [True] * 3
    assert toks == logits.argmax(-1).tolist()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
    assert max(abs(a - b) for a, b in zip(lps, want.tolist(), strict=True)) < 1e-6


def test_draws_follow_the_distribution():
    """The exponential race is an exact draw: 4000 independent rows' frequencies match softmax(logits)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    p = torch.softmax(logits, -1)
    n = 4000
    toks, _, _, _ = sample(logits.repeat(n, 1), [RowSampling(SamplingParams(temperature=1.0), s, 0) for s in range(n)], False)
    freq = torch.bincount(torch.tensor(toks), minlength=5).double() / n
    # 4 standard errors per entry
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0, -1.0])
    n = 2000
    for t, lo in [(0.1, 0.99), (1.0, 0.5)]:
        toks, _, _, _ = sample(logits.repeat(n, 1), [RowSampling(SamplingParams(temperature=t), s, 0) for s in range(n)], False)
        share = toks.count(0) / n
        assert share >= lo and (t == 0.1 or share < 0.8)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 5.0, 0.1, 4.9, -9.0]])
    k, p = torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 0.95])
    out = filter_logits(x, k, p, kmax=5, any_top_p=True)
    kept = torch.isfinite(out)
    probs1 = torch.softmax(x[1], -1)
    assert kept[0].tolist() == [True, True, False, False, False]
    assert probs1[0] > 0.5 and kept[1].tolist() == [True, False, False, False, False]  # the first already reaches 0.5
    assert kept[2].tolist() == [False, True, False, True, False]  # 5.0 and 4.9 carry > 95%
    only_k = filter_logits(x, torch.tensor([1, 3, 0]), torch.ones(3), kmax=3, any_top_p=False)
    assert torch.isfinite(only_k).sum(-1).tolist() == [1, 3, 5]
    assert torch.equal(out[kept], x[kept])  # kept logits are untouched


def test_sampled_tokens_respect_the_filters():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 100, generator=g)
    top3 = logits.topk(3, -1).indices
    toks, _, _, _ = sample(logits, [RowSampling(SamplingParams(temperature=2.0, top_k=3), s, 0) for s in range(64)], False)
    assert all(t in top3[i].tolist() for i, t in enumerate(toks))


def test_a_seed_reproduces_whatever_the_batch_and_steps_differ():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    alone = [sample(logits[i : i + 1], [RowSampling(p, 42, 5)], False)[0][0] for i in range(6)]
    mixed_rows = [RowSampling(p if i % 2 == 0 else SamplingParams(), 42, 5) for i in range(6)]
    together, _, _, _ = sample(logits, mixed_rows, False)
    assert [together[i] for i in (0, 2, 4)] == [alone[i] for i in (0, 2, 4)]
    assert [together[i] for i in (1, 3, 5)] == logits.argmax(-1)[1::2].tolist()  # greedy neighbours untouched
    # the step counter moves the stream: 20 steps of one row are not one repeated token
    steps = [sample(logits[:1], [RowSampling(p, 42, s)], False)[0][0] for s in range(20)]
    assert len(set(steps)) > 1


def test_noise_is_unit_exponential_and_keyed():
    keys = row_keys(torch.tensor([1, 2, (1 << 40) + 1]), torch.tensor([0, 0, 0]))
    assert len(set(keys.tolist())) == 3  # the seed's high half counts
    e = exponential_noise(keys, 20000)
    assert (e > 0).all() and torch.isfinite(e).all()
    assert abs(e.mean().item() - 1.0) < 0.03 and abs(e.var().item() - 1.0) < 0.08
    assert not torch.equal(e[0], e[1])
    assert torch.equal(e, exponential_noise(keys, 20000))  # pure function
    assert math.isclose(float((e < math.log(2)).double().mean()), 0.5, abs_tol=0.02)  # median ln 2


def test_a_row_whose_sampling_raises_fails_alone(tmp_path, monkeypatch):
    """If the batched pass raises, rows are sampled one by one: only the row that raises fails, and its
    greedy neighbours keep their solo tokens."""
    import server.engine.sampling as sampling_mod
    from server.engine.types import GenerationRequest
    from server.errors import GenerationFailedError
    from tests.helpers import Collector, make_engine, run_until_done

    e = make_engine(tmp_path / "s")
    ids = tuple(e.tokenizer("the quick brown fox").input_ids)

    def run(params: list[SamplingParams]) -> list:
        cols = [Collector() for _ in params]
        for i, p in enumerate(params):
            e.submit(GenerationRequest(f"r{i}", ids, None, p), cols[i])
        run_until_done(e, cols)
        return [c.result for c in cols]

    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    poisoned = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=1234)
    solo = run([greedy])[0]
    real = sampling_mod.sample

    def flaky(logits, rows, want):  # noqa: ANN001, ANN202
        if any(r.seed == 1234 for r in rows):
            raise RuntimeError("boom")
        return real(logits, rows, want)

    monkeypatch.setattr(sampling_mod, "sample", flaky)
    out = run([greedy, poisoned, greedy])
    assert isinstance(out[1], GenerationFailedError) and "boom" in str(out[1])
    for r in (out[0], out[2]):
        assert r.finish_reason == "length" and r.token_ids == solo.token_ids


def test_logits_processing_is_per_row_and_matches_the_reference_formulas():
    """logit_bias, min_tokens and the three penalties change only the rows that ask for them; repetition
    penalty equals transformers' own RepetitionPenaltyLogitsProcessor over prompt + generated tokens,
    frequency and presence the OpenAI formula over generated tokens."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from server.engine.sampling import process_logits

    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(5, V, generator=g) * 3
    prompt, out = (1, 2, 3, 3), [3, 7, 7, 7, 9]
    ps = [SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
          SamplingParams(logit_bias=((4, 5.0), (5, -100.0))), SamplingParams(min_tokens=10)]
    rows = [RowSampling(p, 0, len(out), prompt, out, (2,)) for p in ps]
    got = process_logits(logits, rows)
    assert torch.equal(got[0], logits[0])  # untouched
    ids = torch.tensor([[*prompt, *out]])
    assert torch.allclose(got[1:2], RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[1:2].clone()))
    counts = torch.bincount(torch.tensor(out), minlength=V).float()
    assert torch.allclose(got[2], logits[2] - 0.5 * counts - 0.25 * (counts > 0).float())
    want = logits[3].clone()
    want[4] += 5.0
    want[5] -= 100.0
    assert torch.equal(got[3], want)
    assert got[4][2] == float("-inf") and torch.equal(got[4][:2], logits[4][:2])  # end-of-sequence banned
    done = process_logits(logits, [RowSampling(SamplingParams(min_tokens=5), 0, 5, prompt, out, (2,))])
    assert torch.equal(done, logits)  # reached: no longer banned


def test_processed_rows_do_not_change_their_neighbours_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g)
    plain = [RowSampling(SamplingParams(temperature=0.7 * (i % 2)), 11 + i, 3) for i in range(6)]
    alone = sample(logits, plain, True)
    mixed = list(plain)
    mixed[2] = RowSampling(SamplingParams(logit_bias=((0, 100.0),), presence_penalty=1.0), 13, 3, (1,), [5, 5], (2,))
    together = sample(logits, mixed, True)
    assert together.tokens[2] == 0  # the bias wins
    assert [t for i, t in enumerate(together.tokens) if i != 2] == [t for i, t in enumerate(alone.tokens) if i != 2]


def test_top_logprobs_are_the_raw_distributions_most_likely_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 30, generator=g)
    ps = [SamplingParams(logprobs=True, top_logprobs=5), SamplingParams(logprobs=True), SamplingParams(logprobs=True, top_logprobs=2,
                                                                                                        logit_bias=((0, 50.0),))]
    got = sample(logits, rows(*ps), True)
    lsm = torch.log_softmax(logits, -1)
    vals, ids = torch.topk(lsm, 5, -1)
    assert got.top[1] is None and len(got.top[0]) == 5 and len(got.top[2]) == 2
    for i, n in ((0, 5), (2, 2)):
        assert [t for t, _ in got.top[i]] == ids[i, :n].tolist()
        assert all(abs(v - w) < 1e-6 for (_, v), w in zip(got.top[i], vals[i, :n].tolist(), strict=True))
    assert got.tokens[2] == 0 and abs(got.logprobs[2] - lsm[2, 0].item()) < 1e-6  # raw logprob of the biased token


def test_the_native_uniforms_are_the_tensor_ops_bits(monkeypatch):
    """The CPU kernel behind the sampling noise (uniform_noise.cpp) gives the tensor ops' values bit for bit,
    so a seed draws the same tokens with or without a compiler."""
    import pytest

    from server.engine import sampling

    if sampling._uniform_kernel() is None:
        pytest.skip("no C++ compiler")
    keys = row_keys(torch.tensor([0, 1, 7, (1 << 62) + 12345, 99]), torch.tensor([0, 3, 1_000_000, 5, 2**31]))
    for vocab in (1, 5, 257, 49152):
        got = sampling.uniforms(keys, vocab)
        monkeypatch.setattr(sampling, "_uniform_kernel", lambda: None)
        want = sampling.uniforms(keys, vocab)
        monkeypatch.undo()
        assert torch.equal(got, want), vocab
        assert got.min().item() > 0 and got.max().item() < 1
