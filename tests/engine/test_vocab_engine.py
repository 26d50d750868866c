"""Adapters with a vocabulary of their own in the engine: greedy decoding through both decode steps, rows
joining while others decode, equals PEFT's greedy tokens and logprobs (tests/fixtures/make_vocab_fixtures.py);
rows of different vocabularies share passes and never produce ids they do not have; each request speaks
its adapter version's tokenizer (its end-of-sequence token, its grammar), and one tokenised for another
version is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from server.engine.model_loader import freeze
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from server.errors import AdapterChangedError, InvalidRequestError
from tests.fixtures.make_arch_fixtures import GREEDY_STEPS
from tests.fixtures.make_vocab_fixtures import ADDED
from tests.helpers import (
    FIXTURES,
    Collector,
    fixture_dir,
    input_ids,
    make_engine,
    run_until_done,
    solo,
)

VOCAB = FIXTURES / "vocab"
BASES = {"llama": FIXTURES / "tiny_llama", "gemma3": FIXTURES / "arch" / "gemma3" / "model"}
OTHERS = {"o-lora": "lora_qv", "o-prompt": "prompt_tuning", "o-bn": "seq_bn"}  # other families, on the tiny Llama


def variants(base: str) -> list[str]:
    return sorted(p.name for p in (VOCAB / base).iterdir() if p.is_dir())


def engine_with(base: str, tmp_path, graphs: str = "off", others: bool = False, **kw):  # noqa: ANN003, ANN201
    names = variants(base)
    e = make_engine(tmp_path / "store", slots=len(names) + len(OTHERS), graphs=graphs,
                    model=freeze(AutoModelForCausalLM.from_pretrained(BASES[base])), **kw)
    for n in names:
        e.registry.add_folder(n, VOCAB / base / n)
    if others:
        for aid, src in OTHERS.items():
            e.registry.add_folder(aid, fixture_dir(src))
    return e


@pytest.mark.parametrize("graphs", ["off", "on"])
@pytest.mark.parametrize("base", list(BASES))
def test_greedy_decoding_of_every_variant_mixed_equals_peft(base, graphs, tmp_path):
    """Every variant on both its prompts and the bare model, half joining while the rest decode (and on the
    tiny Llama, three other families beside them, which decode as they do alone)."""
    e = engine_with(base, tmp_path, graphs, others=base == "llama")
    r = load_file(VOCAB / base / "refs.safetensors")
    p = SamplingParams(max_new_tokens=GREEDY_STEPS, ignore_eos=True, logprobs=True)
    others = list(OTHERS) if base == "llama" else []
    alone = {(a, b): solo(e, GenerationRequest("s", tuple(input_ids()[b].tolist()), a, p)).token_ids
             for a in others for b in range(2)}
    cases = [(a, b) for a in [None, *variants(base), *others] for b in range(2)]
    cols = [Collector() for _ in cases]
    for i, (a, b) in enumerate(cases):
        ids = r[f"inputs/{a}"][b] if a in variants(base) else input_ids()[b]
        e.submit(GenerationRequest(f"r{i}", tuple(ids.tolist()), a, p), cols[i])
        if i >= len(cases) // 2:
            e.step()
    run_until_done(e, cols)
    for (a, b), c in zip(cases, cols, strict=True):
        res = c.result
        assert isinstance(res, GenerationResult), (a, b, res)
        if a in OTHERS:
            assert res.token_ids == alone[(a, b)], a
            continue
        name = a or "base"
        if name == "base":
            continue  # the bare model's greedy is checked in test_architectures / test_engine
        assert list(res.token_ids) == r[f"greedy_tokens/{name}"][b].tolist(), (name, b)
        assert (torch.tensor(res.logprobs) - r[f"greedy_logprobs/{name}"][b]).abs().max().item() < 1e-5, (name, b)
    if graphs == "on":  # the fixed-shape step, its rows' own ends made before and after it
        assert e.graphs is not None and e.graphs.eager_steps > 0
        slot = e.adapters.table().index(("mts_head", e.registry.record("mts_head").version))
        key = e.graphs.key([0, slot], 10)
        assert key is not None and e.slots.ends(key[2]) and not e.slots.ends(e.graphs.key([0, 0], 10)[2])


def test_a_row_samples_over_its_own_vocabulary(tmp_path):
    """Bare rows (256 ids) and rows of an adapter with 258 share every pass, sampled hot: the bare rows never
    get 256 or 257 (not even asked for by logit bias: refused), the adapter's can (pushed there by it)."""
    e = engine_with("llama", tmp_path)
    prompt = tuple(input_ids()[0].tolist())
    hot = dict(max_new_tokens=12, ignore_eos=True, logprobs=True, temperature=5.0, top_logprobs=5)
    reqs = [GenerationRequest(f"b{i}", prompt, None, SamplingParams(seed=i, **hot)) for i in range(6)]
    penalised = SamplingParams(seed=2, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, **hot)
    reqs += [GenerationRequest("a0", prompt, "added_mts", SamplingParams(seed=1, logit_bias=((257, 100.0),), **hot)),
             GenerationRequest("a1", prompt, "added_tokens", penalised)]
    cols = [Collector() for _ in reqs]
    for q, c in zip(reqs, cols, strict=True):
        e.submit(q, c)
    run_until_done(e, cols)
    for q, c in zip(reqs, cols, strict=True):
        res = c.result
        assert isinstance(res, GenerationResult), res
        assert all(torch.isfinite(torch.tensor(res.logprobs))), q.request_id
        if q.adapter_id is None:
            assert max(res.token_ids) < 256
            assert all(t < 256 for alts in res.top_logprobs for t, _ in alts)
    assert set(cols[6].result.token_ids) == {257}
    alone = solo(e, GenerationRequest("a1", prompt, "added_tokens", penalised))  # penalties, logprobs: as in the batch
    assert alone.token_ids == cols[7].result.token_ids
    for mine, theirs in zip(alone.top_logprobs, cols[7].result.top_logprobs, strict=True):  # round-off apart
        assert [t for t, _ in mine] == [t for t, _ in theirs] and max(abs(a - b) for (_, a), (_, b) in zip(mine, theirs, strict=True)) < 1e-5
    with pytest.raises(InvalidRequestError, match="logit_bias token 257 is not in the vocabulary of the base model"):
        e.submit(GenerationRequest("x", prompt, None, SamplingParams(logit_bias=((257, 1.0),))), Collector())
    with pytest.raises(InvalidRequestError, match="prompt token 256 is not in the vocabulary of the base model"):
        e.submit(GenerationRequest("x", (1, 256), None, SamplingParams()), Collector())
    with pytest.raises(InvalidRequestError, match="prompt token 258 is not in the vocabulary of adapter 'added_mts'"):
        e.submit(GenerationRequest("x", (1, 258), "added_mts", SamplingParams()), Collector())


def test_a_request_speaks_its_adapter_versions_tokenizer(tmp_path):
    """Its end-of-sequence token (the adapter's tokenizer names <|im_end|>), its structured output grammar
    (over its 258 ids) beside a bare row's (over 256), and its vocabulary's key, checked at submit."""
    e = engine_with("llama", tmp_path)
    voc = e.vocabulary("added_mts")
    end = voc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert voc.size == 258 and voc.tokenizer.eos_token == "<|im_end|>" and end in voc.eos and end >= 240
    assert e.vocabulary(None).size == 256 and e.vocabulary("mts_head").key == e.vocabulary(None).key
    prompt = tuple(voc.tokenizer("<|im_start|>user\nhello<|im_end|>\n").input_ids)
    assert any(t >= 240 for t in prompt)  # its added tokens are single ids in its own tokenizer
    res = solo(e, GenerationRequest("s", prompt, "added_mts", SamplingParams(max_new_tokens=10, logit_bias=((end, 100.0),))))
    assert res.token_ids == (end,) and res.finish_reason == "stop"
    choices = ["alpha beta", "gamma"]
    grammar = ("choice", json.dumps(choices))
    cols = [Collector(), Collector()]
    e.submit(GenerationRequest("g1", prompt, "added_mts", SamplingParams(max_new_tokens=20, grammar=grammar), voc.key), cols[0])
    e.submit(GenerationRequest("g0", tuple(input_ids()[0].tolist()), None, SamplingParams(max_new_tokens=20, grammar=grammar)), cols[1])
    run_until_done(e, cols)
    assert [c.result.text for c in cols] and all(c.result.text in choices for c in cols), [c.result.text for c in cols]
    with pytest.raises(AdapterChangedError, match="send it again"):
        e.submit(GenerationRequest("x", prompt, "added_mts", SamplingParams(), e.vocabulary(None).key), Collector())
    # replaced by a version that keeps the base's tokenizer: a request tokenised for the old one is refused
    e.registry.add_folder("added_mts", VOCAB / "llama" / "mts_head", replace=True)
    with pytest.raises(AdapterChangedError):
        e.submit(GenerationRequest("x", prompt[:3], "added_mts", SamplingParams(), voc.key), Collector())
    assert e.vocabulary("added_mts").key == e.vocabulary(None).key
    assert ADDED[0] not in e.vocabulary("added_mts").tokenizer.get_vocab()


def test_the_device_byte_budget_by_default(monkeypatch):
    """Asked for: as asked (0: no limit). Not asked ("auto"): on a GPU half the memory free once the model is in
    place (the KV cache's page pool is allocated by then); on the CPU no limit."""
    from server.engine.engine import device_budget

    assert device_budget(123, torch.device("cpu")) == 123 and device_budget(0, torch.device("cuda")) == 0
    assert device_budget(None, torch.device("cpu")) == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    assert device_budget(None, torch.device("cuda")) == 5 << 30
    from server.config import Settings

    assert Settings(adapter_device_bytes="auto").adapter_device_bytes is None
    assert Settings(adapter_device_bytes="1024").adapter_device_bytes == 1024
