"""The official openai client against a live server; restarts keep uploads; a real Prometheus scrapes us."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from openai import NotFoundError

from tests.helpers import (
    CHAT_TEMPLATE,
    LiveServer,
    fixture_dir,
    free_port,
    openai_client,
    sse_events,
    upload_files,
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("store"))
    with httpx.Client(base_url=s.url) as c:
        assert c.post("/adapters", data={"adapter_id": "chat-ia3"}, files=upload_files(fixture_dir("ia3_ff_in"))).status_code == 201
        assert c.post("/adapters", data={"adapter_id": "chat-bn"}, files=upload_files(fixture_dir("double_seq_bn"))).status_code == 201
    yield s
    s.close()


@pytest.fixture()
def oai(live):
    return openai_client(live)


def test_models_list(oai, live):
    ids = [m.id for m in oai.models.list().data]
    assert ids[0] == live.services.model_name == "tiny_llama"
    assert {"chat-ia3", "chat-bn"} <= set(ids)


def test_completions_base_and_adapter(oai, live):
    base = oai.completions.create(model="tiny_llama", prompt="the quick", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    ad = oai.completions.create(model="chat-bn", prompt="the quick", max_tokens=6, temperature=0, logprobs=1,
                                extra_body={"ignore_eos": True})
    assert base.usage.completion_tokens == 6 and base.choices[0].finish_reason == "length"
    assert ad.choices[0].text != base.choices[0].text
    assert len(ad.choices[0].logprobs.token_logprobs) == 6
    # same as the native endpoint
    native = httpx.post(live.url + "/generate", json={"prompt": "the quick", "adapter_id": "chat-bn",
                                                      "max_new_tokens": 6, "ignore_eos": True}).json()
    assert native["text"] == ad.choices[0].text


def test_completions_stream(oai):
    chunks = list(oai.completions.create(model="chat-ia3", prompt="hello", max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and chunks[-1].usage.completion_tokens == 8
    full = oai.completions.create(model="chat-ia3", prompt="hello", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert text == full.choices[0].text


def test_chat_and_chat_stream(oai, live):
    tok = live.services.generation.tokenizer
    tok.chat_template = CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = oai.chat.completions.create(model="chat-bn", messages=msgs, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
    stream = oai.chat.completions.create(model="chat-bn", messages=msgs, max_tokens=5, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == r.choices[0].message.content


def test_streams_are_framed_as_vllm_bench_serve_reads_them(live):
    """What `vllm bench serve --backend openai` (and openai-chat) sends, read as it reads it: events split on
    a blank line, each `data: ` + JSON (no `\r\n`, no `: ping` comments), the completion's text whole, then
    `[DONE]`."""
    bodies = {"/v1/completions": {"model": "chat-ia3", "prompt": "hello there", "max_tokens": 12, "ignore_eos": True,
                                  "stream": True, "stream_options": {"include_usage": True}},
              "/v1/chat/completions": {"model": "chat-bn", "messages": [{"role": "user", "content": "hello"}],
                                       "max_completion_tokens": 12, "ignore_eos": True, "stream": True,
                                       "stream_options": {"include_usage": True}}}
    live.services.generation.tokenizer.chat_template = CHAT_TEMPLATE
    for path, body in bodies.items():
        with httpx.stream("POST", live.url + path, json=body, timeout=60) as r:
            assert r.status_code == 200, path
            events = sse_events(r)
        assert events[-1] == "[DONE]", path
        chunks = events[:-1]
        text = "".join((c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or "")
                       for c in chunks if c["choices"])
        assert chunks[-1]["usage"]["completion_tokens"] == 12 and text, path


def test_unknown_model_is_404(oai):
    with pytest.raises(NotFoundError):
        oai.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)


def test_restart_keeps_uploads_and_loads_lazily(tmp_path):
    store = tmp_path / "store"
    a = LiveServer(store)
    try:
        r = httpx.post(a.url + "/adapters", data={"adapter_id": "keep-me"}, files=upload_files(fixture_dir("par_bn")))
        assert r.status_code == 201
        before = httpx.post(a.url + "/generate", json={"prompt": "hi there", "adapter_id": "keep-me",
                                                       "max_new_tokens": 6, "ignore_eos": True}).json()["token_ids"]
    finally:
        a.close()
    b = LiveServer(store)
    try:
        info = httpx.get(b.url + "/adapters/keep-me").json()
        assert info["tier"] == "disk" and info["variant"] == "par_bn"
        after = httpx.post(b.url + "/generate", json={"prompt": "hi there", "adapter_id": "keep-me",
                                                      "max_new_tokens": 6, "ignore_eos": True}).json()["token_ids"]
        assert after == before
        assert httpx.get(b.url + "/adapters/keep-me").json()["tier"] == "device"
    finally:
        b.close()


def shipped_promql() -> list[str]:
    import json
    from pathlib import Path

    import yaml

    obs = Path(__file__).resolve().parents[2] / "server" / "observability"
    rules = [r["expr"] for g in yaml.safe_load((obs / "prometheus-rules.yml").read_text())["groups"] for r in g["rules"]]
    dash = json.loads((obs / "grafana-dashboard.json").read_text())
    return rules + [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_shipped_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's prometheus package (promtool) is not installed here")
    from pathlib import Path

    rules = Path(__file__).resolve().parents[2] / "server" / "observability" / "prometheus-rules.yml"
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_real_prometheus_scrapes_without_errors(live, tmp_path):
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("Debian's prometheus package is not installed here (make test installs it where apt-get works)")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: adapter-server\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{live.port}']\n"
    )
    proc = subprocess.Popen([prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        httpx.post(live.url + "/generate", json={"prompt": "scrape me", "adapter_id": "chat-bn", "max_new_tokens": 4})
        api = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.time() + 60
        target = None
        while time.time() < deadline:
            try:
                t = httpx.get(api + "/targets", timeout=2).json()["data"]["activeTargets"]
                if t and t[0]["health"] != "unknown":
                    target = t[0]
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert target is not None, "prometheus never scraped"
        assert target["health"] == "up" and target["lastError"] == "", target
        q = httpx.get(api + "/query", params={"query": 'adapter_server_requests_total{adapter_type="bottleneck",status="ok"}'}).json()
        assert q["status"] == "success" and float(q["data"]["result"][0]["value"][1]) >= 1
        # every PromQL we ship (README rules and dashboard panels) is valid against the real series
        time.sleep(2.5)
        for expr in shipped_promql():
            r = httpx.get(api + "/query", params={"query": expr.replace("$__rate_interval", "1m")}).json()
            assert r["status"] == "success", (expr, r)
        share = httpx.get(api + "/query", params={"query": shipped_promql()[0]}).json()["data"]["result"]
        assert {x["metric"]["adapter_type"] for x in share} >= {"bottleneck", "none"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
