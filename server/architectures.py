"""The decoder architectures served, each described once as plain data (no torch).

The model runner, the model loader and the adapter formats read these facts; nothing else asks which
model type a base is. One runner serves every description: it calls the library's own modules (its
norms, activations, scaled embeddings and rotary embedding) in the order a description gives, over our
KV cache, with the adapters' hook points at every Linear, at each routed MLP's expert products (whose
router and expert weights it reads, engine/moe.py) and at each sub-block's residual add.

Adding an architecture is one description here and a tiny config in tests/fixtures/make_arch_fixtures.py,
whose fixtures tests/engine/test_architectures.py checks every family against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # Hugging Face `config.model_type` values it covers
    # Where the text decoder sits in the causal-LM module (its layers, embed_tokens, norm, rotary_emb).
    decoder: str = "model"
    # The decoder's config inside the top-level one ("text_config" for a multimodal folder), or "".
    text_config: str = ""
    # Modules of the whole model that are not the text decoder: an adapter that targets them is refused.
    refused_modules: tuple[tuple[str, str], ...] = ()  # (module path prefix, what it is)
    # Attention projections: three Linears, or one fused Linear whose output is q | k | v (Phi-3).
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    # The MLP's gate and up: two Linears, or one fused Linear whose output is gate | up (Phi-3).
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    act: str = "act_fn"  # the MLP's activation attribute (the library's own function: SiLU, GELU-tanh)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys after the projections, before rotary
    # Norms on a sub-block's output before its residual add (Gemma: post_attention_layernorm,
    # post_feedforward_layernorm), and the norm that feeds the MLP.
    attn_out_norm: str = ""
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out_norm: str = ""
    # Soft-capping, as `cap * tanh(x / cap)`, read from these config fields where the library applies it.
    attn_softcap: str = ""  # attention logits (Gemma 2; Gemma 3's config has the field but transformers never uses it)
    final_softcap: str = ""  # the final logits (Gemma 2 and 3): it changes every logprob
    rope_per_layer_type: bool = False  # rotary_emb(x, pos, layer_type): own bases on sliding and full layers (Gemma 3)
    norm_w_plus_one: bool = False  # RMSNorm scales by (1 + w) in float32 (Gemma): the compiled Llama norm does not apply
    moe: bool = False  # some layers' `mlp` is a routed block: `gate` (router) and `experts` (fused 3-D weights)
    # The router's top-k weights: renormalised to sum 1 where this config field says so ("" always), and
    # cast back to the model's dtype (Qwen3-MoE) or kept in float32 (Mixtral), as the library does.
    moe_renormalize: str = ""
    moe_weights_in_model_dtype: bool = False
    # How AdapterHub `adapters` 1.3.0 attaches to this base: "modules" (its own Llama-family modules),
    # "interface" (its plugin interface: bottlenecks hooked on the output of o_proj and down_proj, with the
    # post-norm, if any, as the "original" layer norm; no prefix tuning), or "" (no support).
    adapterhub: str = ""

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.gate_up) == 1

    @property
    def llama_layout(self) -> bool:
        """The compiled Llama kernels (RMSNorm x * w, SiLU-and-multiply, residual add + the next norm)
        reproduce these layers."""
        return not (self.norm_w_plus_one or self.attn_out_norm or self.mlp_out_norm or self.fused_gate_up or self.moe)


_GEMMA = dict(norm_w_plus_one=True, attn_out_norm="post_attention_layernorm", mlp_in_norm="pre_feedforward_layernorm",
              mlp_out_norm="post_feedforward_layernorm", final_softcap="final_logit_softcapping")

LLAMA = Architecture("llama", ("llama", "mistral"), adapterhub="modules")
QWEN2 = Architecture("qwen2", ("qwen2",), adapterhub="interface")
QWEN3 = Architecture("qwen3", ("qwen3",), qk_norm=True, adapterhub="interface")
GEMMA2 = Architecture("gemma2", ("gemma2",), attn_softcap="attn_logit_softcapping", adapterhub="interface",
                      **_GEMMA)  # type: ignore[arg-type]
GEMMA3 = Architecture("gemma3", ("gemma3_text",), qk_norm=True, rope_per_layer_type=True, adapterhub="interface",
                      **_GEMMA)  # type: ignore[arg-type]
GEMMA3_MM = Architecture("gemma3 (text of a multimodal folder)", ("gemma3",), decoder="model.language_model",
                         text_config="text_config", qk_norm=True, rope_per_layer_type=True,
                         refused_modules=(("model.vision_tower", "the vision tower"),
                                          ("model.multi_modal_projector", "the multimodal projector")),
                         **{**_GEMMA, "final_softcap": ""})  # type: ignore[arg-type]
# (transformers' Gemma3ForConditionalGeneration never applies its text config's final_logit_softcapping,
# which Gemma3ForCausalLM does; released Gemma 3 configs set none, so both agree on real checkpoints.)
PHI3 = Architecture("phi3", ("phi3",), qkv=("qkv_proj",), gate_up=("gate_up_proj",), act="activation_fn")
QWEN3_MOE = Architecture("qwen3_moe", ("qwen3_moe",), qk_norm=True, moe=True, moe_renormalize="norm_topk_prob",
                         moe_weights_in_model_dtype=True)
MIXTRAL = Architecture("mixtral", ("mixtral",), moe=True)

ARCHITECTURES = (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, GEMMA3_MM, PHI3, QWEN3_MOE, MIXTRAL)
BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ARCHITECTURES for t in a.model_types}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BY_MODEL_TYPE)
# Model types people ask for that are refused with a reason rather than the generic list.
REFUSED_TYPES: dict[str, str] = {
    "gemma3n": "Gemma 3n's per-layer embeddings, AltUp and Laurel blocks are not served",
    "gemma3n_text": "Gemma 3n's per-layer embeddings, AltUp and Laurel blocks are not served",
}


def architecture(model_type: str) -> Architecture:
    """The description of `model_type`; ValueError naming it (and what is served) when there is none."""
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        why = REFUSED_TYPES.get(model_type, "")
        raise ValueError(f"model type {model_type!r} is not supported{': ' + why if why else ''}; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    return arch


def text_config(config: Any) -> Any:
    """The text decoder's config: the model's own, or its `text_config` for a multimodal folder."""
    arch = architecture(str(getattr(config, "model_type", "")))
    return getattr(config, arch.text_config) if arch.text_config else config


def decoder(model: Any) -> Any:
    """The text decoder module of a causal LM (its layers, embed_tokens, norm and rotary_emb)."""
    arch = architecture(str(getattr(getattr(model, "config", None), "model_type", "")))
    out = model
    for part in arch.decoder.split("."):
        out = getattr(out, part)
    return out
