"""The OpenAI fields real clients send, through the official `openai` client against a live server of the
tiny model: n and best_of, lists of prompts and token-id prompts, the context window, full logprobs
(also streamed), penalties, logit_bias and min_tokens with OpenAI's ranges, fields we do not serve
refused by name, per-row independence in shared batches, and a quiet disconnect."""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import BadRequestError, NotFoundError

from tests.helpers import LiveServer, lora_server, openai_client

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = lora_server(tmp_path_factory.mktemp("store"))
    yield s
    s.close()


@pytest.fixture()
def oai(live):
    return openai_client(live)


def one(oai, **kw):
    return oai.completions.create(**{"model": "lo", "prompt": "the quick brown", "max_tokens": 6, "temperature": 0,
                                     "extra_body": IGNORE_EOS, **kw})


def test_models_retrieve(oai):
    m = oai.models.retrieve("lo")
    assert m.id == "lo" and m.model_extra["parent"] == "tiny_llama"
    assert oai.models.retrieve("tiny_llama").id == "tiny_llama"
    with pytest.raises(NotFoundError):
        oai.models.retrieve("nope")


def test_n_samples_and_best_of(oai, live):
    runner = live.services.engine.runner
    spy, rows = runner.forward_full, []  # every pass runs through it
    runner.forward_full = lambda ids, *a, **k: (rows.append(ids.shape[0]) if ids.shape[1] > 1 else None, spy(ids, *a, **k))[1]
    try:
        r = one(oai, n=3, temperature=1.0, seed=5)
    finally:
        runner.forward_full = spy
    assert rows == [1]  # the three choices share one prefill of the prompt
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
    assert len({c.text for c in r.choices}) > 1  # distinct samples
    assert r.choices[0].text == one(oai, temperature=1.0, seed=5).choices[0].text  # the first is the seed's own
    every = one(oai, n=3, temperature=1.0, seed=9, logprobs=0)
    mean = [sum(c.logprobs.token_logprobs) / 6 for c in every.choices]
    best = one(oai, n=1, best_of=3, temperature=1.0, seed=9)
    assert best.choices[0].text == every.choices[mean.index(max(mean))].text
    with pytest.raises(BadRequestError, match="best_of"):
        one(oai, n=2, best_of=1)


def test_a_list_of_prompts_and_token_id_prompts(oai, live):
    ids = live.services.generation.encode("hello world")
    r = one(oai, prompt=["the quick brown", "hello world"])
    assert [c.text for c in r.choices] == [one(oai).choices[0].text, one(oai, prompt="hello world").choices[0].text]
    assert one(oai, prompt=list(ids)).choices[0].text == r.choices[1].text
    both = one(oai, prompt=[list(ids), list(ids)], n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3] and len({c.text for c in both.choices}) == 1
    with pytest.raises(BadRequestError, match="vocabulary"):
        one(oai, prompt=[10**6])


def test_a_prompt_past_the_context_window_is_refused_saying_by_how_much(oai):
    with pytest.raises(BadRequestError, match=r"prompt has 480 tokens .* 28 past the context window of 512"):
        one(oai, prompt=[5] * 480, max_tokens=60)
    assert one(oai, prompt=[5] * 480, max_tokens=32).usage.completion_tokens == 32  # what fits is served


def test_completion_logprobs_with_alternatives_offsets_and_streaming(oai):
    r = one(oai, logprobs=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 5 <= len(top) <= 6 and top[tok] == p and max(top.values()) >= p  # greedy: the best is chosen
    chunks = list(one(oai, logprobs=5, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    echo = one(oai, echo=True)
    assert echo.choices[0].text == "the quick brown" + r.choices[0].text
    both = one(oai, echo=True, logprobs=2)  # the prompt's own logprobs, then the answer's
    elp, n_prompt = both.choices[0].logprobs, both.usage.prompt_tokens
    assert len(elp.tokens) == n_prompt + 6 and elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(p is not None and p <= 0 for p in elp.token_logprobs[1:])
    assert elp.token_logprobs[n_prompt:] == lp.token_logprobs and elp.tokens[n_prompt:] == lp.tokens
    assert elp.text_offset == sorted(elp.text_offset)


def test_chat_logprobs_with_top_alternatives_also_streamed(oai):
    msgs = [{"role": "user", "content": "hello"}]
    r = oai.chat.completions.create(model="lo", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=3, extra_body=IGNORE_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob for c in content)
    stream = oai.chat.completions.create(model="lo", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=3, stream=True, extra_body=IGNORE_EOS)
    got = [c.token for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert got == [c.token for c in content]
    with pytest.raises(BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model="lo", messages=msgs, max_tokens=2, top_logprobs=3)


def test_penalties_bias_and_min_tokens(oai, live):
    bias = one(oai, logit_bias={"42": 100})
    assert live.services.generation.encode(bias.choices[0].text) and bias.usage.completion_tokens == 6
    ids = httpx.post(live.url + "/generate", json={"prompt": "the quick brown", "adapter_id": "lo", "max_new_tokens": 6,
                                                   "ignore_eos": True}).json()["token_ids"]
    plain = one(oai, max_tokens=24)
    pen = one(oai, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)
    assert pen.choices[0].text != plain.choices[0].text
    native = httpx.post(live.url + "/generate", json={"prompt": "the quick brown", "adapter_id": "lo", "max_new_tokens": 24,
                                                      "ignore_eos": True, "frequency_penalty": 2.0, "presence_penalty": 2.0})
    assert native.json()["text"] == pen.choices[0].text  # the native endpoint takes the same penalties
    assert ids != [42] * 6
    eos = str(live.services.engine.tokenizer.eos_token_id)
    stop_now = oai.completions.create(model="lo", prompt="x", max_tokens=10, temperature=0, logit_bias={eos: 100})
    assert stop_now.choices[0].finish_reason == "stop" and stop_now.usage.completion_tokens <= 1
    later = oai.completions.create(model="lo", prompt="x", max_tokens=10, temperature=0, logit_bias={eos: 100},
                                   extra_body={"min_tokens": 4})
    assert later.choices[0].finish_reason == "stop" and later.usage.completion_tokens >= 4
    for bad in ({"presence_penalty": 5}, {"frequency_penalty": -3}, {"logit_bias": {"1": 200}},
                {"logit_bias": {str(10**6): 1}}, {"logit_bias": {"x": 1}}):
        with pytest.raises(BadRequestError):
            one(oai, **bad)


@pytest.mark.parametrize("field,value", [("response_format", {"type": "xml"}), ("suffix", "end"),
                                         ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}])])
def test_fields_we_would_ignore_are_refused_by_name(oai, field, value):
    with pytest.raises(BadRequestError, match=field):
        one(oai, extra_body={field: value})


def test_image_parts_are_refused_by_name(oai):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    with pytest.raises(BadRequestError, match="image_url content parts"):
        oai.chat.completions.create(model="lo", messages=msgs, max_tokens=2)


def test_a_row_with_penalties_and_bias_leaves_its_neighbours_tokens_alone(oai):
    alone = [one(oai, prompt=p).choices[0].text for p in ("the quick brown", "hello world")]
    with ThreadPoolExecutor(6) as pool:
        odd = [pool.submit(one, oai, prompt="numbers 0123", logit_bias={"7": 50}, frequency_penalty=1.5,
                           extra_body={**IGNORE_EOS, "repetition_penalty": 1.3}, max_tokens=30) for _ in range(3)]
        time.sleep(0.05)
        shared = [pool.submit(one, oai, prompt=p) for p in ("the quick brown", "hello world")]
        got = [f.result().choices[0].text for f in shared]
        [f.result() for f in odd]
    assert got == alone


def test_a_client_leaving_a_non_streaming_request_is_one_info_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    s = LiveServer(tmp_path / "store", max_new_tokens_limit=500)
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            body = b'{"model": "tiny_llama", "prompt": "slow", "max_tokens": 500, "ignore_eos": true}'
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.2)
        deadline = time.time() + 10
        while time.time() < deadline and not any("client disconnected" in r.message for r in caplog.records):
            time.sleep(0.1)
    finally:
        s.close()
    lines = [r for r in caplog.records if "client disconnected" in r.message]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or "CancelledError" in r.getMessage()]
