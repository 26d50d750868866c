"""Structured output and tool calls, enforced while decoding (llguidance), through the official openai
client and the native route, on a random model: what comes out must parse and validate against the
schema, because the grammar allows nothing else. Constrained and free rows share passes without
changing each other."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from openai import BadRequestError

from tests.helpers import lora_server, openai_client

# bounded, so a random model finishes it within the token budget
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
    "required": ["name", "age", "colour", "tags"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
           "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = lora_server(tmp_path_factory.mktemp("store"), max_new_tokens_limit=200)
    yield s
    s.close()


@pytest.fixture()
def oai(live):
    return openai_client(live)


def chat(oai, **kw):
    return oai.chat.completions.create(**{"model": "lo", "messages": [{"role": "user", "content": "a person"}],
                                          "max_tokens": 150, **kw})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(oai, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = chat(oai, response_format=fmt, temperature=temperature, seed=seed)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    c = oai.completions.create(model="tiny_llama", prompt="person:", max_tokens=150, temperature=0,
                               extra_body={"response_format": fmt})  # an extension on completions, as in vLLM
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)


def test_json_object_output_is_an_object(oai):
    r = chat(oai, response_format={"type": "json_object"}, temperature=0, max_tokens=150)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_native_regex_choice_and_schema(live):
    def gen(**kw):
        r = httpx.post(live.url + "/generate", json={"prompt": "code:", "max_new_tokens": 60, "adapter_id": "lo", **kw})
        assert r.status_code == 200, r.text
        return r.json()

    for seed in range(3):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", gen(regex=r"[0-9]{3}-[a-z]{2}", temperature=1.0, seed=seed)["text"])
        assert gen(choice=["red", "green", "blue"], temperature=1.0, seed=seed)["text"] in ("red", "green", "blue")
    jsonschema.validate(json.loads(gen(json_schema=PERSON, max_new_tokens=150)["text"]), PERSON)
    bad = httpx.post(live.url + "/generate", json={"prompt": "x", "regex": "a", "choice": ["b"]})
    assert bad.status_code == 400 and "at most one" in bad.json()["error"]["message"]
    bad = httpx.post(live.url + "/generate", json={"prompt": "x", "json_schema": {"type": "nonsense"}})
    assert bad.status_code == 400 and "json schema" in bad.json()["error"]["message"]


def test_constrained_and_free_rows_share_passes_without_changing_each_other(oai):
    free = [oai.completions.create(model="lo", prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
            .choices[0].text for p in ("the quick brown", "hello world")]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(chat, oai, response_format=fmt, temperature=0) for _ in range(3)]
        time.sleep(0.05)
        shared = [pool.submit(oai.completions.create, model="lo", prompt=p, max_tokens=12, temperature=0,
                              extra_body={"ignore_eos": True}) for p in ("the quick brown", "hello world")]
        got = [f.result().choices[0].text for f in shared]
        for f in constrained:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), PERSON)
    assert got == free


def test_tool_calls_named_and_required(oai):
    named = chat(oai, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    assert named.choices[0].finish_reason == "tool_calls" and named.choices[0].message.content is None
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    for seed in range(3):
        r = chat(oai, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed)
        (call,) = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    with pytest.raises(BadRequestError, match="auto"):
        chat(oai, tools=TOOLS)
    with pytest.raises(BadRequestError, match="names no tool"):
        chat(oai, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert chat(oai, tools=TOOLS, tool_choice="none", max_tokens=4).choices[0].message.tool_calls is None


def test_langchain_structured_output_and_batch(live):
    """What agent frameworks call: LangChain's with_structured_output (json_schema and function calling)
    gets a validated object back, and the completions LLM's batch sends a list of prompts."""
    from langchain_openai import ChatOpenAI
    from langchain_openai import OpenAI as LangChainOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=10)
        unit: str = Field(pattern="^(c|f)$")

    llm = ChatOpenAI(model="lo", base_url=live.url + "/v1", api_key="unused", max_tokens=120, temperature=0, max_retries=0)
    for method in ("json_schema", "function_calling"):  # strict: no properties beyond the schema's (OpenAI's rule)
        got = llm.with_structured_output(Weather, method=method, strict=True).invoke("weather in Paris?")
        assert isinstance(got, Weather) and got.unit in ("c", "f") and len(got.city) <= 10, method
    comp = LangChainOpenAI(model="lo", base_url=live.url + "/v1", api_key="unused", max_tokens=5, temperature=0,
                           max_retries=0, batch_size=4)
    prompts = ["the quick brown", "hello world", "numbers 0123"]
    out = comp.batch(prompts)
    single = [httpx.post(live.url + "/v1/completions", json={"model": "lo", "prompt": p, "max_tokens": 5,
                                                              "temperature": 0}).json()["choices"][0]["text"] for p in prompts]
    assert out == single


def test_tool_choice_auto_where_the_template_shows_tools(oai, live):
    tok = live.services.generation.tokenizer
    plain = tok.chat_template
    tok.chat_template = ("{% if tools %}tools: {{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}\n"
                         "{% endif %}" + plain)
    try:
        r = chat(oai, tools=TOOLS, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})  # auto: the default
        without = chat(oai, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    finally:
        tok.chat_template = plain
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content  # a random model calls nothing
    assert r.usage.prompt_tokens > without.usage.prompt_tokens  # the template rendered the tools


def test_tool_calls_are_parsed_from_the_formats_templates_ask_for():
    from server.api.openai import parse_tool_calls

    hermes = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
              '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>')
    assert parse_tool_calls(hermes) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": "utc"})]
    assert parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"zone": "cet"}}') == [("get_time", {"zone": "cet"})]
    assert parse_tool_calls("The weather is fine.") == []
    assert parse_tool_calls('<tool_call>{"name": "get_time", "arguments": "not an object"}</tool_call>') == []
