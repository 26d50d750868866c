"""The paged KV cache and its prefix cache in the engine: a request served from cached pages equals the same
request with prefix caching off, for every family, alone and in mixed batches; pages serve only rows of the
same adapter content; preempted rows equal unpreempted ones; the pool's invariants hold after every step."""

from __future__ import annotations

import pytest

from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from tests.helpers import Collector, fixture_dir, make_engine

FAMILIES = [None, "ia3_default", "seq_bn", "double_seq_bn", "par_bn", "lora_qv", "dora_qv", "prompt_tuning",
            "p_tuning_lstm", "prefix_tuning", "hub_prefix", "compacter"]
SYSTEM = tuple(range(3, 3 + 45))  # a shared "system prompt": two full pages of 16 and part of a third


def checked_steps(e, cols: list[Collector], max_steps: int = 3000) -> None:
    """Run the engine until every request ends, checking the pool and every row's pages after each step."""
    for _ in range(max_steps):
        if all(c.result is not None for c in cols):
            return
        e.step()
        pool = e.paging.pool
        pool.check()
        for s in e.rows.batch():
            assert len(pool.table(id(s))) >= pool.pages_for(s.cache_len)  # its positions have pages
        assert set(pool.tables) == {id(s) for s in e.rows.batch()}  # only rows in the batch hold pages
    raise AssertionError("requests did not finish")


def make(tmp_path, name: str, adapters=FAMILIES, **kw):
    e = make_engine(tmp_path / name, slots=len(adapters), **kw)
    for a in adapters:
        if a is not None:
            e.registry.add_folder(a, fixture_dir(a))
    return e


def request(i: int, adapter: str | None, tail: tuple[int, ...], new: int = 8, **kw) -> GenerationRequest:
    p = SamplingParams(**{"max_new_tokens": new, "ignore_eos": True, "logprobs": True, **kw})
    return GenerationRequest(f"r{i}", SYSTEM + tail, adapter, p)


def run(e, reqs: list[GenerationRequest]) -> list[GenerationResult]:
    cols = [Collector() for _ in reqs]
    for r, c in zip(reqs, cols, strict=True):
        e.submit(r, c)
    checked_steps(e, cols)
    out = [c.result for c in cols]
    assert all(isinstance(r, GenerationResult) for r in out), out
    return out


def same(a: GenerationResult, b: GenerationResult, tol: float = 1e-5) -> None:
    assert a.token_ids == b.token_ids, (a.adapter_id, a.token_ids, b.token_ids)
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < tol, a.adapter_id


def test_every_family_served_from_its_own_cached_pages_equals_prefix_caching_off(tmp_path):
    off = make(tmp_path, "off", prefix_caching="off")
    on = make(tmp_path, "on")
    reqs = [request(i, a, (60 + i, 61, 62)) for i, a in enumerate(FAMILIES)]
    want = run(off, reqs)
    cold = [run(on, [r])[0] for r in reqs]  # one at a time: each computes and caches its own pages
    assert all(r.cached_tokens == 0 for r in cold)
    warm = run(on, [request(100 + i, a, (60 + i, 61, 62)) for i, a in enumerate(FAMILIES)])  # all in one batch
    for w, c, r in zip(want, cold, warm, strict=True):
        same(c, w)
        same(r, w)
        rec = on.registry.record(r.adapter_id) if r.adapter_id else None
        virtual = rec.manifest.virtual_tokens if rec else 0  # the adapter's own positions come first
        whole = (virtual + len(SYSTEM) + 3 - 1) // 16 * 16  # every full page but the last token's
        assert r.cached_tokens == whole - virtual > 0, r.adapter_id
    assert on.paging.hits > 0 and on.paging.queries >= on.paging.hits
    assert all(x.cached_tokens == 0 for x in want)  # off: nothing is looked up


def test_pages_serve_only_rows_of_the_same_adapter_content(tmp_path):
    e = make(tmp_path, "e", adapters=[None, "lora_qv", "ia3_default"])
    first = run(e, [request(0, "lora_qv", (70,))])[0]
    assert first.cached_tokens == 0
    # the bare model and another adapter find nothing of the LoRA's pages; the LoRA finds its own
    bare, ia3, again = run(e, [request(1, None, (70,)), request(2, "ia3_default", (70,)), request(3, "lora_qv", (70,))])
    assert bare.cached_tokens == 0 and ia3.cached_tokens == 0 and again.cached_tokens == 32
    same(again, first)
    # the same files under another id: the same computation, so the same pages
    e.registry.add_folder("lora_twin", fixture_dir("lora_qv"))
    twin = run(e, [request(4, "lora_twin", (70,))])[0]
    assert twin.cached_tokens == 32
    same(twin, first)
    # replaced by other content: its old pages are never found again
    e.registry.add_folder("lora_qv", fixture_dir("lora_bias"), replace=True)
    new = run(e, [request(5, "lora_qv", (70,))])[0]
    ref = run(make(tmp_path, "ref", adapters=["lora_bias"], prefix_caching="off"), [request(6, "lora_bias", (70,))])[0]
    assert new.cached_tokens == 0
    same(new, ref)
    # deleted and uploaded again with other files under the same id: nothing of the old content either
    e.registry.delete("lora_twin")
    e.registry.add_folder("lora_twin", fixture_dir("dora_qv"))
    assert run(e, [request(7, "lora_twin", (70,))])[0].cached_tokens == 0


def test_a_whole_prompt_in_the_cache_still_computes_its_last_token(tmp_path):
    e = make(tmp_path, "e", adapters=[None])
    r = GenerationRequest("a", SYSTEM[:32], None, SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True))
    a = run(e, [r])[0]
    b = run(e, [r])[0]
    assert b.cached_tokens == 16  # two full pages cached; the second holds the last token, which is recomputed
    same(b, a)


def test_multi_turn_history_resent_reuses_the_pages_of_the_models_own_reply(tmp_path):
    e = make(tmp_path, "e", adapters=[None, "seq_bn"])
    off = make(tmp_path, "off", adapters=[None, "seq_bn"], prefix_caching="off")
    for adapter in (None, "seq_bn"):
        history: tuple[int, ...] = SYSTEM
        for turn in range(3):
            r = GenerationRequest(f"t{turn}", history + (80 + turn, 81), adapter,
                                  SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=True))
            got = run(e, [r])[0]
            same(got, run(off, [r])[0])
            if turn:
                assert got.cached_tokens >= len(history) - 16  # the whole history but its last partial page
            history = r.prompt_ids + got.token_ids


def test_prompt_logprobs_return_every_prompt_token_when_the_prompt_is_cached(tmp_path):
    e = make(tmp_path, "e", adapters=[None])
    run(e, [request(0, None, (50,))])
    p = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=2)
    echo = run(e, [GenerationRequest("e", SYSTEM + (50,), None, p)])[0]
    ref = run(make(tmp_path, "off", adapters=[None], prefix_caching="off"),
              [GenerationRequest("e", SYSTEM + (50,), None, p)])[0]
    assert echo.cached_tokens == 0 and len(echo.prompt_logprobs) == len(SYSTEM)
    assert max(abs(a[0] - b[0]) for a, b in zip(echo.prompt_logprobs, ref.prompt_logprobs, strict=True)) < 1e-5


def test_the_choices_of_one_prompt_share_its_full_pages_and_copy_the_partial_one(tmp_path):
    e = make(tmp_path, "e", adapters=[None], prefix_caching="off")
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logprobs=True)
    reqs = [GenerationRequest(f"c{i}", SYSTEM, None, SamplingParams(**{**p.__dict__, "seed": 3 + i})) for i in range(3)]
    cols = [Collector() for _ in reqs]
    e.submit_group(list(zip(reqs, cols, strict=True)))
    e.step()  # admitted and prefilled together: the first is computed, the others take its pages
    pool = e.paging.pool
    tables = [pool.table(id(s)) for s in e.rows.running]
    assert len(tables) == 3 and tables[0][:2] == tables[1][:2] == tables[2][:2]  # the 2 full pages, shared
    assert len({t[2] for t in tables}) == 3  # the partial one, a copy each (they write on past it)
    assert all(pool.ref[p] == 3 for p in tables[0][:2])
    checked_steps(e, cols)
    alone = [run(make(tmp_path, f"a{i}", adapters=[None], prefix_caching="off"), [r])[0] for i, r in enumerate(reqs)]
    for c, a in zip(cols, alone, strict=True):
        same(c.result, a)


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_rows_preempted_when_the_pool_runs_out_resume_and_equal_unpreempted_ones(tmp_path, graphs):
    """A pool of 12 pages, 4 rows that each reach 4 pages: admitted by what they hold now, they run out
    mid-decode; the newest are preempted, resumed later by prefilling again, and equal rows that never were."""
    adapters = [None, "lora_qv", "prefix_tuning", "seq_bn"]
    reqs = [GenerationRequest(f"p{i}", SYSTEM[: 20 + i], a, SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                                          logprobs=True, temperature=0.8, seed=i))
            for i, a in enumerate(adapters)]
    big = make(tmp_path, "big", adapters=adapters, prefix_caching="off", graphs=graphs)
    want = [run(big, [r])[0] for r in reqs]
    for caching in ("on", "off"):
        small = make(tmp_path, f"small-{caching}", adapters=adapters, kv_cache_tokens=256, page_size=16, graphs=graphs,
                     prefix_caching=caching)
        small.paging.pool.__init__(13, 16)  # 12 pages (the engine's pool must hold one whole context: shrink it here)
        got = run(small, reqs)
        assert small.metrics.preemptions._value.get() > 0
        for g, w in zip(got, want, strict=True):
            same(g, w, tol=1e-4)
        assert small.paging.pool.in_use == 0


def test_chunked_prompts_start_from_their_cached_pages_and_register_each_chunk(tmp_path):
    """A prefill budget of 32: the 48-token prompts go in chunks; the second request computes only what the
    first one's chunks did not leave in the cache (a prefix tuning row and a bare one)."""
    for adapter in (None, "prefix_tuning"):
        off = make(tmp_path, f"off-{adapter}", adapters=[adapter], prefix_caching="off", budget=32)
        on = make(tmp_path, f"on-{adapter}", adapters=[adapter], budget=32)
        a, b = request(0, adapter, (90, 91, 92)), request(1, adapter, (90, 91, 93))
        want = [run(off, [r])[0] for r in (a, b)]
        got = [run(on, [r])[0] for r in (a, b)]
        assert got[0].cached_tokens == 0 and got[1].cached_tokens >= 32
        for g, w in zip(got, want, strict=True):
            same(g, w)


def test_a_burst_with_one_system_prompt_computes_it_once(tmp_path):
    """Requests sent together with one prefix: the first computes its pages, the others wait an iteration for
    them instead of computing them again; every result equals prefix caching off."""
    off = make(tmp_path, "off", adapters=[None, "lora_qv"], prefix_caching="off")
    on = make(tmp_path, "on", adapters=[None, "lora_qv"])
    reqs = [request(i, a, (100 + i,)) for i in range(3) for a in (None, "lora_qv")]
    want = run(off, reqs)
    got = run(on, reqs)
    assert [g.cached_tokens for g in got] == [0, 0, 32, 32, 32, 32]  # one computation per adapter
    for g, w in zip(got, want, strict=True):
        same(g, w)
    assert not on.paging.pending
