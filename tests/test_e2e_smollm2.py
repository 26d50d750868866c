"""End to end on the real embedded SmolLM2-135M-Instruct (converted from the wheel's GGUF, cached).

Base output equals transformers' own greedy generate; a PEFT (IA)3 adapter made here with peft
matches PEFT's logits; an AdapterHub-layout bottleneck adapter changes the output; all through HTTP.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from server.config import ModelConfig
from server.engine.model_loader import load_base_model
from tests.helpers import LiveServer, upload_files

pytestmark = pytest.mark.slow
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def loaded():
    return load_base_model(ModelConfig("smollm2", "cpu", "float32", CACHE))


def make_peft_ia3(model, out: Path) -> None:
    from peft import IA3Config, get_peft_model

    pm = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if "ia3_l" in n:
            p.data = 1 + 0.2 * torch.randn(p.shape, generator=g)
    pm.save_pretrained(out)


def make_adapterhub_seq_bn(hidden: int, layers: int, out: Path) -> None:
    """Files in AdapterHub's layout (its parity with the library is tested on the tiny model)."""
    out.mkdir(parents=True)
    r = hidden // 16
    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(layers):
        p = f"model.layers.{i}.output_adapters.adapters.smol.adapter_"
        t[p + "down.0.weight"] = 0.05 * torch.randn(r, hidden, generator=g)
        t[p + "down.0.bias"] = torch.zeros(r)
        t[p + "up.weight"] = 0.05 * torch.randn(hidden, r, generator=g)
        t[p + "up.bias"] = torch.zeros(hidden)
    save_file(t, out / "adapter.safetensors")
    cfg = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
           "original_ln_before": True, "original_ln_after": True, "ln_before": False, "ln_after": False,
           "residual_before_ln": True, "adapter_residual_before_ln": False, "is_parallel": False, "scaling": 1.0,
           "use_gating": False, "phm_layer": False, "leave_out": [], "stochastic_depth": 0.0, "inv_adapter": None}
    (out / "adapter_config.json").write_text(json.dumps({"config": cfg, "hidden_size": hidden, "model_class": "LlamaForCausalLM",
                                                        "model_type": "llama", "name": "smol", "version": "adapters.1.3.0"}))


def test_smollm2_end_to_end(loaded, tmp_path):
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    make_peft_ia3(load_base_model(ModelConfig("smollm2", "cpu", "float32", CACHE)).model, tmp_path / "ia3")
    make_adapterhub_seq_bn(model.config.hidden_size, model.config.num_hidden_layers, tmp_path / "bn")

    s = LiveServer(tmp_path / "store", model="smollm2", cache_dir=CACHE, max_new_tokens_limit=32)
    try:
        c = httpx.Client(base_url=s.url, timeout=120)
        base = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 12}).json()
        assert base["token_ids"][: len(ref)] == ref[: len(base["token_ids"])]
        assert "Paris" in base["text"]
        assert c.post("/adapters", data={"adapter_id": "ia3"}, files=upload_files(tmp_path / "ia3")).status_code == 201
        assert c.post("/adapters", data={"adapter_id": "bn"}, files=upload_files(tmp_path / "bn")).status_code == 201
        ia3 = c.post("/generate", json={"prompt": PROMPT, "adapter_id": "ia3", "max_new_tokens": 8,
                                        "ignore_eos": True, "logprobs": True}).json()
        bn = c.post("/generate", json={"prompt": PROMPT, "adapter_id": "bn", "max_new_tokens": 8, "ignore_eos": True}).json()
        assert bn["token_ids"] != base["token_ids"][:8] or bn["text"] != base["text"]
        # each PEFT adapter's logprobs equal PEFT's forward over the whole sequence (teacher forcing)
        from peft import PeftModel

        from server.adapters.methods import write_demo

        n = ids.shape[1]

        def peft_logprobs(folder, tokens: list[int], adapter: bool = True) -> list[float]:
            pm = PeftModel.from_pretrained(load_base_model(ModelConfig("smollm2", "cpu", "float32", CACHE)).model, folder)
            full = torch.tensor([ids[0].tolist() + tokens])
            with torch.no_grad(), (contextlib.nullcontext() if adapter else pm.disable_adapter()):
                lp = torch.log_softmax(pm(full).logits[0].float(), -1)
            return [lp[n - 1 + i, t].item() for i, t in enumerate(tokens)]

        def close(got: list[float], want: list[float]) -> float:
            return max(abs(a - b) for a, b in zip(got, want, strict=True))

        assert close(ia3["logprobs"], peft_logprobs(tmp_path / "ia3", ia3["token_ids"])) < 1e-3
        # a PEFT LoRA on every Linear of the real model (written in PEFT's layout)
        write_demo("lora8", tmp_path / "lora", model.config, seed=3)
        assert c.post("/adapters", data={"adapter_id": "lora"}, files=upload_files(tmp_path / "lora")).status_code == 201
        lo = c.post("/generate", json={"prompt": PROMPT, "adapter_id": "lora", "max_new_tokens": 8, "ignore_eos": True,
                                       "logprobs": True}).json()
        assert close(lo["logprobs"], peft_logprobs(tmp_path / "lora", lo["token_ids"])) < 1e-3
        # a PEFT prefix-tuning adapter (8 virtual positions in every layer's cache); usage counts only the
        # real prompt, and the adapter does change the logprobs
        write_demo("prefix8", tmp_path / "prefix", model.config, seed=4)
        assert c.post("/adapters", data={"adapter_id": "prefix"}, files=upload_files(tmp_path / "prefix")).status_code == 201
        pr = c.post("/generate", json={"prompt": PROMPT, "adapter_id": "prefix", "max_new_tokens": 8, "ignore_eos": True,
                                       "logprobs": True}).json()
        assert pr["usage"]["prompt_tokens"] == n
        assert close(pr["logprobs"], peft_logprobs(tmp_path / "prefix", pr["token_ids"])) < 1e-3
        assert close(pr["logprobs"], peft_logprobs(tmp_path / "prefix", pr["token_ids"], adapter=False)) > 1e-2
        assert "adapter_server_requests_total" in c.get("/metrics").text
    finally:
        s.close()


def test_the_converted_model_is_readable_by_the_servers_own_user(tmp_path):
    """A container converts the embedded model as root at build time and serves it as its own user: every
    file of the conversion is readable by others (the weights came out 0600 once, through a private
    temporary file, and the image's server could not open them)."""
    import os
    import stat

    from server.engine.model_loader import embedded_folder

    old = os.umask(0o022)
    try:
        folder = embedded_folder(tmp_path)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
    assert "model.safetensors" in modes and all(m == 0o644 for m in modes.values()), modes
