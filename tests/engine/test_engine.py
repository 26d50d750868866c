"""The engine: mixed batches equal solo runs in prefill and decode, continuous batching, sampling, stops."""

from __future__ import annotations

import pytest
import torch

from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from server.errors import GenerationFailedError
from tests.helpers import Collector, fixture_dir, make_engine, req, run_until_done, solo

ADAPTERS = ["ia3_default", "ia3_ff_in", "seq_bn", "double_seq_bn", "par_bn", "seq_bn_ln", "par_bn_mh",
            "lora_qv", "lora_patterns", "lora_bias", "dora_qv", "hub_lora_all", "compacter",
            "prompt_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_tuning_proj", "hub_prefix", "hub_prefix_flat"]
PROMPTS = ["the quick brown fox", "hello world", "adapters serve many tasks on one", "numbers 0123"]


@pytest.fixture()
def engine(tmp_path):
    e = make_engine(tmp_path / "store", slots=len(ADAPTERS))
    for name in ADAPTERS:
        e.registry.add_folder(name, fixture_dir(name))
    return e


def test_mixed_batch_rows_equal_solo_runs_with_requests_joining_mid_flight(engine):
    cases = [(a, p) for a in [None, *ADAPTERS] for p in PROMPTS[:2]]
    alone = [solo(engine, req(engine, i, a, p)) for i, (a, p) in enumerate(cases)]
    # the batch: half join at once, the rest join one by one while the first half is decoding
    cols = [Collector() for _ in cases]
    half = len(cases) // 2
    for i in range(half):
        engine.submit(req(engine, i, *cases[i]), cols[i])
    engine.step()
    engine.step()
    for i in range(half, len(cases)):
        engine.submit(req(engine, i, *cases[i]), cols[i])
        engine.step()
    run_until_done(engine, cols)
    for (a, p), want, c in zip(cases, alone, cols, strict=True):
        got = c.result
        assert isinstance(got, GenerationResult) and got.finish_reason == "length"
        assert got.token_ids == want.token_ids, (a, p)
        assert max(abs(x - y) for x, y in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4, (a, p)
    # they shared forward passes: some pass had many rows and several distinct adapters
    buckets = {s.labels["le"]: s.value for s in engine.metrics.distinct.collect()[0].samples if s.name.endswith("_bucket")}
    assert buckets["4.0"] < buckets["+Inf"]


def test_adapters_change_the_output(engine):
    outs = {a: solo(engine, req(engine, 0, a, PROMPTS[0])).token_ids for a in [None, *ADAPTERS]}
    assert len(set(outs.values())) > 3


def test_engine_greedy_matches_transformers_generate(engine):
    r = req(engine, 0, None, PROMPTS[2], max_new_tokens=16)
    ours = solo(engine, r)
    ids = torch.tensor([r.prompt_ids])
    ref = engine.loaded.model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert list(ours.token_ids) == ref[0, ids.shape[1]:].tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16)
    a = solo(engine, req(engine, 0, "seq_bn", PROMPTS[0], seed=7, **kw)).token_ids
    b = solo(engine, req(engine, 1, "seq_bn", PROMPTS[0], seed=7, **kw)).token_ids
    c = solo(engine, req(engine, 2, "seq_bn", PROMPTS[0], seed=8, **kw)).token_ids
    assert a == b and a != c


def test_stop_string_truncates_text(engine):
    full = solo(engine, req(engine, 0, None, PROMPTS[0], max_new_tokens=20))
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = solo(engine, req(engine, 1, None, PROMPTS[0], max_new_tokens=20, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_streamed_text_concatenates_to_final_text(engine):
    c = Collector()
    engine.submit(req(engine, 0, "par_bn", PROMPTS[1], max_new_tokens=20), c)
    run_until_done(engine, [c])
    pieces = "".join(e.text for e in c.events if not isinstance(e, GenerationResult))
    assert pieces == c.result.text
    assert len([e for e in c.events if not isinstance(e, GenerationResult)]) == 20


def test_eos_stops_unless_ignored(engine):
    free = solo(engine, req(engine, 0, None, PROMPTS[0], max_new_tokens=6))
    engine.eos = {free.token_ids[2]}  # the third greedy token now ends the sequence
    stopped = solo(engine, req(engine, 1, None, PROMPTS[0], max_new_tokens=6, ignore_eos=False))
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:3]
    kept = solo(engine, req(engine, 2, None, PROMPTS[0], max_new_tokens=6, ignore_eos=True))
    assert kept.finish_reason == "length" and kept.token_ids == free.token_ids


def test_cancel_frees_the_row(engine):
    c = Collector()
    h = engine.submit(req(engine, 0, "seq_bn", PROMPTS[0], max_new_tokens=100), c)
    engine.step()
    engine.step()
    h.cancel()
    run_until_done(engine, [c])
    assert c.result.finish_reason == "cancelled"
    assert engine.rows.running == [] and engine.registry.record("seq_bn").pins == 0


def test_requests_are_counted_under_their_adapter_type_whatever_their_fate(engine):
    """The adapter type is known at submit: a request cancelled before it ever ran still counts under it."""
    def count(t: str, status: str) -> float:
        return engine.metrics.requests.labels(t, status)._value.get()

    c = Collector()
    h = engine.submit(req(engine, 0, "seq_bn", PROMPTS[0]), c)
    h.cancel()
    engine.step()
    assert c.result.finish_reason == "cancelled" and c.result.adapter_type == "bottleneck"
    assert count("bottleneck", "cancelled") == 1 and count("none", "cancelled") == 0
    done = solo(engine, req(engine, 1, "ia3_default", PROMPTS[1]))
    assert done.adapter_type in ("ia3", "ia3_merged") and count(done.adapter_type, "ok") == 1


def test_lora_greedy_matches_peft_generate(engine):
    """PEFT's own generate on the saved LoRA adapter, greedy, against ours in a shared engine."""
    from peft import PeftModel

    from tests.helpers import tiny_model

    r = req(engine, 0, "lora_patterns", PROMPTS[2], max_new_tokens=16)
    ours = solo(engine, r)
    pm = PeftModel.from_pretrained(tiny_model(), str(fixture_dir("lora_patterns"))).eval()
    ids = torch.tensor([r.prompt_ids])
    ref = pm.generate(input_ids=ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert list(ours.token_ids) == ref[0, ids.shape[1]:].tolist()
    assert ours.adapter_type in ("lora", "lora_merged")  # folded when the batch is uniform and it pays


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_lstm", "prefix_tuning"])
def test_prompt_and_prefix_tuning_greedy_match_peft_full_recompute(engine, name):
    """Greedy decoding equals PEFT's own forward re-run over the whole sequence at every step. (PEFT's
    cached `generate` is not the reference: under transformers 5.24 it leaves the full recompute
    from the second token for prompt tuning and from the first for prefix tuning.)"""
    from peft import PeftModel

    from tests.helpers import tiny_model

    r = req(engine, 0, name, PROMPTS[2], max_new_tokens=10)
    ours = solo(engine, r)
    pm = PeftModel.from_pretrained(tiny_model(), str(fixture_dir(name))).eval()
    ids = torch.tensor([r.prompt_ids])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, pm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert list(ours.token_ids) == ids[0, -10:].tolist()
    bare = solo(engine, req(engine, 1, None, PROMPTS[2], max_new_tokens=10))
    assert ours.token_ids != bare.token_ids


def test_virtual_tokens_take_context_but_are_not_prompt_tokens(engine):
    from server.errors import InvalidRequestError

    tok = engine.tokenizer(PROMPTS[0]).input_ids[1]
    n = engine.max_len - 10
    r = GenerationRequest("r", (tok,) * n, "prefix_tuning", SamplingParams(ignore_eos=True))
    res = solo(engine, r)  # 6 virtual tokens: room for 4 new ones
    assert res.prompt_tokens == n and len(res.token_ids) == 4
    long = GenerationRequest("l", (tok,) * (engine.max_len - 3), "prefix_tuning", SamplingParams())
    with pytest.raises(InvalidRequestError, match="6 virtual tokens"):
        engine.submit(long, Collector())
    assert engine.registry._current["prefix_tuning"].pins == 0  # the refused request holds no pin
    assert len(solo(engine, GenerationRequest("b", long.prompt_ids, None, SamplingParams(ignore_eos=True))).token_ids) == 3


def test_vllm_load_metrics_say_what_runs_and_what_waits(tmp_path):
    """The meanings the gateways read: waiting = queued, not admitted; running = admitted (prefilling
    or decoding); the adapters of each; KV usage = the pages the running rows hold over the pool's."""
    e = make_engine(tmp_path / "store", slots=4, max_batch=2)
    for name in ("lora_qv", "seq_bn", "prefix_tuning"):
        e.registry.add_folder(name, fixture_dir(name))
    cols = [Collector() for _ in range(3)]
    for i, a in enumerate(["lora_qv", "prefix_tuning", "seq_bn"]):
        e.submit(req(e, i, a, PROMPTS[i], max_new_tokens=4), cols[i])
    e.step()
    m = e.metrics
    assert m.vllm_running._value.get() == 2 and m.vllm_waiting._value.get() == 1
    (sample,) = [s for s in m.vllm_lora.collect()[0].samples]
    assert sample.labels == {"max_lora": "4", "running_lora_adapters": "lora_qv,prefix_tuning",
                             "waiting_lora_adapters": "seq_bn"}
    pool = e.paging.pool
    used = sum(pool.pages_for(s.cache_len) for s in e.rows.running)  # each holds the pages of what it wrote
    assert used == pool.in_use >= 2 and pool.n_pages - 1 == e.cfg.kv_cache_tokens // pool.page_size
    assert m.vllm_kv_usage._value.get() == pytest.approx(used / (pool.n_pages - 1))
    run_until_done(e, cols)
    assert m.vllm_running._value.get() == 0 and m.vllm_waiting._value.get() == 0
    (sample,) = [s for s in m.vllm_lora.collect()[0].samples]
    assert sample.labels["running_lora_adapters"] == "" and sample.labels["waiting_lora_adapters"] == ""


def test_a_request_abandoned_while_queued_is_counted_cancelled_under_its_adapter(tmp_path):
    """A queued request (every row busy) whose client gives up ends as cancelled, counted under its own
    adapter's label, never as ok or under another label; the row that ran is untouched."""
    e = make_engine(tmp_path, max_batch=1)
    e.registry.add_folder("seq_bn", fixture_dir("seq_bn"))
    running, queued = Collector(), Collector()
    e.submit(req(e, 0, None, "the quick brown fox", max_new_tokens=8), running)
    handle = e.submit(req(e, 1, "seq_bn", "hello world", max_new_tokens=8), queued)
    e.step()
    assert [s.req.request_id for s in e.rows.waiting] == ["r1"]  # no row free: it waits
    handle.cancel()
    run_until_done(e, [running, queued])
    assert queued.result.finish_reason == "cancelled" and queued.result.token_ids == ()
    assert queued.result.adapter_type == "bottleneck"
    assert running.result.finish_reason == "length"
    count = lambda t, s: e.metrics.requests.labels(t, s)._value.get()  # noqa: E731
    assert count("bottleneck", "cancelled") == 1 and count("bottleneck", "ok") == 0
    assert count("none", "cancelled") == 0 and count("none", "ok") == 1
    assert e.rows.queued == 0 and e.registry.record("seq_bn").pins == 0


def test_a_request_whose_caller_goes_away_while_it_is_being_queued_is_cancelled(tmp_path):
    """The HTTP layer submits from a worker thread (pinning an adapter may read it from disk). If the
    caller's task is cancelled meanwhile, the submit still queues the request: it must then be cancelled,
    not run to the end for nobody and counted as served."""
    import asyncio
    import threading

    from server.engine.service import GenerationService

    e = make_engine(tmp_path)
    e.registry.add_folder("seq_bn", fixture_dir("seq_bn"))
    gate, reading = threading.Event(), threading.Event()
    acquire = e.registry.acquire

    def slow_acquire(adapter_id):  # noqa: ANN001, ANN202
        reading.set()
        gate.wait(10)
        return acquire(adapter_id)

    e.registry.acquire = slow_acquire  # type: ignore[method-assign]
    service = GenerationService(e, "tiny")

    async def abandon() -> None:
        task = asyncio.ensure_future(service.start(req(e, 0, "seq_bn", "hello").prompt_ids, "seq_bn",
                                                   SamplingParams(max_new_tokens=8, ignore_eos=True)))
        await asyncio.to_thread(reading.wait, 10)
        task.cancel()  # the client went away while its request was being queued
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        for _ in range(1000):  # until the request has ended one way or the other (bounded: at most 10 s)
            if ended("cancelled") or ended("ok"):
                break
            await asyncio.sleep(0.01)  # the worker thread queues it; the loop runs the submit's done callback
            e.step()

    count = lambda t, s: e.metrics.requests.labels(t, s)._value.get()  # noqa: E731
    ended = lambda status: count("bottleneck", status) > 0  # noqa: E731
    asyncio.run(abandon())
    assert not e.rows.waiting and not e.rows.running
    assert count("bottleneck", "cancelled") == 1 and count("bottleneck", "ok") == 0
    assert e.registry.record("seq_bn").pins == 0


def test_a_slot_whose_prefix_disagrees_with_the_manifest_fails_only_its_request(tmp_path):
    """The manifest's virtual_tokens sizes a request before its adapter is loaded; the slot's entries place
    it. Should the two disagree (a manifest edited by hand), the request fails with a clear error at
    admission, its pin and slot are freed, and the rows beside it are served."""
    import json

    e = make_engine(tmp_path / "a")
    e.registry.add_folder("prefix_tuning", fixture_dir("prefix_tuning"))
    path = tmp_path / "a" / "prefix_tuning" / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "virtual_tokens": m["virtual_tokens"] + 1}))
    e = make_engine(tmp_path / "a")  # a fresh process reads the store
    bad, good = Collector(), Collector()
    e.submit(req(e, 0, "prefix_tuning", "hello world", max_new_tokens=4), bad)
    e.submit(req(e, 1, None, "hello world", max_new_tokens=4), good)
    run_until_done(e, [bad, good])
    assert isinstance(bad.result, GenerationFailedError) and "virtual tokens" in str(bad.result)
    assert good.result.finish_reason == "length"
    assert e.registry.record("prefix_tuning").pins == 0
    assert e.rows.queued == 0 and not e.rows.waiting
