"""HF PEFT (IA)3, LoRA, prompt, P- and prefix tuning, trainable tokens: adapter_config.json +
adapter_model.safetensors|.bin (docs/adapters.md §3.2, §4.1-§4.3, §6, §10). Any of them may also hold a
trained embedding or LM head (peft_vocab.py), served beside the family's own part."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidAdapterError, UnsupportedAdapterError
from ..methods.ia3 import IA3Vector, IA3Weights
from ..methods.lora import LoRAExperts, LoRAModule, LoRAWeights
from ..methods.prefix import PrefixWeights, PromptWeights
from ..spec import EXPERT_PARAMS, AdapterWeights, BaseModelInfo
from .peft_vocab import split_vocab
from .tensors import expect_shape, load_tensors, pick_weight_file

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
SUFFIX = ".ia3_l"


def _matches(name: str, spec: str | list[str] | None, *, plain_endswith: bool = False) -> bool:
    """PEFT's module matching: a regex string must match the full name; a list entry matches by suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    if plain_endswith:
        return any(name.endswith(e) for e in spec)
    return any(name == e or name.endswith("." + e) for e in spec)


def _check_spec(cfg: dict[str, Any], field: str) -> str | list[str] | None:
    v = cfg.get(field)
    if v is None or isinstance(v, str):
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise InvalidAdapterError(f"{field} is not a valid regex: {e}", key=field) from e
        return v
    if isinstance(v, list) and all(isinstance(e, str) for e in v):
        return v
    raise InvalidAdapterError(f"{field} must be a list of names or one regex string", key=field)


def _refuse_outside(base: BaseModelInfo, module: str, key: str) -> None:
    what = base.outside(module)
    if what is not None:
        raise UnsupportedAdapterError(f"the adapter targets {what} ({module}) of this {base.model_type} model; "
                                      "adapters are served on its text decoder only", key=key)


SERVED_TYPES = ("IA3", "LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "TRAINABLE_TOKENS")


def parse(cfg: dict[str, Any], files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    ptype = cfg.get("peft_type")
    if ptype not in SERVED_TYPES:
        raise UnsupportedAdapterError(f"peft_type {ptype!r} is not served; {', '.join(SERVED_TYPES)} are", key="peft_type")
    if ptype == "LORA":
        _refuse_lora_options(cfg)
    elif cfg.get("trainable_token_indices") not in (None, [], {}):
        raise UnsupportedAdapterError(f"trainable_token_indices on a {ptype} config", key="trainable_token_indices")
    tensors = load_tensors(pick_weight_file(files, WEIGHT_FILES))
    if not tensors:
        raise InvalidAdapterError("weight file holds no tensors", key=WEIGHT_FILES[0])
    rslora = bool(cfg.get("use_rslora", False))
    tensors, vocab = split_vocab(cfg, tensors, base, lambda module, r: _alpha(cfg, module) / (math.sqrt(r) if rslora else r))
    if ptype == "TRAINABLE_TOKENS" or (vocab is not None and not tensors and ptype in ("LORA", "IA3")):
        # an embedding or LM head of its own and nothing in the decoder layers: served as that alone
        if tensors:
            raise InvalidAdapterError("a TRAINABLE_TOKENS file holds trained rows of the embedding or LM head only",
                                      key=sorted(tensors)[0])
        if vocab is None:
            raise InvalidAdapterError("the trained rows equal the base model's: nothing to serve", key=WEIGHT_FILES[0])
        return AdapterWeights(method="vocab", format="peft", variant=ptype.lower(), payload=vocab, config=cfg)
    if ptype == "LORA":
        w = parse_lora(cfg, tensors, base)
    elif ptype in PROMPT_VARIANTS:
        w = parse_prompt(cfg, tensors, base)
    else:
        w = parse_ia3(cfg, tensors, base)
    if vocab is not None:
        w.extras["vocab"] = vocab
    return w


def parse_ia3(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> AdapterWeights:
    targets = _check_spec(cfg, "target_modules")
    ff = _check_spec(cfg, "feedforward_modules")
    if not tensors:
        raise InvalidAdapterError("weight file holds no (IA)3 vectors", key=WEIGHT_FILES[0])

    vectors: list[IA3Vector] = []
    for key, t in sorted(tensors.items()):
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            raise InvalidAdapterError("not a PEFT (IA)3 tensor name (base_model.model.<module>.ia3_l)", key=key)
        module = key[len(PREFIX) : -len(SUFFIX)]
        _refuse_outside(base, module, key)
        if module not in base.linears:
            raise InvalidAdapterError("the base model has no Linear module of that name in its layers", key=key)
        if targets is not None and not _matches(module, targets):
            raise InvalidAdapterError("module is not named by target_modules", key=key)
        out_f, in_f = base.linears[module]
        is_ff = _matches(module, ff, plain_endswith=True)
        shape = tuple(t.shape)
        if shape == (out_f, 1) and (not is_ff or out_f == in_f == 1):
            vectors.append(IA3Vector(module, "out", t.reshape(out_f).clone()))
        elif shape == (1, in_f) and is_ff:
            vectors.append(IA3Vector(module, "in", t.reshape(in_f).clone()))
        else:
            expected = (1, in_f) if is_ff else (out_f, 1)
            kind = "feedforward (input scaling)" if is_ff else "output scaling"
            raise InvalidAdapterError(
                f"shape {shape} does not fit {kind} of this module, expected {expected}", key=key
            )
    return AdapterWeights(method="ia3", format="peft", variant="ia3", payload=IA3Weights(vectors), config=cfg)


# LoRA options whose meaning we do not reproduce (docs/adapters.md §4.2): refused, naming the field.
LORA_REFUSED = {
    "layer_replication": "layer replication changes the model's layers",
    "alora_invocation_tokens": "activated LoRA is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "arrow_config": "Arrow routing is not served",
    "use_qalora": "QA-LoRA is not served",
    "megatron_config": "Megatron-parallel LoRA is not served",
}
LORA_INITS = (True, False, "gaussian", "orthogonal", "eva")  # inits that leave the base weights as they are
LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
# LoRA on a parameter (`target_parameters`): PEFT nests one wrapper per targeted parameter of a module, so
# the saved keys are <module>(.base_layer)*.lora_A.weight and say nothing of which parameter each is.
NESTED = re.compile(r"^(.+?)((?:\.base_layer)*)$")


def _refuse_lora_options(cfg: dict[str, Any]) -> None:
    for field, why in LORA_REFUSED.items():
        if cfg.get(field) not in (None, False, [], {}):
            raise UnsupportedAdapterError(f"{field} is set: {why}", key=field)
    init = cfg.get("init_lora_weights", True)
    if init not in LORA_INITS:
        raise UnsupportedAdapterError(
            f"init_lora_weights {init!r} rewrites the base weights at load; save the adapter converted "
            "(path_initial_model_for_weight_conversion) to serve it as plain LoRA", key="init_lora_weights")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapterError("bias other than 'none' trains the base model's biases", key="bias")
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedAdapterError("fan_in_fan_out is for Conv1D models, not this one", key="fan_in_fan_out")


def _alpha(cfg: dict[str, Any], module: str) -> float:
    """The first alpha_pattern key, in file order, that matches the module path; else lora_alpha."""
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise InvalidAdapterError(f"alpha_pattern key {key!r} is not a valid regex: {e}", key="alpha_pattern") from e
        if hit:
            return float(value)
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InvalidAdapterError("lora_alpha must be a number", key="lora_alpha")
    return float(alpha)


def parse_lora(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> AdapterWeights:
    """Modules and ranks come from the tensors (they already reflect target_modules, rank_pattern and
    layers_to_transform); alpha from alpha_pattern / lora_alpha; scaling alpha / r or alpha / sqrt(r).
    The embedding's and LM head's tensors were taken out before (peft_vocab.py)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    expert_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        if m is None:
            raise InvalidAdapterError("not a PEFT LoRA tensor name (base_model.model.<module>.lora_A.weight / "
                                      "lora_B.weight / lora_B.bias)", key=key)
        module, part = m.group(1), m.group(2)
        _refuse_outside(base, module, key)
        if NESTED.match(module).group(1) in base.experts:  # type: ignore[union-attr]  # a wrapper on expert weights
            expert_parts.setdefault(module, {})[part] = t
            continue
        if module not in base.linears:
            raise UnsupportedAdapterError("LoRA is served on the Linears of the decoder layers only", key=key)
        parts.setdefault(module, {})[part] = t
    if any("lora_B.bias" in p for p in parts.values()) and not cfg.get("lora_bias"):
        raise InvalidAdapterError("a lora_B.bias tensor without lora_bias in the config", key="lora_bias")
    rslora, dora = bool(cfg.get("use_rslora", False)), bool(cfg.get("use_dora", False))
    if dora != any("lora_magnitude_vector" in p for p in parts.values()):
        raise InvalidAdapterError("use_dora and the lora_magnitude_vector tensors disagree", key="use_dora")
    modules = []
    for module, p in sorted(parts.items()):
        key = PREFIX + module
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            raise InvalidAdapterError("a LoRA module needs both lora_A.weight and lora_B.weight", key=key + ".lora_A.weight")
        out_f, in_f = base.linears[module]
        A, B = p["lora_A.weight"], p["lora_B.weight"]
        r = A.shape[0]
        if A.dim() != 2 or r < 1:
            raise InvalidAdapterError(f"shape {tuple(A.shape)} is not (r, {in_f})", key=key + ".lora_A.weight")
        expect_shape(key + ".lora_A.weight", A, (r, in_f))
        expect_shape(key + ".lora_B.weight", B, (out_f, r))
        bias = p.get("lora_B.bias")
        if bias is not None:
            expect_shape(key + ".lora_B.bias", bias, (out_f,))
        magnitude = p.get("lora_magnitude_vector")
        if dora:
            if magnitude is None:
                raise InvalidAdapterError("a DoRA module needs its lora_magnitude_vector", key=key + ".lora_magnitude_vector")
            expect_shape(key + ".lora_magnitude_vector", magnitude, (out_f,))
        # a router is a parameter target (PEFT keys its patterns by the parameter's name)
        router = module.endswith(".gate") and module[: -len(".gate")] + ".experts" in base.experts
        alpha = _alpha(cfg, module + ".weight" if router else module)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules.append(LoRAModule(module, A.clone(), B.clone(), None if bias is None else bias.clone(), scale,
                                  None if magnitude is None else magnitude.clone()))
    experts = _expert_lora(cfg, expert_parts, base, rslora)
    if experts and dora:
        raise UnsupportedAdapterError("DoRA on expert parameters is not served", key="use_dora")
    variant = ("rs" if rslora else "") + ("dora" if dora else "lora")
    return AdapterWeights(method="dora" if dora else "lora", format="peft", variant=variant,
                          payload=LoRAWeights(modules, experts), config=cfg)


def _expert_lora(cfg: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]], base: BaseModelInfo,
                 rslora: bool) -> list[LoRAExperts]:
    """LoRA on a routed MLP's fused 3-D expert weights (PEFT's ParamWrapper). lora_A [r * E, in] holds
    expert e's A at rows e * r .. e * r + r - 1; lora_B [out, r * E] holds expert e's B at columns
    e, E + e, 2E + e, ... (PEFT reshapes it [out, r, E]); the delta of expert e is s * B_e @ A_e, added to
    its [out, in] weight. Which parameter a (nested) wrapper holds is read from the shapes: gate_up_proj
    is [2I, H] per expert and down_proj [H, I], never the same."""
    targets = cfg.get("target_parameters") or []
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise InvalidAdapterError("target_parameters must be a list of parameter names", key="target_parameters")
    if parts and not targets:
        raise InvalidAdapterError("LoRA tensors on expert weights without target_parameters", key="target_parameters")
    for name in targets:
        if not (name.endswith(EXPERT_PARAMS) or name.endswith("gate.weight")):
            raise UnsupportedAdapterError(f"target_parameters entry {name!r} is not served: LoRA on a routed "
                                          "MLP's expert weights (gate_up_proj, down_proj) and its router (gate.weight) "
                                          "is", key="target_parameters")
    out: list[LoRAExperts] = []
    seen: set[tuple[str, str]] = set()
    for wrapper, p in sorted(parts.items()):
        module = NESTED.match(wrapper).group(1)  # type: ignore[union-attr]
        key = PREFIX + wrapper + ".lora_A.weight"
        if "lora_A.weight" not in p or "lora_B.weight" not in p or set(p) - {"lora_A.weight", "lora_B.weight"}:
            raise InvalidAdapterError("expert LoRA needs exactly lora_A.weight and lora_B.weight", key=key)
        A, B = p["lora_A.weight"], p["lora_B.weight"]
        shapes = base.experts[module]
        fits = [n for n, (E, o, i) in shapes.items() if A.dim() == 2 and B.dim() == 2 and A.shape[1] == i
                and B.shape[0] == o and A.shape[0] == B.shape[1] and A.shape[0] % E == 0 and A.shape[0] >= E]
        if len(fits) != 1:
            raise InvalidAdapterError(f"shapes {tuple(A.shape)}, {tuple(B.shape)} fit none of this module's expert "
                                      f"weights {shapes} (lora_A [r * experts, in], lora_B [out, r * experts])", key=key)
        name = fits[0]
        if (module, name) in seen:
            raise InvalidAdapterError(f"two LoRA wrappers on {module}.{name}", key=key)
        seen.add((module, name))
        E, o, i = shapes[name]
        r = A.shape[0] // E
        alpha = _alpha(cfg, f"{module}.{name}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        out.append(LoRAExperts(module, name, A.reshape(E, r, i).clone(), B.reshape(o, r, E).permute(2, 0, 1).contiguous(),
                               scale))
    return out


PROMPT_VARIANTS = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
PROMPT_KEY = "prompt_embeddings"


def _expect(cfg: dict[str, Any], field: str, want: int, what: str) -> None:
    if cfg.get(field, want) != want:
        raise InvalidAdapterError(f"{field} is {cfg.get(field)!r}, but the base model's {what} is {want}", key=field)


def parse_prompt(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> AdapterWeights:
    """PEFT prompt tuning, P-tuning and prefix tuning (docs/adapters.md §6.1, §6.2, §6.4): one tensor,
    `prompt_embeddings`, already the encoder's output for P-tuning and projected prefixes."""
    variant = PROMPT_VARIANTS[cfg["peft_type"]]
    n = cfg.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidAdapterError("num_virtual_tokens must be a positive integer", key="num_virtual_tokens")
    if cfg.get("num_transformer_submodules", 1) not in (1, None):
        raise UnsupportedAdapterError("num_transformer_submodules other than 1 is for encoder-decoder models",
                                      key="num_transformer_submodules")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise UnsupportedAdapterError(f"task_type {cfg.get('task_type')!r} is not served; CAUSAL_LM is", key="task_type")
    if set(tensors) != {PROMPT_KEY}:
        extra = sorted(set(tensors) - {PROMPT_KEY}) or [PROMPT_KEY]
        raise InvalidAdapterError(f"a PEFT {variant} file holds one tensor, {PROMPT_KEY}", key=extra[0])
    t = tensors[PROMPT_KEY].float()
    _expect(cfg, "num_layers", base.num_layers, "number of layers")
    if variant != "prefix_tuning":
        _expect(cfg, "token_dim", base.hidden_size, "hidden size")
        expect_shape(PROMPT_KEY, t, (n, base.hidden_size))
        return AdapterWeights(method="prompt", format="peft", variant=variant, payload=PromptWeights(t.contiguous()),
                              config=cfg)
    L, kvh, d = base.num_layers, base.num_kv_heads, base.head_dim
    _expect(cfg, "token_dim", kvh * d, "key/value width (KV heads x head size)")
    _expect(cfg, "num_attention_heads", kvh, "number of KV heads")
    expect_shape(PROMPT_KEY, t, (n, L * 2 * kvh * d))
    kv = t.view(n, L * 2, kvh, d).permute(1, 2, 0, 3)  # [2L, kvh, N, d]: layer l's keys at 2l, values at 2l + 1
    return AdapterWeights(method="prefix", format="peft", variant=variant,
                          payload=PrefixWeights(kv[0::2].contiguous(), kv[1::2].contiguous(), 0), config=cfg)
