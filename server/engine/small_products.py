"""The base model's products for decode-sized batches on the CPU, in bfloat16, by a native kernel.

PyTorch's bfloat16 matmul reads a weight at well below the machine's memory speed when it multiplies
only a few rows, and a small decode step is little else than reading every weight once. For 2 to
ROWS rows, bfloat16 weights and inputs, `SmallProducts` computes y = x W^T (+ b) with
`server/kernels/gemv_bf16.cpp` (float32 dot products of bfloat16 pairs, rounded once); anything else,
and machines without AVX512-BF16 or a compiler, go to F.linear. Quantized layers keep their own kernels.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels

# the kernel serves products of 2 to ROWS rows: at batch 1 PyTorch's own product measured as fast in a
# decode step (83 against 80 tok/s), at batch 4 it was slower (207 against 245 tok/s; benchmarks.lora_cost)
ROWS = 8
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
GEMV_BF16 = [_I64, _I64, _I64, _P, _P, _P, _P, ctypes.c_int]
BF16 = torch.bfloat16


class SmallProducts:
    def __init__(self, enabled: bool) -> None:
        self.kernel = kernels.load("gemv_bf16", GEMV_BF16) if enabled else None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias), by the kernel where it serves."""
        k = self.kernel
        K = x.shape[-1]
        if (k is None or x.dtype != BF16 or weight.dtype != BF16 or K % 32 or not 2 * K <= x.numel() <= ROWS * K
                or not x.is_contiguous() or not weight.is_contiguous() or x.device.type != "cpu"
                or (bias is not None and (bias.dtype != BF16 or not bias.is_contiguous()))):
            return F.linear(x, weight, bias)
        y = x.new_empty(*x.shape[:-1], weight.shape[0])
        k(x.numel() // K, weight.shape[0], K, x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
          y.data_ptr(), torch.get_num_threads())
        return y

    def module(self, m: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """The Linear `m` as a function, by `linear` where it is a plain (unquantized) Linear."""
        if self.kernel is None or type(m) is not torch.nn.Linear:
            return m
        return lambda x: self.linear(x, m.weight, m.bias)
