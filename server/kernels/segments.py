"""Segmented adapter products on the GPU (Triton): each adapter a batch uses is read once, whatever
rows use it, and no empty slot is read.

A fixed-shape decode batch (graph replay) gives its rows grouped by adapter: `order` [B] lists the
rows sorted by their index among the batch's distinct slots, and `starts` [U + 1] where each of the
U distinct slots' rows begin in `order` (the segments; padded entries are empty). A LoRA-shaped
product then runs as two kernels over every segment, as Punica's SGMV and SGLang's csgmv do:

- `shrink`: d = x @ A[slot]^T per segment, float32, split over the input dimension into partial
  sums (no atomics: the result does not depend on scheduling);
- `expand`: y = y + (sum of the partials) @ sB[slot]^T + sb[slot] per segment, in place, in float32,
  rounded once to y's dtype (as PEFT adds its float32 delta), with DoRA's per-output scale g folded
  into the same epilogue: y + (g - 1) (y - bias) + g delta.

The grid is fixed by (U, row tiles of the largest possible segment, splits or column tiles), so the
launches can be captured in a CUDA graph; programs whose segment is shorter, empty, or of a slot
without a block here (rank 0) return at once. A slot's block is padded to the table's rank, but the
loads are masked to the slot's own rank, so a rank-8 adapter in a rank-64 table reads 8 rows.

Products are float32 with IEEE precision (no TF32), like PyTorch's default float32 matmul on CUDA.
Without CUDA the same kernels run in Triton's interpreter (the tests on the CPU do this).
"""

from __future__ import annotations

import os
from typing import Any

import torch

if not torch.cuda.is_available():  # Triton's interpreter, which must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl

    jit = triton.jit
    ERROR: str | None = None
    if not torch.cuda.is_available() and type(tl.zeros).__name__ != "InterpretedFunction":
        ERROR = "no CUDA device, and triton was imported before its interpreter was chosen (set TRITON_INTERPRET=1)"
except ImportError as e:  # the CPU path never needs these kernels
    triton = tl = None  # type: ignore[assignment]
    ERROR = f"triton is not installed: {e}"

    def jit(fn: Any) -> Any:
        return fn


BLOCK_M = 16  # rows per program: tl.dot's smallest tile
K_PER_PROGRAM = 512  # input columns each shrink program sums over
BLOCK_K = 64  # input columns per step of a shrink program
BLOCK_N = 128  # output columns per expand program
MAX_SPLIT = 32


def available() -> bool:
    return ERROR is None


@jit
def _shrink(x_ptr, a_ptr, part_ptr, uniq_ptr, starts_ptr, order_ptr, rank_ptr, K,
            stride_xm, stride_as, stride_ar, stride_ps, stride_pm,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    u = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(starts_ptr + u)
    end = tl.load(starts_ptr + u + 1)
    slot = tl.load(uniq_ptr + u)
    rank = tl.load(rank_ptr + slot)
    first = start + pid_m * BLOCK_M
    if (first < end) & (rank > 0):
        offs_m = first + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        a_base = a_ptr + slot * stride_as
        for k0 in range(pid_k * BLOCK_K, K, SPLIT * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None], mask=k_ok[:, None] & r_ok[None, :],
                         other=0.0)
            acc += tl.dot(xt, at, input_precision="ieee")
        tl.store(part_ptr + pid_k * stride_ps + rows[:, None] * stride_pm + offs_r[None, :], acc, mask=m_ok[:, None])


@jit
def _expand(y_ptr, part_ptr, b_ptr, sb_ptr, g_ptr, bias_ptr, uniq_ptr, starts_ptr, order_ptr, rank_ptr, N,
            stride_ym, stride_ps, stride_pm, stride_bs, stride_br, stride_bn, stride_sbs, stride_gs,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
            HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr):
    u = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(starts_ptr + u)
    end = tl.load(starts_ptr + u + 1)
    slot = tl.load(uniq_ptr + u)
    rank = tl.load(rank_ptr + slot)
    first = start + pid_m * BLOCK_M
    if (first < end) & (rank > 0):
        offs_m = first + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        d = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            d += tl.load(part_ptr + s * stride_ps + rows[:, None] * stride_pm + offs_r[None, :], mask=m_ok[:, None],
                         other=0.0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        delta = tl.dot(d, bt, input_precision="ieee")
        delta = delta + tl.load(sb_ptr + slot * stride_sbs + offs_n, mask=n_ok, other=0.0)[None, :]
        y_at = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=ok, other=0.0)
        y32 = y.to(tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + slot * stride_gs + offs_n, mask=n_ok, other=1.0)[None, :]
            wx = y32
            if HAS_BIAS:
                wx = y32 - tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            out = y32 + (g - 1.0) * wx + g * delta
        else:
            out = y32 + delta
        if BF16:  # round to nearest even by hand: Triton's interpreter truncates (and then this is exact there too)
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = tl.where(out != out, out, bits.to(tl.float32, bitcast=True))
        tl.store(y_at, out.to(y.dtype), mask=ok)


def _pow2(n: int, floor: int) -> int:
    out = floor
    while out < n:
        out *= 2
    return out


def lora(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, sB: torch.Tensor, sb: torch.Tensor, rank: torch.Tensor,
         uniq: torch.Tensor, starts: torch.Tensor, order: torch.Tensor, g: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, out] (a row-strided view is fine) += each row's s B A x + s b, in place, in float32 rounded once,
    or DoRA's y + (g - 1)(y - bias) + g (s B A x + s b) where g is given. x [B, in]; per-slot tables
    A [S, R, in], sB [out, S, R] (any strides with unit stride along `in` for A), sb [S, out], g [S, out],
    rank [S] each slot's own rank (0: no block); the batch's segments uniq [U], starts [U + 1],
    order [B] (rows of no segment are left as they are). Returns y."""
    B, K = x.shape
    N = y.shape[1]
    S, R, _ = A.shape
    U = uniq.shape[0]
    assert x.stride(1) == 1 and y.stride(1) == 1 and A.stride(2) == 1, "unit stride along the feature dimension"
    BR = _pow2(R, 16)
    split = max(1, min(MAX_SPLIT, -(-K // K_PER_PROGRAM)))
    block_k = BLOCK_K if BLOCK_K * split <= K else 16
    m_tiles = -(-B // BLOCK_M)
    part = torch.empty(split, B, BR, device=x.device, dtype=torch.float32)
    _shrink[(U, m_tiles, split)](x, A, part, uniq, starts, order, rank, K, x.stride(0), A.stride(0), A.stride(1),
                                 part.stride(0), part.stride(1), BLOCK_M=BLOCK_M, BLOCK_R=BR, BLOCK_K=block_k,
                                 SPLIT=split)
    block_n = BLOCK_N if N >= BLOCK_N else _pow2(N, 16)
    has_g, has_bias = g is not None, g is not None and bias is not None
    _expand[(U, m_tiles, -(-N // block_n))](
        y, part, sB, sb, g if has_g else sb, bias if has_bias else sb, uniq, starts, order, rank, N,
        y.stride(0), part.stride(0), part.stride(1), sB.stride(1), sB.stride(2), sB.stride(0), sb.stride(0),
        g.stride(0) if g is not None else 0,
        BLOCK_M=BLOCK_M, BLOCK_R=BR, BLOCK_N=block_n, SPLIT=split, HAS_G=has_g, HAS_BIAS=has_bias,
        BF16=y.dtype == torch.bfloat16)
    return y

