"""Synthetic adapters for any base model, written in the libraries' real file layouts.

For benchmarks, load tests and demos where no trained adapter exists for the base model. Their
parity with the libraries is established on the fixtures (tests/fixtures), made by the libraries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BN_PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": dict(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu",
                   original_ln_before=True, is_parallel=False, scaling=1.0),
    "double_seq_bn": dict(mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="swish",
                          original_ln_before=False, is_parallel=False, scaling=1.0),
    "par_bn": dict(mh_adapter=False, output_adapter=True, reduction_factor=2, non_linearity="relu",
                   original_ln_before=False, is_parallel=True, scaling=4.0),
}


def _targets(num_layers: int, targets: tuple[str, ...]):  # noqa: ANN202
    """(layer, module path under the decoder, short name) of every targeted Linear."""
    for i in range(num_layers):
        for name in targets:
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            yield i, f"model.layers.{i}.{block}.{name}", name


def write_peft_ia3(out: Path, num_layers: int, dims: dict[str, tuple[int, int]], seed: int = 0,
                   targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj"), ff: tuple[str, ...] = ("down_proj",)) -> Path:
    """A PEFT (IA)3 folder. dims: linear name -> (out_features, in_features)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {}
    for _, module, name in _targets(num_layers, targets):
        o, n = dims[name]
        shape = (1, n) if name in ff else (o, 1)
        t[f"base_model.model.{module}.ia3_l"] = 1 + 0.1 * torch.randn(shape, generator=g)
    save_file(t, out / "adapter_model.safetensors")
    cfg = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": list(targets),
           "feedforward_modules": list(ff), "fan_in_fan_out": False, "init_ia3_weights": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_adapterhub_bn(out: Path, num_layers: int, hidden: int, preset: str = "seq_bn", seed: int = 0,
                        name: str = "adapter") -> Path:
    """An AdapterHub bottleneck folder (adapter.safetensors) for a preset of BN_PRESETS."""
    out.mkdir(parents=True, exist_ok=True)
    p = BN_PRESETS[preset]
    r = max(1, int(hidden // p["reduction_factor"]))
    g = torch.Generator().manual_seed(seed)
    t = {}
    places = (["attention_adapters"] if p["mh_adapter"] else []) + (["output_adapters"] if p["output_adapter"] else [])
    for i in range(num_layers):
        for place in places:
            k = f"model.layers.{i}.{place}.adapters.{name}."
            t[k + "adapter_down.0.weight"] = 0.05 * torch.randn(r, hidden, generator=g)
            t[k + "adapter_down.0.bias"] = 0.01 * torch.randn(r, generator=g)
            t[k + "adapter_up.weight"] = 0.01 * torch.randn(hidden, r, generator=g)
            t[k + "adapter_up.bias"] = 0.01 * torch.randn(hidden, generator=g)
    save_file(t, out / "adapter.safetensors")
    cfg = {**p, "original_ln_after": True, "ln_before": False, "ln_after": False, "residual_before_ln": True,
           "adapter_residual_before_ln": False, "use_gating": False, "phm_layer": False, "leave_out": [],
           "stochastic_depth": 0.0, "inv_adapter": None, "init_weights": "bert", "dropout": 0.0}
    meta = {"config": cfg, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_type": "llama",
            "name": name, "version": "adapters.1.3.0"}
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=1))
    return out


COMPACTER: dict[str, Any] = dict(mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="gelu", original_ln_before=False,
                 is_parallel=False, scaling=1.0, phm_layer=True, phm_dim=4, phm_rank=1, factorized_phm_W=True,
                 factorized_phm_rule=False, shared_phm_rule=True, shared_W_phm=False, phm_bias=True, learn_phm=True,
                 phm_c_init="normal", phm_init_range=0.0001, hypercomplex_nonlinearity="glorot-uniform")


def write_adapterhub_compacter(out: Path, num_layers: int, hidden: int, seed: int = 0, name: str = "adapter") -> Path:
    """An AdapterHub Compacter folder (pytorch_adapter.bin): factorised PHM layers and one shared
    phm_rule, with small random values; hidden / 16 and hidden must divide by phm_dim 4."""
    out.mkdir(parents=True, exist_ok=True)
    n, r = int(COMPACTER["phm_dim"]), hidden // int(COMPACTER["reduction_factor"])
    g = torch.Generator().manual_seed(seed)
    t = {f"model.shared_parameters.{name}.phm_rule": 0.5 * torch.randn(n, n, n, generator=g)}
    for i in range(num_layers):
        for place in ("attention_adapters", "output_adapters"):
            k = f"model.layers.{i}.{place}.adapters.{name}."
            t[k + "adapter_down.0.W_left"] = 0.3 * torch.randn(n, hidden // n, 1, generator=g)
            t[k + "adapter_down.0.W_right"] = 0.3 * torch.randn(n, 1, r // n, generator=g)
            t[k + "adapter_down.0.b"] = 0.01 * torch.randn(r, generator=g)
            t[k + "adapter_up.W_left"] = 0.1 * torch.randn(n, r // n, 1, generator=g)
            t[k + "adapter_up.W_right"] = 0.1 * torch.randn(n, 1, hidden // n, generator=g)
            t[k + "adapter_up.b"] = 0.01 * torch.randn(hidden, generator=g)
    torch.save(t, out / "pytorch_adapter.bin")
    cfg = {**COMPACTER, "original_ln_after": True, "ln_before": False, "ln_after": False, "residual_before_ln": True,
           "adapter_residual_before_ln": False, "use_gating": False, "leave_out": [], "stochastic_depth": 0.0,
           "inv_adapter": None, "init_weights": "bert", "dropout": 0.0}
    meta = {"config": cfg, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_type": "llama",
            "name": name, "version": "adapters.1.3.0"}
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=1))
    return out


def write_peft_lora(out: Path, num_layers: int, dims: dict[str, tuple[int, int]], r: int = 16, seed: int = 0,
                    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                    dora: bool = False) -> Path:
    """A PEFT LoRA folder (rank r on every target, alpha 2r) with small random A and B; with `dora`, a
    DoRA whose magnitude vectors are ones (untrained: PEFT starts them at the base rows' norms)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {}
    for _, module, name in _targets(num_layers, targets):
        o, n = dims[name]
        t[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n, generator=g) / n**0.5
        t[f"base_model.model.{module}.lora_B.weight"] = 0.01 * torch.randn(o, r, generator=g)
        if dora:
            t[f"base_model.model.{module}.lora_magnitude_vector"] = torch.ones(o)
    save_file(t, out / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
           "lora_dropout": 0.0, "use_rslora": False, "use_dora": dora, "init_lora_weights": True, "bias": "none",
           "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_peft_prompt(out: Path, cfg: Any, n: int = 20, seed: int = 0, prefix: bool = False) -> Path:
    """A PEFT prompt-tuning folder (N virtual token embeddings), or with `prefix` a prefix-tuning one
    (each layer's keys and values for N positions), with small random values."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    width = L * 2 * kvh * hd if prefix else H
    save_file({"prompt_embeddings": (0.5 if prefix else 0.02) * torch.randn(n, width, generator=g)},
              out / "adapter_model.safetensors")
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": n, "num_transformer_submodules": 1, "num_layers": L,
              "inference_mode": True}
    if prefix:
        cfg_json = {"peft_type": "PREFIX_TUNING", **common, "token_dim": kvh * hd, "num_attention_heads": kvh,
                    "prefix_projection": False, "encoder_hidden_size": H}
    else:
        cfg_json = {"peft_type": "PROMPT_TUNING", **common, "token_dim": H, "num_attention_heads": cfg.num_attention_heads,
                    "prompt_tuning_init": "RANDOM"}
    (out / "adapter_config.json").write_text(json.dumps(cfg_json, indent=1))
    return out


def write_peft_tokens(out: Path, cfg: Any, n: int = 16, seed: int = 0, head: bool = False) -> Path:
    """A PEFT TRAINABLE_TOKENS folder: n trained rows of the input embedding (ids 1..n: special tokens,
    such as a chat template's, come first in most vocabularies; on a tied base also saved for the LM head,
    as PEFT saves them), or with `head` every row of the LM head (a whole trained head)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    V, H = cfg.vocab_size, cfg.hidden_size
    ids = list(range(V)) if head else list(range(1, min(n, V - 1) + 1))
    rows = 0.02 * torch.randn(len(ids), H, generator=g)
    modules = ["lm_head"] if head else ["model.embed_tokens"] + (["lm_head"] if getattr(cfg, "tie_word_embeddings", False) else [])
    save_file({f"base_model.model.{m}.trainable_tokens_delta": rows.clone() for m in modules}, out / "adapter_model.safetensors")
    cfg_json = {"peft_type": "TRAINABLE_TOKENS", "task_type": "CAUSAL_LM", "token_indices": ids,
                "target_modules": "lm_head" if head else "model.embed_tokens", "init_weights": True, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg_json, indent=1))
    return out


# One writer per method, as methods' records name them: (kind, folder, model config, seed) -> the folder.
def synth_ia3(kind: str, out: Path, cfg: Any, seed: int) -> Path:
    return write_peft_ia3(out, cfg.num_hidden_layers, linear_dims_from_config(cfg), seed=seed)


def synth_lora(kind: str, out: Path, cfg: Any, seed: int) -> Path:
    """"lora", "lora<r>", "dora", "dora<r>" (rank 16 by default)."""
    return write_peft_lora(out, cfg.num_hidden_layers, linear_dims_from_config(cfg), r=int(kind[4:] or 16), seed=seed,
                           dora=kind.startswith("dora"))


def synth_prompt(kind: str, out: Path, cfg: Any, seed: int) -> Path:
    """"prompt", "prompt<n>", "prefix", "prefix<n>" (20 virtual tokens by default)."""
    return write_peft_prompt(out, cfg, n=int(kind[6:] or 20), seed=seed, prefix=kind.startswith("prefix"))


def synth_tokens(kind: str, out: Path, cfg: Any, seed: int) -> Path:
    """"tokens", "tokens<n>" (n trained embedding rows, 16 by default), "head" (a whole trained LM head)."""
    if kind == "head":
        return write_peft_tokens(out, cfg, seed=seed, head=True)
    return write_peft_tokens(out, cfg, n=int(kind[6:] or 16), seed=seed)


def synth_bottleneck(kind: str, out: Path, cfg: Any, seed: int) -> Path:
    """"compacter", or a preset of BN_PRESETS."""
    if kind == "compacter":
        return write_adapterhub_compacter(out, cfg.num_hidden_layers, cfg.hidden_size, seed=seed, name=kind)
    return write_adapterhub_bn(out, cfg.num_hidden_layers, cfg.hidden_size, kind, seed=seed, name=kind)


def linear_dims_from_config(cfg: Any) -> dict[str, tuple[int, int]]:
    """The same map from a Llama-family config alone, without building the model."""
    H, inter = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
            "gate_proj": (inter, H), "up_proj": (inter, H), "down_proj": (H, inter)}
