"""Decode attention over the paged KV cache on the GPU (Triton), reading each row's pages where they lie.

The PyTorch path (`PagedKVCache._gathered_decode`) copies every row's pages into one contiguous tensor per
layer, as long as the longest row's bucket, then runs SDPA with an additive mask; on an H100 at batch 16
(Llama-3.1-8B shapes) the copies alone were 0.93 ms of a 7.6 ms step. Here one query per row attends to
its own keys 0..length-1 (the last `window` of them on a sliding-window layer) through its page table:

- `_attend`: a program per (row, K/V head, split of the key range): the head's G query heads together
  (grouped-query attention without expanding K/V), page by page, an online softmax in float32
  (scores and the softmax in float32, the value product from probabilities in the cache's dtype, as
  flash attention does); it writes its unnormalised output with its running max and sum;
- `_combine`: a program per (row, head) merges the splits (log-sum-exp).

Shapes are fixed by the batch and the table's width (the graph's KV bucket), so both launches can be
captured in a CUDA graph; splits past a row's length do nothing. Without CUDA the kernels run in Triton's
interpreter (the tests on the CPU).
"""

from __future__ import annotations

import torch

from .segments import ERROR, INTERPRET, jit, pow2, tl

BLOCK_G = 16  # query heads per K/V head, padded: tl.dot's smallest tile
PAGES_PER_SPLIT = 4  # pages each `_attend` program reads at most
NEG = -1.0e30


def available() -> bool:
    return ERROR is None


@jit
def _attend(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, o_ptr, m_ptr, l_ptr, scale, window, n_pages_table,
            stride_qb, stride_qh, stride_kh, stride_kp, stride_ks, stride_tb, stride_ob, stride_oh, stride_os,
            stride_mb, stride_mh,
            G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_G: tl.constexpr, PAGES: tl.constexpr,
            F32: tl.constexpr, CAST: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + b)
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # the first key this row attends to
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    m = tl.full((BLOCK_G,), NEG, dtype=tl.float32)
    ssum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    offs_s = tl.arange(0, PS)
    for i in tl.static_range(PAGES):
        p = split * PAGES + i
        pos = p * PS + offs_s  # the key positions of this page
        ok = (pos < length) & (pos >= first)  # (pages past the table are skipped below)
        if (p * PS < length) & ((p + 1) * PS > first) & (p < n_pages_table):
            page = tl.load(tables_ptr + b * stride_tb + p)
            base = kvh * stride_kh + page * stride_kp + offs_s[:, None] * stride_ks + offs_d[None, :]
            k = tl.load(k_ptr + base, mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + base, mask=ok[:, None], other=0.0)
            if F32:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            elif CAST:  # bfloat16 products are exact in float32: the same sums, for the interpreter
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale, NEG)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            w = tl.exp(s - m_new[:, None])
            w = tl.where(ok[None, :], w, 0.0)
            ssum = ssum * alpha + tl.sum(w, 1)
            if F32:
                pv = tl.dot(w, v, input_precision="ieee")
            elif CAST:
                pv = tl.dot(w.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(w.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :], acc,
             mask=g_ok[:, None])
    tl.store(m_ptr + b * stride_mb + heads * stride_mh + split, m, mask=g_ok)
    tl.store(l_ptr + b * stride_mb + heads * stride_mh + split, ssum, mask=g_ok)


@jit
def _combine(o_ptr, m_ptr, l_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_outb,
             stride_outh, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < SPLITS
    offs_d = tl.arange(0, D)
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + offs_s, mask=s_ok, other=NEG)
    ssum = tl.load(l_ptr + b * stride_mb + h * stride_mh + offs_s, mask=s_ok, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(s_ok, tl.exp(m - top), 0.0)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)
    total = tl.sum(w * ssum, 0)
    out = tl.where(total > 0, tl.sum(o * w[:, None], 0) / tl.maximum(total, 1e-30), 0.0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty))


def supports(heads: int, kv_heads: int, head_dim: int, page_size: int) -> bool:
    """Whether `decode` takes these shapes: up to BLOCK_G query heads per K/V head, head_dim and page_size
    powers of two of 16 or more."""
    tile = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    return heads % kv_heads == 0 and heads // kv_heads <= BLOCK_G and tile(head_dim) and tile(page_size)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
           window: int | None, scale: float) -> torch.Tensor:
    """One query per row: q [B, H, d] over its keys 0..lengths[b]-1 (the last `window` of them if given) in
    one layer's pools k, v [kvh, pages, page_size, d], through tables [B, P] (page numbers, contiguous).
    Returns [B, H, d] in q's dtype. d must be a power of two (16 or more)."""
    B, H, D = q.shape
    kvh, _, ps, _ = k.shape
    G = H // kvh
    P = tables.shape[1]
    assert supports(H, kvh, D, ps)
    assert q.stride(2) == 1 and k.stride(3) == 1 and k.stride() == v.stride() and tables.stride(1) == 1
    splits = -(-P // PAGES_PER_SPLIT)
    o = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    s = torch.empty_like(m)
    _attend[(B, kvh, splits)](
        q, k, v, tables, lengths, o, m, s, scale, window or 0, P,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), tables.stride(0), o.stride(0), o.stride(1),
        o.stride(2), m.stride(0), m.stride(1),
        G=G, D=D, PS=ps, BLOCK_G=BLOCK_G, PAGES=PAGES_PER_SPLIT, F32=q.dtype == torch.float32,
        CAST=INTERPRET)
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    _combine[(B, H)](o, m, s, out, o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1), out.stride(0),
                     out.stride(1), SPLITS=splits, BLOCK_S=pow2(splits, 2), D=D)
    return out
