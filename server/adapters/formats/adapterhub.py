"""AdapterHub `adapters` checkpoints: bottleneck (seq_bn, double_seq_bn, par_bn, ...), (IA)3, LoRA
(docs/adapters.md §5, §3.3, §4.4) and prefix tuning (§6.3, in adapterhub_prefix.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers.activations import ACT2FN

from ...architectures import Architecture, architecture
from ...errors import InvalidAdapterError, UnsupportedAdapterError
from ..methods.bottleneck import BottleneckBlock, BottleneckOptions, BottleneckWeights
from ..methods.ia3 import IA3Vector, IA3Weights
from ..methods.lora import LoRAModule, LoRAWeights
from ..spec import AdapterWeights, BaseModelInfo, Location
from .adapterhub_prefix import parse_prefix
from .tensors import expect_shape, load_tensors, pick_weight_file

WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
LOCATIONS: dict[str, Location] = {"attention_adapters": "attn", "output_adapters": "mlp"}
BN_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\.(.+)$")
IA3_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.loras\.([^.]+)\.(lora_A|lora_B)$")
ACTIVATIONS = set(ACT2FN) | {"leakyrelu"}


def _refuse(c: dict[str, Any]) -> None:
    """Options the library offers that we refuse rather than serve wrongly."""
    if c.get("phm_layer"):  # Compacter: the PHM options whose exact meaning was checked (docs/adapters.md §5.5)
        for field, ok in (("factorized_phm_rule", False), ("shared_phm_rule", True), ("shared_W_phm", False),
                          ("factorized_phm_W", True), ("phm_bias", True), ("learn_phm", True)):
            if c.get(field, ok) != ok:
                raise UnsupportedAdapterError(f"Compacter with {field}={c.get(field)!r} is not served", key=f"config.{field}")
    if c.get("use_gating"):
        raise UnsupportedAdapterError("gated bottleneck adapters (use_gating) are not served", key="config.use_gating")
    if c.get("inv_adapter"):
        raise UnsupportedAdapterError("invertible adapters (inv_adapter) are not served", key="config.inv_adapter")
    if float(c.get("stochastic_depth") or 0.0) > 0:
        raise UnsupportedAdapterError("stochastic_depth > 0 is not served", key="config.stochastic_depth")
    if c.get("residual_before_ln") == "post_add":
        raise UnsupportedAdapterError("residual_before_ln 'post_add' is not served", key="config.residual_before_ln")


def _bool(c: dict[str, Any], name: str, default: bool) -> bool:
    v = c.get(name, default)
    if not isinstance(v, bool):
        raise InvalidAdapterError(f"{name} must be true or false", key=f"config.{name}")
    return v


def parse(meta: dict[str, Any], files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    arch = architecture(base.model_type)
    how = arch.adapterhub
    if not how:
        raise UnsupportedAdapterError(
            f"AdapterHub adapters are not served on {base.model_type} base models: AdapterHub 1.3.0 does not "
            "support this architecture; PEFT adapters are", key="config")
    _check_interface(files, base, arch)
    c = meta["config"]
    if how == "interface":  # what the library itself refuses or lacks on the bases it serves through its interface
        if c.get("architecture") == "prefix_tuning":
            raise UnsupportedAdapterError(f"AdapterHub offers no prefix tuning on {base.model_type} (its plugin "
                                          "interface has bottleneck, LoRA and (IA)3 only)", key="config.architecture")
        if c.get("architecture") is None and c.get("original_ln_after", True) is False:
            raise UnsupportedAdapterError(f"original_ln_after false: AdapterHub refuses it on {base.model_type} "
                                          "(bottleneck layer hooking mode)", key="config.original_ln_after")
    hidden = meta.get("hidden_size")
    if hidden is not None and hidden != base.hidden_size:
        raise InvalidAdapterError(
            f"adapter was trained for hidden size {hidden}, the base model has {base.hidden_size}", key="hidden_size"
        )
    arch = c.get("architecture")
    if arch == "lora" and c.get("composition_mode") == "scale":
        return _parse_ia3(meta, files, base)
    if arch == "lora" and c.get("composition_mode", "add") == "add":
        return _parse_lora(meta, files, base)
    if arch == "prefix_tuning":
        return parse_prefix(meta, files, base, WEIGHT_FILES)
    if arch is not None:
        raise UnsupportedAdapterError(f"AdapterHub architecture {arch!r} is not served", key="config.architecture")
    return _parse_bottleneck(meta, files, base)


INTERFACE_FILE = "adapter_interface.json"


def _check_interface(files: dict[str, Path], base: BaseModelInfo, arch: Architecture) -> None:
    """An adapter saved through AdapterHub's plugin interface records the interface it was trained with.
    We place adapters as adapters 1.3.0's own interface for this base does (derived from the architecture
    description); one trained with another (a custom interface, or one on a base served by the library's
    own modules) would be served wrongly, so it is refused naming the field that differs."""
    path = files.get(INTERFACE_FILE)
    if path is None:
        return
    try:
        saved = json.loads(path.read_text())["interface"]
        assert isinstance(saved, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise InvalidAdapterError(f"{INTERFACE_FILE} is not an AdapterHub interface file: {e}", key=INTERFACE_FILE) from e
    if arch.adapterhub != "interface":
        raise UnsupportedAdapterError(f"the adapter was saved through a custom AdapterHub interface; on {base.model_type} "
                                      "the library's own modules are served", key=INTERFACE_FILE)
    q, k, v = arch.qkv if len(arch.qkv) == 3 else (None, None, None)
    want = {"model_layers": "layers", "layer_self_attn": "self_attn", "attn_q_proj": q, "attn_k_proj": k,
            "attn_v_proj": v, "attn_o_proj": "o_proj", "layer_intermediate_proj": "mlp.up_proj",
            "layer_output_proj": "mlp.down_proj", "layer_pre_self_attn": "input_layernorm",
            "layer_pre_ffn": arch.mlp_in_norm, "layer_ln_1": arch.attn_out_norm or None,
            "layer_ln_2": arch.mlp_out_norm or None}
    for field, value in want.items():
        if saved.get(field) != value:
            raise UnsupportedAdapterError(f"the adapter's interface sets {field} to {saved.get(field)!r}; adapters "
                                          f"1.3.0's interface for {base.model_type}, which we serve, has {value!r}",
                                          key=f"{INTERFACE_FILE}.{field}")


def _options(c: dict[str, Any]) -> BottleneckOptions:
    _refuse(c)
    act = str(c.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        raise InvalidAdapterError(f"unknown non_linearity {act!r}", key="config.non_linearity")
    rbl = c.get("residual_before_ln", True)
    if not isinstance(rbl, bool):
        raise InvalidAdapterError("residual_before_ln must be true, false or 'post_add'", key="config.residual_before_ln")
    return BottleneckOptions(
        parallel=_bool(c, "is_parallel", False),
        original_ln_before=_bool(c, "original_ln_before", False),
        original_ln_after=_bool(c, "original_ln_after", True),
        residual_before_ln=rbl,
        adapter_residual_before_ln=_bool(c, "adapter_residual_before_ln", False),
        non_linearity=act,
    )


def _scaling(c: dict[str, Any]) -> float | str:
    s = c.get("scaling", 1.0)
    if isinstance(s, bool) or not (isinstance(s, (int, float)) or s in ("learned", "channel")):
        raise InvalidAdapterError(f"scaling must be a number, 'learned' or 'channel', got {s!r}", key="config.scaling")
    return float(s) if isinstance(s, (int, float)) else s


def _leave_out(c: dict[str, Any], num_layers: int) -> set[int]:
    lo = c.get("leave_out") or []
    if not isinstance(lo, list) or not all(isinstance(i, int) for i in lo):
        raise InvalidAdapterError("leave_out must be a list of layer indices", key="config.leave_out")
    return set(lo)


def _parse_bottleneck(meta: dict[str, Any], files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    c = meta["config"]
    opts = _options(c)
    scaling = _scaling(c)
    leave_out = _leave_out(c, base.num_layers)
    name = meta.get("name")
    ln_before, ln_after = _bool(c, "ln_before", False), _bool(c, "ln_after", False)
    allowed = {"attn": _bool(c, "mh_adapter", False), "mlp": _bool(c, "output_adapter", True)}
    H = base.hidden_size
    tensors = load_tensors(pick_weight_file(files, WEIGHT_FILES))
    k = 1 if ln_before else 0
    phm = _bool(c, "phm_layer", False)
    phm_params = 0
    if phm:
        tensors, phm_params = _dense_from_phm(tensors, c, str(name), H, k)

    # 1. group tensors by (layer, location), checking names against the config and the base model
    groups: dict[tuple[int, Location], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = BN_KEY.match(key)
        if m is None:
            raise InvalidAdapterError("not an AdapterHub bottleneck tensor name", key=key)
        layer, loc, aname, param = int(m.group(1)), LOCATIONS[m.group(2)], m.group(3), m.group(4)
        if name is not None and aname != name:
            raise InvalidAdapterError(f"tensor belongs to adapter {aname!r}, the config names {name!r}", key=key)
        if not 0 <= layer < base.num_layers:
            raise InvalidAdapterError(f"layer {layer} is past the base model's {base.num_layers} layers", key=key)
        if layer in leave_out:
            raise InvalidAdapterError(f"layer {layer} is in leave_out but has tensors", key=key)
        if not allowed[loc]:
            flag = "mh_adapter" if loc == "attn" else "output_adapter"
            raise InvalidAdapterError(f"tensor at a location the config disables ({flag}: false)", key=key)
        groups.setdefault((layer, loc), {})[param] = t
    if not groups:
        raise InvalidAdapterError("weight file holds no bottleneck tensors", key=WEIGHT_FILES[1])

    # 2. one block per (layer, location)
    blocks: list[BottleneckBlock] = []
    for (layer, loc), p in sorted(groups.items()):
        prefix = f"model.layers.{layer}.{'attention_adapters' if loc == 'attn' else 'output_adapters'}.adapters.{name}."

        def need(param: str, shape: tuple[int, ...], p: dict[str, Any] = p, prefix: str = prefix) -> torch.Tensor:
            if param not in p:
                raise InvalidAdapterError("missing tensor", key=prefix + param)
            expect_shape(prefix + param, p[param], shape)
            return p[param]

        if f"adapter_down.{k}.weight" not in p:
            raise InvalidAdapterError("missing tensor", key=prefix + f"adapter_down.{k}.weight")
        r = int(p[f"adapter_down.{k}.weight"].shape[0])
        if r < 1:
            raise InvalidAdapterError("bottleneck width must be at least 1", key=prefix + f"adapter_down.{k}.weight")
        down_w = need(f"adapter_down.{k}.weight", (r, H))
        down_b = need(f"adapter_down.{k}.bias", (r,))
        up_w = need("adapter_up.weight", (H, r))
        up_b = need("adapter_up.bias", (H,))
        if scaling == "learned":
            scale = need("scaling", (1,)).expand(H).clone()
        elif scaling == "channel":
            scale = need("scaling", (H,)).clone()
        else:
            scale = torch.full((H,), float(scaling))
        lnb = (need("adapter_down.0.weight", (H,)), need("adapter_down.0.bias", (H,))) if ln_before else None
        lna = (need("adapter_norm_after.weight", (H,)), need("adapter_norm_after.bias", (H,))) if ln_after else None
        known = {f"adapter_down.{k}.weight", f"adapter_down.{k}.bias", "adapter_up.weight", "adapter_up.bias", "scaling"}
        known |= {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_norm_before.weight", "adapter_norm_before.bias"} if ln_before else set()
        known |= {"adapter_norm_after.weight", "adapter_norm_after.bias"} if ln_after else set()
        for param in p:
            if param not in known:
                raise InvalidAdapterError("unexpected tensor for this adapter config", key=prefix + param)
        blocks.append(BottleneckBlock(layer, loc, down_w, down_b, up_w, up_b, scale, lnb, lna))

    if phm:
        variant = "compacter" if allowed["attn"] and allowed["mlp"] else "compacter++"
    elif opts.parallel:
        variant = "scaled_par_bn" if scaling == "learned" else "par_bn"
    else:
        variant = "double_seq_bn" if allowed["attn"] and allowed["mlp"] else "seq_bn"
    # a learned or channel scaling is a trained parameter too (expanded into each block's scale); a float is not
    extra = sum(1 if scaling == "learned" else H for _ in blocks) if scaling in ("learned", "channel") else 0
    if phm:  # the trained parameters are the PHM factors, not the dense weights rebuilt from them
        dense = sum(t.numel() for b in blocks for t in (b.down_w, b.down_b, b.up_w, b.up_b))
        extra += phm_params - dense
    return AdapterWeights("bottleneck", "adapterhub", variant, BottleneckWeights(opts, blocks), config=c,
                          extra_parameters=extra)


def _lora_layout(key: str, name: object, what: str) -> tuple[int, str, str, str]:
    """(layer, block, linear, "lora_A" | "lora_B") of a key in AdapterHub's LoRA layout (also its (IA)3's)."""
    m = IA3_KEY.match(key)
    if m is None:
        raise InvalidAdapterError(f"not an AdapterHub {what} tensor name (...loras.<name>.lora_A / lora_B)", key=key)
    layer, block, lin, aname, which = int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
    if name is not None and aname != name:
        raise InvalidAdapterError(f"tensor belongs to adapter {aname!r}, the config names {name!r}", key=key)
    return layer, block, lin, which


def _parse_ia3(meta: dict[str, Any], files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    """AdapterHub (IA)3: OUTPUT scaling of every wrapped module by lora_B.flatten() * alpha."""
    c = meta["config"]
    name = meta.get("name")
    alpha = float(c.get("alpha", 1.0))
    tensors = load_tensors(pick_weight_file(files, WEIGHT_FILES))
    vectors: list[IA3Vector] = []
    for key, t in sorted(tensors.items()):
        layer, block, lin, which = _lora_layout(key, name, "(IA)3")
        if which == "lora_A":
            continue  # unused by the "scale" composition
        module = f"model.layers.{layer}.{block}.{lin}"
        if module not in base.linears:
            raise InvalidAdapterError("the base model has no Linear module of that name in its layers", key=key)
        out_f, _ = base.linears[module]
        expect_shape(key, t, (out_f, 1))
        vectors.append(IA3Vector(module, "out", t.flatten() * alpha))
    if not vectors:
        raise InvalidAdapterError("weight file holds no lora_B tensors", key=WEIGHT_FILES[1])
    return AdapterWeights("ia3", "adapterhub", "ia3", IA3Weights(vectors), config=c)


# AdapterHub's LoRA placement on Llama (docs/adapters.md §4.4): which Linears each flag wraps
HUB_LORA_PLACES = {"selfattn_lora": ("self_attn", ("q", "k", "v")), "intermediate_lora": ("mlp", ("down",)),
                   "output_lora": ("mlp", ("up",))}


def _version_below(version: object, major: int, minor: int, patch: int) -> bool:
    m = re.match(r"^adapters\.(\d+)\.(\d+)\.(\d+)", str(version or ""))
    return m is not None and tuple(int(x) for x in m.groups()) < (major, minor, patch)


def _parse_lora(meta: dict[str, Any], files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    """AdapterHub LoRA ("add"): y = W x + ((x A^T) B^T) * alpha / r on the Linears its flags wrap."""
    c = meta["config"]
    for field in ("use_gating", "use_dora"):
        if c.get(field):
            why = ("the gate averages over the tokens of each forward call, so a token's output depends on "
                   "how its prompt is chunked" if field == "use_gating" else "DoRA through AdapterHub is not served")
            raise UnsupportedAdapterError(why, key=f"config.{field}")
    if c.get("vera_d") is not None or c.get("vera_b") is not None:
        raise UnsupportedAdapterError("VeRA through AdapterHub is not served", key="config.vera_d")
    r, alpha = c.get("r", 8), c.get("alpha", 8)
    if not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InvalidAdapterError("r must be a positive integer and alpha a number", key="config.r")
    # adapters before 1.1.0 trained with scaling 1.0 whenever r != alpha; the library loads them so
    scale = 1.0 if (_version_below(meta.get("version"), 1, 1, 0) and r != alpha) else float(alpha) / r
    leave_out = _leave_out(c, base.num_layers)
    wrapped: set[tuple[str, str]] = set()
    attn = c.get("attn_matrices", ["q", "v"])
    for flag, (block, names) in HUB_LORA_PLACES.items():
        if _bool(c, flag, flag == "selfattn_lora"):
            wrapped |= {(block, f"{n}_proj") for n in (names if flag != "selfattn_lora" else [a for a in attn if a in names])}
    name = meta.get("name")
    tensors = load_tensors(pick_weight_file(files, WEIGHT_FILES))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, block, lin, which = _lora_layout(key, name, "LoRA")
        if (block, lin) not in wrapped or layer in leave_out:
            raise InvalidAdapterError("this Linear is not wrapped by the config's flags (selfattn_lora, "
                                      "attn_matrices, intermediate_lora, output_lora, leave_out)", key=key)
        module = f"model.layers.{layer}.{block}.{lin}"
        if module not in base.linears:
            raise InvalidAdapterError("the base model has no Linear module of that name in its layers", key=key)
        parts.setdefault(module, {})[which] = t
    modules = []
    for module, pr in sorted(parts.items()):
        out_f, in_f = base.linears[module]
        key = module + ".loras." + str(name)
        if "lora_A" not in pr or "lora_B" not in pr:
            raise InvalidAdapterError("a LoRA module needs both lora_A and lora_B", key=key)
        expect_shape(key + ".lora_A", pr["lora_A"], (r, in_f))
        expect_shape(key + ".lora_B", pr["lora_B"], (out_f, r))
        modules.append(LoRAModule(module, pr["lora_A"].clone(), pr["lora_B"].clone(), None, scale))
    if not modules:
        raise InvalidAdapterError("weight file holds no LoRA tensors", key=WEIGHT_FILES[1])
    return AdapterWeights("lora", "adapterhub", "lora", LoRAWeights(modules), config=c)


PHM_PARTS = ("W_left", "W_right", "b")


def _phm_dense(rule: torch.Tensor, w_left: torch.Tensor, w_right: torch.Tensor) -> torch.Tensor:
    """The Linear weight (out, in) a PHM layer computes: W = bmm(W_left, W_right) (n, in/n, out/n),
    Hm = sum_k kron(rule[k], W[k]) (in, out), weight = Hm^T."""
    W = torch.bmm(w_left, w_right)
    Hm = sum(torch.kron(rule[i], W[i]) for i in range(rule.shape[0]))
    return Hm.t().contiguous()  # type: ignore[union-attr]


def _dense_from_phm(tensors: dict[str, torch.Tensor], c: dict[str, Any], name: str, H: int, k: int
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """Compacter's PHM layers rebuilt, once at load, into the dense bottleneck tensors they compute
    (docs/adapters.md §5.5); also returns the number of trained PHM parameters."""
    n = c.get("phm_dim", 4)
    rule_key = f"model.shared_parameters.{name}.phm_rule"
    rule = tensors.pop(rule_key, None)
    if rule is None:
        raise InvalidAdapterError("a Compacter adapter saves its shared phm_rule", key=rule_key)
    expect_shape(rule_key, rule, (n, n, n))
    count = rule.numel()
    out: dict[str, torch.Tensor] = {}
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (prefix, layer name) -> parts
    for key, t in tensors.items():
        m = BN_KEY.match(key)
        part = key.rsplit(".", 1)[-1]
        layer_name = m.group(4).rsplit(".", 1)[0] if m else ""
        if m and part in PHM_PARTS and layer_name in (f"adapter_down.{k}", "adapter_up"):
            layers.setdefault((key[: -len(m.group(4))], layer_name), {})[part] = t
            count += t.numel()
        else:
            out[key] = t  # layer norms, scaling: as for any bottleneck
    for (prefix, layer_name), parts in layers.items():
        for part in PHM_PARTS:
            if part not in parts:
                raise InvalidAdapterError("missing PHM tensor", key=f"{prefix}{layer_name}.{part}")
        wl, wr = parts["W_left"], parts["W_right"]
        if wl.dim() != 3 or wr.dim() != 3 or wl.shape[0] != n or wr.shape[0] != n or wl.shape[2] != wr.shape[1]:
            raise InvalidAdapterError(f"PHM factors of shapes {tuple(wl.shape)} and {tuple(wr.shape)} do not fit "
                                      f"phm_dim {n}", key=f"{prefix}{layer_name}.W_left")
        weight = _phm_dense(rule, wl, wr)  # (out, in)
        if weight.shape[0] != parts["b"].shape[0]:
            raise InvalidAdapterError("PHM bias does not fit its layer", key=f"{prefix}{layer_name}.b")
        out[f"{prefix}{layer_name}.weight"] = weight
        out[f"{prefix}{layer_name}.bias"] = parts["b"]
    return out, count
