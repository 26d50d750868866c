"""Plain data describing a parsed, validated adapter, and what a checkpoint is checked against.

Tensors here live on the host in float32; methods copy them into device slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .families import MERGEABLE, Method

Format = Literal["peft", "adapterhub"]
Location = Literal["attn", "mlp"]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaseModelInfo:
    """The facts about the frozen base model that every adapter tensor is validated against."""

    model_type: str
    hidden_size: int
    num_layers: int
    # full module path -> (out_features, in_features), for every Linear an adapter may target
    linears: dict[str, tuple[int, int]]

    @staticmethod
    def from_model(model: Any) -> BaseModelInfo:
        cfg = model.config
        linears = {
            name: (m.out_features, m.in_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name
        }
        return BaseModelInfo(cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, linears)

    @staticmethod
    def split(module: str) -> tuple[int, str]:
        """'model.layers.3.self_attn.k_proj' -> (3, 'k_proj')."""
        parts = module.split(".")
        i = parts.index("layers")
        return int(parts[i + 1]), parts[-1]


@dataclass(frozen=True)
class IA3Vector:
    """One scaled Linear: `out` scales its output (bias included), `in` scales its input."""

    module: str
    side: Literal["in", "out"]
    scale: torch.Tensor  # [out] or [in], float32


@dataclass(frozen=True)
class BottleneckOptions:
    """The AdapterHub flags that change where the bottleneck reads and what the sub-block returns."""

    parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    adapter_residual_before_ln: bool
    non_linearity: str


@dataclass(frozen=True)
class BottleneckBlock:
    """The adapter at one (layer, location): B(z) = s * (W_up f(W_down LN?(z) + b_down) + b_up)."""

    layer: int
    location: Location
    down_w: torch.Tensor  # [r, H]
    down_b: torch.Tensor  # [r]
    up_w: torch.Tensor  # [H, r]
    up_b: torch.Tensor  # [H]
    scale: torch.Tensor  # [H]  (a float, a learned scalar or a channel vector, expanded)
    ln_before: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight [H], bias [H])
    ln_after: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def width(self) -> int:
        return int(self.down_w.shape[0])


@dataclass
class AdapterWeights:
    """A parsed adapter, ready to be written into device slots."""

    method: Method
    format: Format
    variant: str
    ia3: list[IA3Vector] = field(default_factory=list)
    bn_options: BottleneckOptions | None = None
    bn_blocks: list[BottleneckBlock] = field(default_factory=list)
    # (IA)3 written by AdapterHub scales the output of down_proj: same math, other place.
    config: dict = field(default_factory=dict)
    extra_parameters: int = 0  # trained parameters held outside `tensors()` (a learned or channel scaling)

    @property
    def mergeable(self) -> bool:
        return self.method in MERGEABLE

    def tensors(self) -> list[torch.Tensor]:
        out = [v.scale for v in self.ia3]
        for b in self.bn_blocks:
            out += [b.down_w, b.down_b, b.up_w, b.up_b]
            for pair in (b.ln_before, b.ln_after):
                if pair is not None:
                    out += list(pair)
        return out

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors()) + self.extra_parameters

    @property
    def size_bytes(self) -> int:
        return self.num_parameters * 4
