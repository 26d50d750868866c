"""Where the prefix cache shows over HTTP: `cached_tokens` of /generate, OpenAI's
`usage.prompt_tokens_details.cached_tokens` (the SDK reads it), and vLLM's counters in /metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import lora_server, openai_client

SYSTEM = "You are a careful assistant. Answer briefly and cite the numbers you are given. " * 3


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = lora_server(tmp_path_factory.mktemp("store"))
    yield s
    s.close()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))


def test_generate_reports_the_prompt_tokens_found_in_the_cache(live):
    body = {"prompt": SYSTEM + "What is 2 + 2?", "adapter_id": "lo", "max_new_tokens": 4, "ignore_eos": True}
    before = httpx.get(live.url + "/metrics").text
    cold = httpx.post(live.url + "/generate", json=body).json()
    warm = httpx.post(live.url + "/generate", json=body).json()
    bare = httpx.post(live.url + "/generate", json={**body, "adapter_id": None}).json()
    n = cold["usage"]["prompt_tokens"]
    assert cold["cached_tokens"] == 0 and bare["cached_tokens"] == 0  # the base model never reads the LoRA's pages
    assert warm["cached_tokens"] == (n - 1) // 16 * 16 > 0 and warm["token_ids"] == cold["token_ids"]
    after = httpx.get(live.url + "/metrics").text
    assert metric(after, "vllm:prefix_cache_queries_total") - metric(before, "vllm:prefix_cache_queries_total") == 3 * n
    assert metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total") == warm["cached_tokens"]
    assert "vllm:num_preemptions_total 0.0" in after and 0 <= metric(after, "vllm:kv_cache_usage_perc") <= 1


def test_openai_usage_names_the_cached_prompt_tokens(live):
    client = openai_client(live)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a prime."}]
    first = client.chat.completions.create(model="lo", messages=msgs, max_tokens=3)
    second = client.chat.completions.create(model="lo", messages=msgs, max_tokens=3, n=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (second.usage.prompt_tokens - 1) // 16 * 16 > 0  # counted once for its two choices
    comp = client.completions.create(model="lo", prompt=[SYSTEM + "a", SYSTEM + "b"], max_tokens=2)
    assert comp.usage.prompt_tokens_details.cached_tokens > 0  # both prompts start with the cached system pages
