"""Loading and validating checkpoints: typed errors that name the offending key; nothing else accepted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.errors import InvalidAdapterError, UnsupportedAdapterError
from tests.helpers import fixture_dir, parse_folder, tiny_model

MODEL = tiny_model()


def copy(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(fixture_dir(name), d)
    return d


def edit_config(d, fn):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def edit_tensors(d, fn, fname):
    p = d / fname
    ts = load_file(p) if fname.endswith(".safetensors") else torch.load(p, weights_only=True)
    fn(ts)
    if fname.endswith(".safetensors"):
        save_file(ts, p)
    else:
        torch.save(ts, p)


def test_summary_fields():
    w = parse_folder(fixture_dir("seq_bn_leave_out_rf"), MODEL)
    assert w.method == "bottleneck" and w.variant == "seq_bn"
    assert {b.layer for b in w.payload.blocks} == {0, 2}  # layer 1 left out
    assert {b.layer: b.width for b in w.payload.blocks} == {0: 8, 2: 2}  # per-layer reduction factors
    w = parse_folder(fixture_dir("ia3_default"), MODEL)
    assert {(v.module.split(".")[-1], v.side) for v in w.payload.vectors} == {("k_proj", "out"), ("v_proj", "out"), ("down_proj", "in")}
    assert w.num_parameters == 3 * (32 + 32 + 128)


def test_head_files_are_ignored():
    assert (fixture_dir("seq_bn") / "pytorch_model_head.bin").exists()
    assert parse_folder(fixture_dir("seq_bn"), MODEL).variant == "seq_bn"


CASES = [
    # (fixture, mutate(dir), error type, text expected in the message)
    ("ia3_default", lambda d: (d / "adapter_model.safetensors").write_bytes(b"not safetensors at all"), InvalidAdapterError, "adapter_model.safetensors"),
    ("ia3_default", lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]), InvalidAdapterError, "cannot read"),
    ("ia3_default", lambda d: (d / "adapter_config.json").write_text("{nope"), InvalidAdapterError, "not valid JSON"),
    ("ia3_default", lambda d: (d / "adapter_model.safetensors").unlink(), InvalidAdapterError, "missing weight file"),
    ("ia3_default", lambda d: edit_config(d, lambda c: c.update(peft_type="VERA")), UnsupportedAdapterError, "peft_type"),
    ("ia3_default", lambda d: edit_config(d, lambda c: c.update(peft_type="PREFIX_TUNING")), InvalidAdapterError, "num_virtual_tokens"),
    ("prompt_tuning", lambda d: edit_config(d, lambda c: c.update(num_virtual_tokens=7)), InvalidAdapterError, "prompt_embeddings"),
    ("prompt_tuning", lambda d: edit_config(d, lambda c: c.update(token_dim=32)), InvalidAdapterError, "token_dim"),
    ("prompt_tuning", lambda d: edit_config(d, lambda c: c.update(num_layers=2)), InvalidAdapterError, "num_layers"),
    ("prompt_tuning", lambda d: edit_config(d, lambda c: c.update(task_type="SEQ_CLS")), UnsupportedAdapterError, "task_type"),
    ("p_tuning_mlp", lambda d: edit_config(d, lambda c: c.update(num_transformer_submodules=2)), UnsupportedAdapterError,
     "num_transformer_submodules"),
    ("p_tuning_mlp", lambda d: edit_tensors(d, lambda t: t.update(extra=torch.zeros(2)), "adapter_model.safetensors"),
     InvalidAdapterError, "extra"),
    ("prefix_tuning", lambda d: edit_config(d, lambda c: c.update(num_attention_heads=4)), InvalidAdapterError, "num_attention_heads"),
    ("hub_prefix", lambda d: edit_config(d, lambda c: c["config"].update(use_gating=True)), UnsupportedAdapterError, "use_gating"),
    ("hub_prefix", lambda d: edit_config(d, lambda c: c["config"].update(leave_out=[1])), UnsupportedAdapterError, "leave_out"),
    ("hub_prefix", lambda d: edit_config(d, lambda c: c["config"].update(prefix_length=4)), InvalidAdapterError, "wte.weight"),
    ("hub_prefix_flat", lambda d: edit_config(d, lambda c: c["config"].update(flat=False)), InvalidAdapterError, "control_trans"),
    ("hub_prefix", lambda d: edit_tensors(d, lambda t: t.update({k: v + 1 for k, v in t.items() if k.startswith("model.layers.1")}),
                                          "pytorch_adapter.bin"), InvalidAdapterError, "differ"),
    ("prefix_tuning", lambda d: edit_tensors(d, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :96].contiguous()),
                                             "adapter_model.safetensors"), InvalidAdapterError, "prompt_embeddings"),
    ("ia3_default", lambda d: edit_config(d, lambda c: c.update(peft_type="LORA")), InvalidAdapterError, "ia3_l"),
    ("lora_qv", lambda d: edit_config(d, lambda c: c.update(use_dora=True)), InvalidAdapterError, "use_dora"),
    ("lora_qv", lambda d: edit_config(d, lambda c: c.update(modules_to_save=["model.norm"])), UnsupportedAdapterError, "modules_to_save"),
    ("ia3_default", lambda d: edit_config(d, lambda c: c.update(trainable_token_indices=[3, 4])), UnsupportedAdapterError, "trainable_token_indices"),
    ("lora_qv", lambda d: edit_config(d, lambda c: c.update(init_lora_weights="pissa")), UnsupportedAdapterError, "init_lora_weights"),
    ("lora_qv", lambda d: edit_config(d, lambda c: c.update(bias="all")), UnsupportedAdapterError, "bias"),
    ("lora_qv", lambda d: edit_config(d, lambda c: c.update(layer_replication=[[0, 2]])), UnsupportedAdapterError, "layer_replication"),
    # the embedding's and LM head's parts (PEFT's own layouts are in tests/adapters/test_vocab.py)
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}), "adapter_model.safetensors"), InvalidAdapterError, "lm_head.lora_A"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)}), "adapter_model.safetensors"), InvalidAdapterError, "embed_tokens.lora_embedding_A"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64), "base_model.model.lm_head.lora_B.weight": torch.zeros(250, 4)}), "adapter_model.safetensors"), InvalidAdapterError, "lm_head.lora_B"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.lora_magnitude_vector": torch.ones(256)}), "adapter_model.safetensors"), UnsupportedAdapterError, "DoRA"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.lora_B.bias": torch.ones(256)}), "adapter_model.safetensors"), UnsupportedAdapterError, "lm_head.lora_B.bias"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(256, 32)}), "adapter_model.safetensors"), InvalidAdapterError, "lm_head.weight"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(258, 64)}), "adapter_model.safetensors"), InvalidAdapterError, "its LM head 258"),
    ("lora_qv", lambda d: (edit_config(d, lambda c: c.update(trainable_token_indices=[3, 4, 3])),
                           edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(3, 64)}), "adapter_model.safetensors")),
     InvalidAdapterError, "trainable_token_indices"),
    ("lora_qv", lambda d: (edit_config(d, lambda c: c.update(trainable_token_indices=[3, 4])),
                           edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(3, 64)}), "adapter_model.safetensors")),
     InvalidAdapterError, "trainable_tokens_delta"),
    ("lora_qv", lambda d: (edit_config(d, lambda c: c.update(trainable_token_indices=[3, 300])),
                           edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)}), "adapter_model.safetensors")),
     InvalidAdapterError, "ids 256..299"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)}), "adapter_model.safetensors"),
     InvalidAdapterError, "trainable_token_indices"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(258, 64)}), "adapter_model.safetensors"),
     InvalidAdapterError, "its LM head 256"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}), "adapter_model.safetensors"), InvalidAdapterError, "lora_bias"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 5)}), "adapter_model.safetensors"), InvalidAdapterError, "q_proj.lora_B"),
    ("lora_qv", lambda d: edit_tensors(d, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"), "adapter_model.safetensors"), InvalidAdapterError, "v_proj"),
    ("ia3_default", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.zz_proj.ia3_l": torch.ones(32, 1)}), "adapter_model.safetensors"), InvalidAdapterError, "zz_proj"),
    ("ia3_default", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.7.self_attn.k_proj.ia3_l": torch.ones(32, 1)}), "adapter_model.safetensors"), InvalidAdapterError, "layers.7"),
    ("ia3_default", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.ones(33, 1)}), "adapter_model.safetensors"), InvalidAdapterError, "k_proj"),
    ("ia3_default", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(64, 1)}), "adapter_model.safetensors"), InvalidAdapterError, "down_proj"),
    ("ia3_default", lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.full((32, 1), float("nan"))}), "adapter_model.safetensors"), InvalidAdapterError, "NaN"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(phm_layer=True)), InvalidAdapterError, "phm_rule"),
    ("compacter", lambda d: edit_config(d, lambda c: c["config"].update(factorized_phm_rule=True)), UnsupportedAdapterError, "factorized_phm_rule"),
    ("compacter", lambda d: edit_config(d, lambda c: c["config"].update(shared_phm_rule=False)), UnsupportedAdapterError, "shared_phm_rule"),
    ("compacter", lambda d: edit_config(d, lambda c: c["config"].update(shared_W_phm=True)), UnsupportedAdapterError, "shared_W_phm"),
    ("compacter", lambda d: edit_config(d, lambda c: c["config"].update(phm_dim=2)), InvalidAdapterError, "phm_rule"),
    ("hub_lora_qv", lambda d: edit_config(d, lambda c: c["config"].update(use_gating=True)), UnsupportedAdapterError, "use_gating"),
    ("hub_lora_qv", lambda d: edit_config(d, lambda c: c["config"].update(use_dora=True)), UnsupportedAdapterError, "use_dora"),
    ("hub_lora_qv", lambda d: edit_config(d, lambda c: c["config"].update(vera_d=0.1)), UnsupportedAdapterError, "vera_d"),
    ("hub_lora_qv", lambda d: edit_config(d, lambda c: c["config"].update(attn_matrices=["q"])), InvalidAdapterError, "v_proj"),
    ("hub_lora_qv", lambda d: edit_config(d, lambda c: c["config"].update(r=5)), InvalidAdapterError, "lora_A"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(use_gating=True)), UnsupportedAdapterError, "use_gating"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(residual_before_ln="post_add")), UnsupportedAdapterError, "post_add"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(stochastic_depth=0.1)), UnsupportedAdapterError, "stochastic_depth"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(inv_adapter="nice")), UnsupportedAdapterError, "inv_adapter"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(non_linearity="wiggle")), InvalidAdapterError, "non_linearity"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(architecture="union")), UnsupportedAdapterError, "architecture"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c.update(hidden_size=128)), InvalidAdapterError, "hidden size"),
    ("seq_bn", lambda d: edit_config(d, lambda c: c["config"].update(leave_out=[0])), InvalidAdapterError, "leave_out"),
    ("seq_bn", lambda d: edit_tensors(d, lambda t: t.update({"model.layers.9.output_adapters.adapters.seq_bn.adapter_up.bias": torch.zeros(64)}), "pytorch_adapter.bin"), InvalidAdapterError, "layer 9"),
    ("seq_bn", lambda d: edit_tensors(d, lambda t: t.update({"model.layers.0.output_adapters.adapters.seq_bn.adapter_up.weight": torch.zeros(64, 5)}), "pytorch_adapter.bin"), InvalidAdapterError, "adapter_up.weight"),
    ("seq_bn", lambda d: edit_tensors(d, lambda t: t.pop("model.layers.0.output_adapters.adapters.seq_bn.adapter_up.bias"), "pytorch_adapter.bin"), InvalidAdapterError, "adapter_up.bias"),
    ("seq_bn", lambda d: edit_tensors(d, lambda t: t.update({"model.layers.0.attention_adapters.adapters.seq_bn.adapter_up.bias": torch.zeros(64)}), "pytorch_adapter.bin"), InvalidAdapterError, "mh_adapter"),
    ("seq_bn", lambda d: edit_tensors(d, lambda t: t.update({"model.layers.0.output_adapters.adapters.seq_bn.adapter_up.bias": torch.full((64,), float("inf"))}), "pytorch_adapter.bin"), InvalidAdapterError, "NaN or Inf"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c[3][:14]}" for i, c in enumerate(CASES)])
def test_bad_checkpoint_gives_typed_error_naming_the_key(tmp_path, case):
    name, mutate, err, text = case
    d = copy(tmp_path, name)
    mutate(d)
    with pytest.raises(err, match=None) as info:
        parse_folder(d, MODEL)
    assert text in str(info.value)


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/adapter_server_pwned",))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    import os
    import pickle

    marker = "/tmp/adapter_server_pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    d = copy(tmp_path, "seq_bn")
    with open(d / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({"x": Boom()}, f)
    with pytest.raises(InvalidAdapterError, match="pytorch_adapter.bin"):
        parse_folder(d, MODEL)
    assert not os.path.exists(marker)


def test_adapterhub_lora_before_1_1_keeps_the_scaling_it_was_trained_with(tmp_path):
    """adapters < 1.1.0 used scaling 1.0 whenever r != alpha; the library loads such files that way."""
    d = copy(tmp_path, "hub_lora_qv")
    assert {m.scale for m in parse_folder(d, MODEL).payload.modules} == {2.0}  # alpha 8 / r 4
    edit_config(d, lambda c: c.update(version="adapters.1.0.1"))
    assert {m.scale for m in parse_folder(d, MODEL).payload.modules} == {1.0}
