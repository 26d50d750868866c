"""Bases beyond Llama through the HTTP API, as users meet them: a server started on a tiny Gemma 2 folder
and one on a tiny Qwen3-MoE folder (sharded safetensors, tied embeddings), adapters uploaded as the
libraries saved them, and OpenAI completions over token prompts giving the libraries' greedy tokens and
logprobs (tests/fixtures/make_arch_fixtures.py)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.engine.test_architectures import hub_dir, peft_dir, refs
from tests.fixtures.make_arch_fixtures import ARCH_DIR, GREEDY_STEPS, INPUT_IDS
from tests.helpers import LiveServer, upload_files

CASES = {"gemma2": [("lo", "peft", "lora_all_linear"), ("pt", "peft", "prefix_tuning"), ("bn", "hub", "seq_bn")],
         "qwen3_moe": [("lo", "peft", "lora_all_linear"), ("ex", "peft", "lora_experts"), ("ia", "peft", "ia3")]}


@pytest.mark.parametrize("arch", list(CASES))
def test_a_server_on_the_architecture_serves_its_adapters_as_the_libraries_compute_them(arch, tmp_path):
    s = LiveServer(tmp_path / "store", model=str(ARCH_DIR / arch / "model"))
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            for aid, lib, family in CASES[arch]:
                folder = peft_dir(arch, family) if lib == "peft" else hub_dir(arch, family)
                r = c.post("/adapters", data={"adapter_id": aid}, files=upload_files(folder))
                assert r.status_code == 201, r.text
            tok = s.services.generation.tokenizer
            for aid, _, family in [(None, None, "base"), *CASES[arch]]:
                for b in range(INPUT_IDS.shape[0]):
                    body = {"model": aid or s.services.model_name, "prompt": INPUT_IDS[b].tolist(), "max_tokens": GREEDY_STEPS,
                            "temperature": 0, "logprobs": 1, "ignore_eos": True}
                    r = c.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    choice = r.json()["choices"][0]
                    want = refs(arch)[f"greedy_tokens/{family}"][b].tolist()
                    assert choice["text"] == tok.decode(want), (family, b)
                    got = torch.tensor(choice["logprobs"]["token_logprobs"])
                    assert (got - refs(arch)[f"greedy_logprobs/{family}"][b]).abs().max().item() < 1e-5, (family, b)
    finally:
        s.close()


def test_demo_adapters_on_a_base_they_do_not_fit_are_skipped_not_a_500(tmp_path):
    """The playground's demo button on Qwen3-MoE: the synthetic layouts are Llama's (gate_proj, up_proj and
    down_proj in every layer; AdapterHub has no MoE support), so none fits; the call answers 201 with the
    demos it could add (none) and the server keeps serving."""
    s = LiveServer(tmp_path / "store", model=str(ARCH_DIR / "qwen3_moe" / "model"))
    try:
        r = httpx.post(s.url + "/adapters/demo", timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["adapters"] == [] and httpx.get(s.url + "/adapters", timeout=10).json()["adapters"] == []
        assert httpx.post(s.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=60).status_code == 200
    finally:
        s.close()
