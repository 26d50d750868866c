"""HF PEFT (IA)3: adapter_config.json + adapter_model.safetensors|.bin (ADAPTERS.md section 1)."""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import InvalidAdapterError, UnsupportedAdapterError
from ..methods.ia3 import IA3Vector, IA3Weights
from ..spec import AdapterWeights, BaseModelInfo
from .tensors import load_tensors, pick_weight_file

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


def _check_spec(cfg: dict, field: str) -> str | list[str] | None:
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


def parse(cfg: dict, files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    ptype = cfg.get("peft_type")
    if ptype != "IA3":
        raise UnsupportedAdapterError(f"peft_type {ptype!r} is not served; only IA3 is", key="peft_type")
    targets = _check_spec(cfg, "target_modules")
    ff = _check_spec(cfg, "feedforward_modules")
    tensors = load_tensors(pick_weight_file(files, WEIGHT_FILES))
    if not tensors:
        raise InvalidAdapterError("weight file holds no tensors", key=WEIGHT_FILES[0])

    vectors: list[IA3Vector] = []
    for key, t in sorted(tensors.items()):
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            raise InvalidAdapterError("not a PEFT (IA)3 tensor name (base_model.model.<module>.ia3_l)", key=key)
        module = key[len(PREFIX) : -len(SUFFIX)]
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
