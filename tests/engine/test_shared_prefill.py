"""The `n` choices of one request share their prompt's prefill: rows with the same prompt, adapter and
prefix admitted together are computed once and the cache row copied; every choice still equals the
same request run alone with its seed, token for token."""

from __future__ import annotations

import pytest
import torch

from server.engine.types import GenerationRequest, SamplingParams
from tests.helpers import Collector, fixture_dir, make_engine, run_until_done


@pytest.mark.parametrize("adapter", ["lora_qv", "prefix_tuning", None])
@pytest.mark.parametrize("graphs", ["off", "on"])
def test_identical_prompts_are_prefilled_once_and_each_choice_is_exact(tmp_path, adapter, graphs):
    e = make_engine(tmp_path, slots=4, max_batch=8, graphs=graphs)
    if adapter:
        e.registry.add_folder(adapter, fixture_dir(adapter))
    a = tuple(e.tokenizer("the quick brown fox").input_ids)
    b = tuple(e.tokenizer("hello world, numbers 0123").input_ids)
    rows = []
    spy = e.runner.forward_full  # every pass runs through it

    def forward(ids, *args, **kw):
        rows.append(ids.shape[0] if ids.shape[1] > 1 else 0)  # prefill rows (decode steps: 0)
        return spy(ids, *args, **kw)

    e.runner.forward_full = forward
    cases = [(a, 1), (b, 2), (a, 3), (a, 4)]  # three choices of prompt a around another prompt
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s, ignore_eos=True, logprobs=True) for _, s in cases]
    cols = [Collector() for _ in cases]
    for i, ((ids, _), p) in enumerate(zip(cases, params, strict=True)):
        e.submit(GenerationRequest(f"r{i}", ids, adapter, p), cols[i])
    run_until_done(e, cols)
    assert [r for r in rows if r] == [2]  # one prefill pass of two rows: a once, b once
    together = [c.result for c in cols]
    assert len({together[i].token_ids for i in (0, 2, 3)}) > 1  # different seeds, different samples
    e.runner.forward_full = spy
    for i, ((ids, _), p) in enumerate(zip(cases, params, strict=True)):
        solo = Collector()
        e.submit(GenerationRequest(f"s{i}", ids, adapter, p), solo)
        run_until_done(e, [solo])
        assert solo.result.token_ids == together[i].token_ids, i
        assert torch.allclose(torch.tensor(solo.result.logprobs), torch.tensor(together[i].logprobs), atol=1e-5)


@pytest.mark.parametrize("budget", [4096, 5])  # whole prompts, and prompts prefilled in chunks of 5
@pytest.mark.parametrize("name", ["lora_qv", "prefix_tuning", "seq_bn"])
def test_prompt_logprobs_equal_the_librarys_own_logits(tmp_path, name, budget):
    """Each prompt token's logprob (and the top alternatives) from the prefill, against the logits PEFT
    and AdapterHub computed for the same rows (the fixtures' references)."""
    from tests.helpers import input_ids, refs

    e = make_engine(tmp_path, slots=4, budget=budget)
    e.registry.add_folder(name, fixture_dir(name))
    ids, ref = input_ids(), refs()[name]
    cols = []
    for b in range(ids.shape[0]):
        cols.append(Collector())
        p = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=3)
        e.submit(GenerationRequest(f"r{b}", tuple(ids[b].tolist()), name, p), cols[-1])
    run_until_done(e, cols)
    for b, c in enumerate(cols):
        want = torch.log_softmax(ref[b, :-1], -1)
        got = c.result.prompt_logprobs
        assert len(got) == ids.shape[1] - 1
        lp = torch.tensor([g[0] for g in got])
        assert torch.allclose(lp, want.gather(1, ids[b, 1:, None])[:, 0], atol=1e-4)
        assert [[t for t, _ in g[1]] for g in got] == torch.topk(want, 3, -1).indices.tolist()
