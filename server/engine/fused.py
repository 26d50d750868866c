"""The decode step's elementwise chains, as small pure functions a compiler fuses into one kernel each.

A Llama layer's RMSNorm is seven kernels in eager PyTorch, rotary embedding about ten, SiLU-and-multiply
two. Inside a CUDA graph the launch cost is gone but each kernel still costs a few microseconds of
mostly idle GPU, about 40% of an 8B decode step at batch 1. These functions compute exactly what the
HF modules compute (same operations, same dtypes) and are compiled once with a dynamic batch size.
Used on CUDA only; if compilation fails, the eager function is used and the reason logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..architectures import Architecture
from ..compiled import Compiled


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb with unsqueeze_dim=1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def add_rms_norm(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add of a sub-block and the RMSNorm that reads it: (h + a, norm(h + a))."""
    s = h + a
    return s, rms_norm(s, weight, eps)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class FusedOps:
    """The compiled functions, or None where the model's modules are not the ones they reproduce."""

    def __init__(self, cfg: Any, inner: Any) -> None:
        norms = [inner.norm] + [m for layer in inner.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        ok = all(type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") for m in norms)
        ok = ok and getattr(cfg, "hidden_act", None) == "silu"
        self.enabled = ok
        self.rms_norm = Compiled(rms_norm)
        self.add_rms_norm = Compiled(add_rms_norm)
        self.rope = Compiled(rope)
        self.silu_mul = Compiled(silu_mul)

    def errors(self) -> dict[str, str]:
        fns = (self.rms_norm, self.add_rms_norm, self.rope, self.silu_mul)
        return {f.fn.__name__: f.error for f in fns if f.error}


class Packed:
    """One layer's sibling projections as one weight: q, k, v and gate, up. The HF Linear weights become
    views of the packed tensor, so there is no second copy, and a fold into a Linear's weight (an (IA)3
    merge) is seen by the packed product too."""

    def __init__(self, linears: list[Any], linear: Callable[..., torch.Tensor] = F.linear) -> None:
        self.linear = linear  # the product: F.linear, or SmallProducts.linear (decode-sized batches)
        ws = [m.weight for m in linears]
        self.sizes = [w.shape[0] for w in ws]
        self.weight = torch.cat([w.detach() for w in ws])
        has_bias = [m.bias is not None for m in linears]
        self.bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
        at = 0
        for m, n in zip(linears, self.sizes, strict=True):
            m.weight.data = self.weight[at : at + n]
            if self.bias is not None:
                m.bias.data = self.bias[at : at + n]
            at += n

    @staticmethod
    def possible(linears: list[Any]) -> bool:
        if any(getattr(m, "quantized", False) for m in linears):
            return False
        ws = [m.weight for m in linears]
        same_bias = len({m.bias is None for m in linears}) == 1
        return same_bias and len({(w.shape[1], w.dtype, w.device) for w in ws}) == 1

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def pack_layers(layers: list[Any], arch: Architecture, linear: Callable[..., torch.Tensor] = F.linear
                ) -> list[dict[str, Packed]]:
    """Pack q/k/v and gate/up of every layer where they are separate Linears and the shapes allow it
    (a fused projection is one product already; a routed MLP has no gate and up Linears)."""
    out = []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        groups = {"qkv": [getattr(a, n) for n in arch.qkv]}
        if all(hasattr(m, n) for n in arch.gate_up):
            groups["gate_up"] = [getattr(m, n) for n in arch.gate_up]
        out.append({k: Packed(v, linear) for k, v in groups.items() if len(v) > 1 and Packed.possible(v)})
    return out
