"""Weight-only quantization of the base model's Linear layers: int8 or int4 weights, activations in the
model's dtype (bfloat16), adapters untouched on top (the QLoRA setting).

- int8: one scale per output channel, symmetric (w ~ q * s, q in [-127, 127]);
- int4: groups of 32 inputs per output channel, each with a scale and a zero point (asymmetric, the
  layout of GGUF's Q4_1 and of tinygemm: w ~ (q - 8) * s + z, q in [0, 15]). The LM head takes int8
  when the layers take int4 (llama.cpp keeps its output layer at higher precision too: the logits
  are what sampling and logprobs read).

The products run in PyTorch's own CPU kernels for weight-only quantized matrices
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`), which read the packed weights
directly. torchao 0.18 was compared and not used: its int8 weight-only tensor dequantizes in every
call unless compiled (5 to 12 times slower than bfloat16 at batch 1 on this project's CPU), and its
int4 packing formats have CUDA kernels only. Elsewhere (CUDA) a layer dequantizes its weight for each
product: correct, and half (int8) or a quarter (int4) of bfloat16's weight memory; not faster.

What reads a quantized layer's `weight` (DoRA's norms when an adapter is written) gets the
dequantized matrix. Nothing may fold into it: adapter methods see `BaseModelInfo.quantization`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Quantization

log = logging.getLogger(__name__)
GROUP = 32  # int4 group size along the input dimension
BLOCK = 64  # int4: the CPU packing takes output rows in multiples of 64


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], s float32 [N]) with w ~ q * s."""
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int32 [N, K] in 0..15, s [K/32, N], z [K/32, N]) with w ~ (q - 8) * s + z."""
    N, K = w.shape
    g = w.reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    return q, s.t().contiguous(), (lo + 8 * s).t().contiguous()


def int4_layout(N: int, K: int) -> torch.Tensor:
    """Where `aten._convert_weight_to_int4pack_for_cpu` puts each value of an [N, K] matrix: for every
    nibble of its output (bytes in memory order, low nibble first), the flat index n * K + k it holds.
    The layout depends on the CPU's instruction set (AVX-512 and AVX2 builds interleave rows
    differently), so it is measured, not assumed: packing the indices themselves, four bits at a time."""
    idx = torch.arange(N * K, dtype=torch.int64)
    where = torch.zeros(N * K, dtype=torch.int64)
    for shift in range(0, max(1, (N * K - 1).bit_length()), 4):
        q = ((idx >> shift) & 0xF).to(torch.int32).reshape(N, K)
        where |= nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)) << shift
    return where


def nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 [...] -> int64 [2 * numel]: each byte's low nibble, then its high one, in memory order."""
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1).to(torch.int64)


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of `aten._convert_weight_to_int4pack_for_cpu(q, 1)`: packed uint8 [N, K/2] -> q [N, K]."""
    q = torch.empty(N * K, dtype=torch.int64)
    q[int4_layout(N, K)] = nibbles(packed)
    return q.reshape(N, K).to(torch.int32)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] in 0..15 -> uint8 [N, K/2], two values a byte in plain order (off the CPU)."""
    q8 = q.to(torch.uint8)
    return q8[:, 0::2] | (q8[:, 1::2] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: uint8 [N, K/2] -> q int32 [N, K]."""
    return nibbles(b).reshape(b.shape[0], -1).to(torch.int32)


def can_quantize(lin: torch.nn.Linear, scheme: Quantization) -> bool:
    N, K = lin.out_features, lin.in_features
    return scheme == "int8" or (N % BLOCK == 0 and K % GROUP == 0)


class QuantLinear(torch.nn.Linear):
    """A frozen Linear whose weight is stored quantized. Subclasses nn.Linear so that whatever finds the
    model's Linears (adapter targets, PEFT in the tests) finds it; its `weight` is computed on demand."""

    quantized = True
    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, lin: torch.nn.Linear, scheme: Quantization, dtype: torch.dtype, cpu: bool = True) -> None:
        """`cpu`: the layer runs on the CPU (its int4 kernel's packing); elsewhere int4 is held as plain nibbles."""
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.scheme = lin.in_features, lin.out_features, scheme
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)
        w = lin.weight.detach().to(torch.float32)
        if scheme == "int8":
            q, s = quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", s.to(dtype))
        else:
            q, s, z = quantize_int4(w)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1) if cpu else pack_nibbles(q)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", torch.stack([s, z], dim=-1).to(dtype).contiguous())  # [K/32, N, 2]
        self.cpu_packed = scheme == "int4" and cpu  # the CPU kernel's layout; else plain nibbles

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Leaving the CPU, int4 weights in the CPU packing are repacked plainly: that layout is the host's
        own and only its kernel reads it (a model quantized for another device is packed plainly already)."""
        if self.cpu_packed and fn(torch.zeros(1)).device.type != "cpu":
            self.qweight = pack_nibbles(unpack_int4(self.qweight, self.out_features, self.in_features))
            self.cpu_packed = False
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight [N, K] in the activations' dtype."""
        N, K = self.out_features, self.in_features
        if self.scheme == "int8":
            return self.qweight.to(self.scales.dtype) * self.scales[:, None]
        q = unpack_int4(self.qweight, N, K) if self.cpu_packed else unpack_nibbles(self.qweight)
        q = q.to(self.scales.dtype).reshape(N, K // GROUP, GROUP)
        s, z = self.scales[..., 0].t()[..., None], self.scales[..., 1].t()[..., None]  # [N, K/32, 1]
        return ((q - 8) * s + z).reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # the kernels take contiguous rows only
        if x2.device.type != "cpu" or (self.scheme == "int4" and not self.cpu_packed):
            y = F.linear(x2, self.weight)
        elif self.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


def quantize_model(model: Any, scheme: Quantization, dtype: torch.dtype, device: torch.device | None = None) -> int:
    """Replace the decoder layers' Linears (and the LM head: int8) by QuantLinear, in place, for a model
    that runs on `device` (default the CPU). Returns how many were replaced; a Linear whose shape the
    int4 packing cannot take is quantized to int8."""
    cpu = device is None or device.type == "cpu"
    if scheme == "none":
        return 0
    n = 0
    names = [name for name, m in model.named_modules()  # names only: each full-precision Linear is freed as it goes
             if isinstance(m, torch.nn.Linear) and (".layers." in name or name == "lm_head")]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        s: Quantization = "int8" if name == "lm_head" or not can_quantize(lin, scheme) else scheme
        setattr(parent, attr, QuantLinear(lin, s, dtype, cpu))
        n += 1
    log.info("quantized %d Linear layers (%s weights, %s activations)", n, scheme, str(dtype).removeprefix("torch."))
    return n


