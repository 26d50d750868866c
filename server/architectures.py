"""The decoder architectures served, each described once as plain data (no torch).

The model runner, the model loader and the adapter formats read these facts; nothing else asks which
model type a base is. A new architecture whose layers follow the Llama layout (the same module names,
pre-norms and gated MLP) is one description here and a tiny-config test. Layouts that differ further
(post-norms, soft-capping, fused projections, experts) need their own fields when they are served.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # Hugging Face `config.model_type` values it covers
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys after the projections, before rotary (Qwen3)
    adapterhub: bool = False  # AdapterHub `adapters` places its adapters as on Llama (checked against the library)


LLAMA = Architecture("llama", ("llama", "mistral", "qwen2"), adapterhub=True)
QWEN3 = Architecture("qwen3", ("qwen3",), qk_norm=True)

BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in (LLAMA, QWEN3) for t in a.model_types}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BY_MODEL_TYPE)


def architecture(model_type: str) -> Architecture:
    """The description of `model_type`; ValueError naming it (and what is served) when there is none."""
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    return arch
