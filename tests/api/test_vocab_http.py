"""An adapter with tokens added, through the HTTP API as users meet it: the folder PEFT and the tokenizer
saved, uploaded as it is; chat through the official OpenAI client with the adapter's own chat template,
greedy tokens and logprobs equal to PEFT's on the same templated prompt; its tokens in prompts, logit
bias, structured output and end-of-sequence, beside the bare model's rows in the same batches."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tests.fixtures.make_arch_fixtures import _greedy
from tests.helpers import FIXTURES, TINY, LiveServer, openai_client, upload_files

FOLDER = FIXTURES / "vocab" / "llama" / "added_mts"
STEPS = 6


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("store"))
    try:
        for aid, folder in [("chat", FOLDER), ("head", FIXTURES / "vocab" / "llama" / "mts_head")]:
            r = httpx.post(s.url + "/adapters", data={"adapter_id": aid}, files=upload_files(folder), timeout=60)
            assert r.status_code == 201, r.text
        yield s
    finally:
        s.close()


def peft_greedy(ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    from peft import PeftModel

    base = LlamaForCausalLM.from_pretrained(TINY).eval()
    base.resize_token_embeddings(258)  # as PEFT needs it; the adapter holds both tables whole
    pm = PeftModel.from_pretrained(base, str(FOLDER)).eval()
    toks, lps = _greedy(pm, torch.tensor([ids]), steps)
    return toks[0].tolist(), lps[0].tolist()


def test_its_info_says_what_it_speaks(live):
    info = httpx.get(live.url + "/adapters/chat", timeout=10).json()
    assert info["vocab_size"] == 258 and info["tokenizer"].startswith("sha256:") and info["method"] == "lora"
    info = httpx.get(live.url + "/adapters/head", timeout=10).json()
    assert "vocab_size" not in info and "tokenizer" not in info


def test_chat_with_its_own_template_equals_peft(live):
    tok = AutoTokenizer.from_pretrained(FOLDER)
    messages = [{"role": "user", "content": "the quick brown fox"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert "<|im_start|>" in tok.decode(ids) and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    want, want_lps = peft_greedy(ids, STEPS)
    r = openai_client(live).chat.completions.create(model="chat", messages=messages, max_tokens=STEPS, temperature=0,  # type: ignore[arg-type]
                                                   logprobs=True, extra_body={"ignore_eos": True})
    got = [t.logprob for t in r.choices[0].logprobs.content]
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert max(abs(a - b) for a, b in zip(got, want_lps, strict=True)) < 1e-5
    # the bare model has no chat template (the tiny tokenizer's): the adapter's is its own
    bare = httpx.post(live.url + "/v1/chat/completions", json={"model": live.services.model_name, "messages": messages},
                      timeout=30)
    assert bare.status_code == 400 and "no chat template" in bare.text


def test_its_tokens_in_prompts_and_outputs(live):
    """Its added tokens are single ids of its own tokenizer (in text prompts, echoed, as token-id prompts),
    its end-of-sequence token stops it, and the bare model refuses ids it does not have."""
    tok = AutoTokenizer.from_pretrained(FOLDER)
    prompt = "<|extra_3|> the quick <|im_start|>"
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "chat", "prompt": prompt, "max_tokens": 2, "echo": True,
                                            "logprobs": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(tok(prompt).input_ids)
        assert body["choices"][0]["logprobs"]["tokens"][1:4] == ["<|extra_3|>", " the", " quick"]
        bare = c.post("/v1/completions", json={"model": live.services.model_name, "prompt": prompt, "max_tokens": 1})
        assert bare.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"] + 15  # spelled out character by character
        end = tok.convert_tokens_to_ids("<|im_end|>")
        r = c.post("/v1/completions", json={"model": "chat", "prompt": [1, 256, 17, 257], "max_tokens": 5,
                                            "logit_bias": {str(end): 100}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 1
        for body in ({"prompt": [1, 256], "max_tokens": 1}, {"prompt": "hi", "max_tokens": 1, "logit_bias": {"257": 5}}):
            r = c.post("/v1/completions", json={"model": live.services.model_name, **body})
            assert r.status_code == 400 and "not in the vocabulary" in r.text, r.text
        r = c.post("/generate", json={"prompt": prompt, "adapter_id": "chat", "max_new_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tok(prompt).input_ids)


def test_structured_output_and_mixed_batches(live):
    """A schema held over its 258 ids and over the bare model's 256 at once; many rows of both, concurrently."""
    client = openai_client(live)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}

    def one(i: int) -> str:
        model = "chat" if i % 2 else live.services.model_name
        if i % 3 == 0:
            r = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=40, temperature=1.0,
                                          seed=i, extra_body={"response_format": fmt})
            assert r.choices[0].finish_reason == "stop" and json.loads(r.choices[0].text)["answer"] in ("yes", "no")
            return r.choices[0].text
        r = client.completions.create(model=model if i % 3 == 1 else "head", prompt="hello world", max_tokens=6,
                                      temperature=0.9, seed=i)
        return r.choices[0].text

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(one, range(18)))
    assert len(texts) == 18
