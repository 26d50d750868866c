"""Segmented adapter products on the GPU (Triton): each adapter a batch uses is read once, whatever
rows use it, and no empty slot is read.

A fixed-shape decode batch (graph replay) gives its rows grouped by adapter: `order` [B] lists the
rows sorted by their index among the batch's distinct slots, and `starts` [U + 1] where each of the
U distinct slots' rows begin in `order` (the segments; padded entries are empty). A LoRA-shaped
product then runs as two kernels over every segment, as Punica's SGMV and SGLang's csgmv do:

- `shrink`: d = x @ A[slot]^T per segment, float32, split over the input dimension into partial
  sums (no atomics: the result does not depend on scheduling). Each program reads a few input tiles
  unrolled, so their loads are in flight together: these kernels are bound by latency, not bytes;
- `expand`: y = y + (sum of the partials) @ sB[slot]^T + sb[slot] per segment, in place, in float32,
  rounded once to y's dtype (as PEFT adds its float32 delta), with DoRA's per-output scale g folded
  into the same epilogue: y + (g - 1) (y - bias) + g delta.

Sibling Linears of one input (q/k/v, gate/up; up to three) go in the same two launches: each has its
own tables (of one padded rank), which the kernels reach by element offsets from the first's, and its
own output (slices of one packed product, or separate tensors).

A bottleneck adapter's two products run the same way (`bottleneck`): the shrink, then an expand that
adds the down bias, applies the slot's activation and takes the up product with its bias, rounding to
the model's dtype where the eager ops round, into a fresh output (rows of none get zeros).

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
    INTERPRET = type(tl.zeros).__name__ == "InterpretedFunction"  # its tl.dot of bfloat16 is wrong: cast first
    if not torch.cuda.is_available() and type(tl.zeros).__name__ != "InterpretedFunction":
        ERROR = "no CUDA device, and triton was imported before its interpreter was chosen (set TRITON_INTERPRET=1)"
except ImportError as e:  # the CPU path never needs these kernels
    triton = tl = None  # type: ignore[assignment]
    ERROR = f"triton is not installed: {e}"
    INTERPRET = False

    def jit(fn: Any) -> Any:
        return fn


BLOCK_M = 16  # rows per program: tl.dot's smallest tile
ROW_BLOCK = 2  # rows per program when each row is its own segment (`rows`; one is padding)
BLOCK_K = 64  # input columns per unrolled step of a shrink program
ITERS = 2  # unrolled steps per shrink program (H100, kernels alone: 2 beat 4 and 8 at every shape measured)
BLOCK_N = 128  # output columns per expand program
MAX_MODULES = 3


def available() -> bool:
    return ERROR is None


@jit
def _pick(mod, v0, v1, v2):
    return tl.where(mod == 0, v0, tl.where(mod == 1, v1, v2))


@jit
def _round_bf16(v):
    """float32 values rounded to their nearest bfloat16 (ties to even), still float32: by hand, since Triton's
    interpreter truncates, and then storing or casting them to bfloat16 is exact everywhere."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@jit
def _product(a, b, DOT: tl.constexpr):
    """a [M, K] @ b [K, N] in float32: IEEE products on the tensor-core path for tiles of 16 rows or more,
    else broadcast products and sums (rows alone: no tile of padding)."""
    if DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.sum(a[:, :, None] * b[None, :, :], 1)


@jit
def _segment(u, pid_m, rank_ptr, uniq_ptr, starts_ptr, order_ptr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (u, pid_m)'s share of segment u: its slot, its places in `order` and their rows (masked past
    the segment), the rank columns of the slot's block, and whether it has any work."""
    slot = tl.load(uniq_ptr + u)
    rank = tl.load(rank_ptr + slot)
    start = tl.load(starts_ptr + u)
    end = tl.load(starts_ptr + u + 1)
    offs_m = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # places in `order`
    m_ok = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    return slot, offs_m, rows, m_ok, offs_r, offs_r < rank, (start + pid_m * BLOCK_M < end) & (rank > 0)


@jit
def _shrink(x_ptr, a_ptr, part_ptr, rank_ptr, uniq_ptr, starts_ptr, order_ptr, K,
            stride_xm, stride_as, stride_ar, stride_pmod, stride_ps, stride_pm,
            a_off1, a_off2, rank_off1, rank_off2,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ITERS: tl.constexpr,
            SPLIT: tl.constexpr, DOT: tl.constexpr):
    u = tl.program_id(0)
    pid_m = tl.program_id(1)
    mod = tl.program_id(2) // SPLIT
    pid_k = tl.program_id(2) % SPLIT
    slot, offs_m, rows, m_ok, offs_r, r_ok, go = _segment(u, pid_m, rank_ptr + _pick(mod, 0, rank_off1, rank_off2),
                                                          uniq_ptr, starts_ptr, order_ptr, BLOCK_M, BLOCK_R)
    if go:
        a_base = a_ptr + _pick(mod, 0, a_off1, a_off2) + slot * stride_as
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for it in tl.static_range(ITERS):
            offs_k = (pid_k * ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None], mask=k_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += _product(xt, at, DOT)
        # by place in `order`, not by row: the expand's loads of it then wait for no load of `order`
        tl.store(part_ptr + mod * stride_pmod + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_r[None, :], acc,
                 mask=m_ok[:, None])


@jit
def _expand(y_ptr, part_ptr, b_ptr, sb_ptr, g_ptr, bias_ptr, rank_ptr, uniq_ptr, starts_ptr, order_ptr,
            stride_pmod, stride_ps, stride_pm, stride_bs, stride_br, stride_bn,
            n0, n1, n2, sy0, sy1, sy2, t1, t2, y_off1, y_off2, b_off1, b_off2, sb_off1, sb_off2,
            g_off1, g_off2, rank_off1, rank_off2, bias_off1, bias_off2,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
            HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr, DOT: tl.constexpr):
    u = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    mod = tl.where(pid_n >= t2, 2, tl.where(pid_n >= t1, 1, 0))  # the module whose columns this program writes
    tile = pid_n - _pick(mod, 0, t1, t2)
    N = _pick(mod, n0, n1, n2)
    slot, offs_m, rows, m_ok, offs_r, r_ok, go = _segment(u, pid_m, rank_ptr + _pick(mod, 0, rank_off1, rank_off2),
                                                          uniq_ptr, starts_ptr, order_ptr, BLOCK_M, BLOCK_R)
    if go:
        d = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        p_base = part_ptr + mod * stride_pmod + offs_m[:, None] * stride_pm + offs_r[None, :]
        for s in tl.static_range(SPLIT):
            d += tl.load(p_base + s * stride_ps, mask=m_ok[:, None], other=0.0)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        bt = tl.load(b_ptr + _pick(mod, 0, b_off1, b_off2) + slot * stride_bs + offs_r[:, None] * stride_br
                     + offs_n[None, :] * stride_bn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        delta = _product(d, bt, DOT)
        at_n = slot * N + offs_n  # sb and g: [S, N] each, contiguous
        delta = delta + tl.load(sb_ptr + _pick(mod, 0, sb_off1, sb_off2) + at_n, mask=n_ok, other=0.0)[None, :]
        y_at = y_ptr + _pick(mod, 0, y_off1, y_off2) + rows[:, None] * _pick(mod, sy0, sy1, sy2) + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=ok, other=0.0)
        y32 = y.to(tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + _pick(mod, 0, g_off1, g_off2) + at_n, mask=n_ok, other=1.0)[None, :]
            wx = y32
            if HAS_BIAS:
                wx = y32 - tl.load(bias_ptr + _pick(mod, 0, bias_off1, bias_off2) + offs_n, mask=n_ok, other=0.0)[None, :]
            out = y32 + (g - 1.0) * wx + g * delta
        else:
            out = y32 + delta
        if BF16:
            out = _round_bf16(out)
        tl.store(y_at, out.to(y.dtype), mask=ok)


def pow2(n: int, floor: int) -> int:
    out = floor
    while out < n:
        out *= 2
    return out


def _offsets(ts: list[torch.Tensor]) -> list[int]:
    """Each tensor's start in elements from the first's (two entries: modules 1 and 2, 0 where absent)."""
    size = ts[0].element_size()
    out = []
    for t in ts[1:]:
        diff = t.data_ptr() - ts[0].data_ptr()
        assert diff % size == 0 and t.dtype == ts[0].dtype
        out.append(diff // size)
    return out + [0] * (MAX_MODULES - len(ts))


def _shrink_all(x: torch.Tensor, As: list[torch.Tensor], ranks: list[torch.Tensor], uniq: torch.Tensor,
                starts: torch.Tensor, order: torch.Tensor, block_m: int) -> torch.Tensor:
    """The shrink launch for `lora` and `bottleneck`: x [B, in] against each module's A [S, R, in] (of one
    shape and strides, unit stride along `in`), each slot's columns up to its rank [S]. Returns the partial
    sums [modules, splits, B, R padded to a power of two], by place in `order`."""
    B, K = x.shape
    R = As[0].shape[1]
    assert x.stride(1) == 1 and all(a.stride() == As[0].stride() and a.stride(2) == 1 for a in As)
    assert all(r.is_contiguous() for r in ranks)
    block_k = BLOCK_K if K >= BLOCK_K else 16
    split = -(-K // (block_k * ITERS))
    part = torch.empty(len(As), split, B, pow2(R, 16), device=x.device, dtype=torch.float32)
    _shrink[(uniq.shape[0], -(-B // block_m), len(As) * split)](
        x, As[0], part, ranks[0], uniq, starts, order, K, x.stride(0), As[0].stride(0), As[0].stride(1),
        part.stride(0), part.stride(1), part.stride(2), *_offsets(As)[:2], *_offsets(ranks)[:2],
        BLOCK_M=block_m, BLOCK_R=part.shape[3], BLOCK_K=block_k, ITERS=ITERS, SPLIT=split, DOT=block_m >= 16)
    return part


def lora(x: torch.Tensor, ys: list[torch.Tensor], As: list[torch.Tensor], sBs: list[torch.Tensor],
         sbs: list[torch.Tensor], ranks: list[torch.Tensor], uniq: torch.Tensor, starts: torch.Tensor,
         order: torch.Tensor, gs: list[torch.Tensor] | None = None, biases: list[torch.Tensor] | None = None,
         block_m: int = BLOCK_M) -> list[torch.Tensor]:
    """Each y of ys [B, out_i] (row-strided views are fine) += each row's s B A x + s b of module i, in place,
    in float32 rounded once, or DoRA's y + (g - 1)(y - bias) + g (s B A x + s b) where gs are given; for up
    to three sibling modules of one input x [B, in], in two launches. Per module, its per-slot tables:
    A [S, R, in] (unit stride along `in`), sB [out, S, R], sb and g [S, out] contiguous, rank [S] each
    slot's own rank (0: no block), biases [out]; every module's A and sB of one shape but `out`. The
    batch's segments: uniq [U], starts [U + 1], order [B] (rows of no segment are left as they are).
    `block_m` below 16 (ROW_BLOCK, with each row its own segment: `rows`) takes the products without
    tl.dot's 16-row tiles. Returns ys."""
    n = len(ys)
    assert 1 <= n <= MAX_MODULES and len(As) == len(sBs) == len(sbs) == len(ranks) == n
    B = x.shape[0]
    U = uniq.shape[0]
    assert all(y.stride(1) == 1 for y in ys) and all(b.stride() == sBs[0].stride() for b in sBs)
    assert all(t.is_contiguous() for t in (*sbs, *(gs or ())))
    part = _shrink_all(x, As, ranks, uniq, starts, order, block_m)
    BR, split, m_tiles = part.shape[3], part.shape[1], -(-B // block_m)
    rank_off = _offsets(ranks)
    outs = [y.shape[1] for y in ys]
    block_n = BLOCK_N if min(outs) >= BLOCK_N else pow2(min(outs), 16)
    tiles = [-(-o // block_n) for o in outs]
    first = [sum(tiles[:i]) for i in range(n)] + [1 << 30] * (MAX_MODULES - n)
    pad = lambda v: v + [v[0]] * (MAX_MODULES - n)  # noqa: E731
    has_g = gs is not None
    has_bias = has_g and biases is not None
    g0 = gs if gs is not None else sbs
    bias0 = biases if has_bias and biases is not None else sbs
    _expand[(U, m_tiles, sum(tiles))](
        ys[0], part, sBs[0], sbs[0], g0[0], bias0[0], ranks[0], uniq, starts, order,
        part.stride(0), part.stride(1), part.stride(2), sBs[0].stride(1), sBs[0].stride(2), sBs[0].stride(0),
        *pad(outs), *pad([y.stride(0) for y in ys]), first[1], first[2], *_offsets(ys)[:2], *_offsets(sBs)[:2],
        *_offsets(sbs)[:2], *(_offsets(g0)[:2] if has_g else (0, 0)), *rank_off[:2],
        *(_offsets(bias0)[:2] if has_bias else (0, 0)),
        BLOCK_M=block_m, BLOCK_R=BR, BLOCK_N=block_n, SPLIT=split, HAS_G=has_g, HAS_BIAS=has_bias,
        BF16=ys[0].dtype == torch.bfloat16, DOT=block_m >= 16)
    return ys


def rows(x: torch.Tensor, ys: list[torch.Tensor], As: list[torch.Tensor], sBs: list[torch.Tensor],
         sbs: list[torch.Tensor], ranks: list[torch.Tensor], slots: torch.Tensor, ident: torch.Tensor,
         gs: list[torch.Tensor] | None = None, biases: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """`lora` with every row its own segment (slots [B] each row's slot, ident [B + 1] = 0..B): each row reads
    its own adapter's block (rows of one adapter share it through the cache), no product is padded to 16
    rows. For batches of many small groups, where the segments' tiles would be mostly padding."""
    B = x.shape[0]
    return lora(x, ys, As, sBs, sbs, ranks, slots, ident[:B + 1], ident[:B], gs, biases, block_m=ROW_BLOCK)


# The bottleneck's activations by id (as the CPU kernel numbers them: bottleneck.NATIVE_ACTS)
RELU, SILU, GELU, GELU_TANH, TANH, LEAKY_RELU, SIGMOID = range(7)


@jit
def _activation(d, act):
    """d [M, R] float32 through activation `act` (a scalar id), in float32."""
    sig = 1.0 / (1.0 + tl.exp(-d))
    t = 0.7978845608028654 * (d + 0.044715 * d * d * d)
    tanh_t = 2.0 / (1.0 + tl.exp(-2.0 * t)) - 1.0
    out = tl.where(act == RELU, tl.maximum(d, 0.0), d)
    out = tl.where(act == SILU, d * sig, out)
    out = tl.where(act == GELU, 0.5 * d * (1.0 + tl.math.erf(d * 0.7071067811865476)), out)
    out = tl.where(act == GELU_TANH, 0.5 * d * (1.0 + tanh_t), out)
    out = tl.where(act == TANH, 2.0 / (1.0 + tl.exp(-2.0 * d)) - 1.0, out)
    out = tl.where(act == LEAKY_RELU, tl.where(d >= 0.0, d, 0.01 * d), out)
    return tl.where(act == SIGMOID, sig, out)


@jit
def _bn_expand(out_ptr, part_ptr, bd_ptr, b_ptr, ub_ptr, rank_ptr, act_ptr, uniq_ptr, starts_ptr, order_ptr, N,
               stride_om, stride_ps, stride_pm, stride_bds, stride_bs, stride_br, stride_bn, stride_ubs,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
               BF16: tl.constexpr):
    u = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot, offs_m, rows, m_ok, offs_r, r_ok, go = _segment(u, pid_m, rank_ptr, uniq_ptr, starts_ptr, order_ptr,
                                                          BLOCK_M, BLOCK_R)
    if go:
        d = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        p_base = part_ptr + offs_m[:, None] * stride_pm + offs_r[None, :]
        for s in tl.static_range(SPLIT):
            d += tl.load(p_base + s * stride_ps, mask=m_ok[:, None], other=0.0)
        d += tl.load(bd_ptr + slot * stride_bds + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        if BF16:  # each step rounded where the eager ops round: the down product with its bias, the activation
            d = _round_bf16(d)
        d = _activation(d, tl.load(act_ptr + slot))
        if BF16:
            d = _round_bf16(d)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(d, bt, input_precision="ieee")
        if BF16:  # the up product, then its bias
            acc = _round_bf16(acc)
        acc = acc + tl.load(ub_ptr + slot * stride_ubs + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if BF16:
            acc = _round_bf16(acc)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def bottleneck(z: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor, ub: torch.Tensor,
               width: torch.Tensor, act: torch.Tensor, uniq: torch.Tensor, starts: torch.Tensor, order: torch.Tensor
               ) -> torch.Tensor:
    """[B, H] in z's dtype: each row's act(z W_down^T + b_down) W_up^T + b_up with its own slot's blocks (zero
    for rows of no segment, or of a slot without a block here), rounded where the eager products and the
    activation round (`static_residual`). z [B, H]; per-slot tables wd [S, R, H], bd [S, R], wu [H, S, R],
    ub [S, H] (scaling folded in), width [S] int32 each slot's own width (0: none), act [S] int32 its
    activation (RELU..SIGMOID); the segments as for `lora`."""
    B, K = z.shape
    assert bd.is_contiguous() and ub.is_contiguous()
    part = _shrink_all(z, [wd], [width], uniq, starts, order, BLOCK_M)
    BR, split, m_tiles = part.shape[3], part.shape[1], -(-B // BLOCK_M)
    out = torch.zeros(B, K, device=z.device, dtype=z.dtype)
    block_n = BLOCK_N if K >= BLOCK_N else pow2(K, 16)
    _bn_expand[(uniq.shape[0], m_tiles, -(-K // block_n))](
        out, part, bd, wu, ub, width, act, uniq, starts, order, K, out.stride(0), part.stride(1), part.stride(2),
        bd.stride(0), wu.stride(1), wu.stride(2), wu.stride(0), ub.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=BR, BLOCK_N=block_n, SPLIT=split, BF16=z.dtype == torch.bfloat16)
    return out
