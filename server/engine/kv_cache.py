"""The paged K/V cache's memory: one pool of pages for every layer. Which page is whose is `pages.py`'s.

Shape [L, kv_heads, n_pages, page_size, head_dim] for keys and for values, allocated once: its addresses
never move, so a CUDA graph replays over it. A pass names each row's pages with a page table [B, P]
(entries past a row's pages are 0, a zero page never written) and writes each new token's K/V at its slot
(page * page_size + offset); padding writes land in the last page, the sink, never read.

A decode step (one query per row) on the CPU reads the pages where they lie (`decode`): a native kernel
(server/kernels/paged_decode.cpp) walks each row's page table, loads each key and value once for all the
query heads that share it, and computes in float32 whatever the cache's dtype; no gathered copy is
written. Measured on SmolLM2 in float32 against the contiguous rows before pages (benchmarks/runner_ab.py,
BENCHMARKS.md) it costs the same at 64 keys and less at 900. Elsewhere (CUDA, where graphs capture the
step; soft-capped attention; no C++ compiler) and for prefill, attention reads a row's pages gathered
into a [B, kv_heads, P * page_size, head_dim] view (`read`, `_gathered_decode`): one index_select per layer
over whole pages, then SDPA. The heads axis leads the pool so that the gathered rows come out contiguous
per head and position.

Pages are zeroed each time a row takes them (`zero`): masked positions are multiplied by zero weights,
and a NaN left there by another row (an adapter whose activations overflow) would poison the row. On the
CPU the pool is resident only as far as pages have been used.
"""

from __future__ import annotations

import ctypes
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from .. import kernels

log = logging.getLogger(__name__)

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# paged_decode.cpp: q, k_pool, v_pool, bf16, tables, table_width, lengths, B, heads, kv_heads, head_dim,
# n_pages, page_size, window, scale, threads, out
PAGED_DECODE = [_P, _P, _P, ctypes.c_int, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float,
                ctypes.c_int, _P]


class DecodeStep:
    """What every layer's decode attention of one step shares: the rows' page tables [B, P] (contiguous,
    int64), each row's query position pos [B] (its keys are 0..pos), the longest row's kv_len, and the
    additive masks [B, n * ps] the PyTorch path builds once per window."""

    def __init__(self, tables: torch.Tensor, pos: torch.Tensor, kv_len: int, page_size: int) -> None:
        n = -(-kv_len // page_size)
        self.tables = tables[:, :n].to(torch.long).contiguous()
        self.pos = pos
        self.lengths = (pos + 1).to(torch.long).contiguous()  # keys per row
        self.width = n * page_size
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        if window not in self._masks:
            j = torch.arange(self.width, device=self.pos.device)[None, :]
            ok = j <= self.pos[:, None]
            if window is not None:
                ok &= j > self.pos[:, None] - window
            self._masks[window] = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))
        return self._masks[window]


class PagedKVCache:
    # Decode attention by the Triton kernel that reads each row's pages in place (server/kernels/paged_attention.py;
    # on CUDA, or in Triton's interpreter elsewhere) instead of gathering them for SDPA. Off by default: not yet
    # measured on a GPU.
    triton_decode = False

    def __init__(self, layers: int, kv_heads: int, head_dim: int, n_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, native: bool = True) -> None:
        """`native`: on the CPU, decode attention by the native kernel (built on first use)."""
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.n_pages, self.page_size = n_pages, page_size
        self.dtype, self.device = dtype, device
        shape = (layers, kv_heads, n_pages, page_size, head_dim)  # [L, kvh, pages, ps, hd]
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.sink = n_pages - 1  # where padding writes: never read, never handed out (page 0 is read, never written)
        self.clean = 0  # pages 0..clean-1 are zeroed or written
        self._gathered = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]  # `read`'s buffers on the CPU
        self.ready(1)  # the zero page
        cpu_types = (torch.float32, torch.bfloat16)
        self._kernel = kernels.load("paged_decode", PAGED_DECODE) if native and device.type == "cpu" and dtype in cpu_types else None
        # the PyTorch path's additive masks: SDPA's query dtype (float32 for bfloat16 on the CPU, see _gathered_decode)
        self.mask_dtype = torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype
        self._triton = self._triton_kernel() if self.triton_decode else None

    def ready(self, high: int) -> None:
        """Zero the pages handed out for the first time (those below `high` not yet zeroed)."""
        if high > self.clean:
            self.k[:, :, self.clean : high].zero_()
            self.v[:, :, self.clean : high].zero_()
            self.clean = high

    def zero(self, pages: list[int]) -> None:
        """Zero pages handed to a row: positions it has not written yet are read with zero weight, and a
        NaN left there by another row (an adapter that overflows) would poison it."""
        if pages:
            self.clean = max(self.clean, max(pages) + 1)
            idx = torch.tensor(pages, device=self.device)
            self.k.index_fill_(2, idx, 0)
            self.v.index_fill_(2, idx, 0)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def slots(self, tables: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The flat slot of each position pos [B, T] of the rows whose pages are tables [B, P]; positions
        not `valid` (padding), past a row's table or on the zero page go to the sink. No host synchronisation."""
        ps, P = self.page_size, tables.shape[1]
        page = tables.gather(1, (pos // ps).clamp(max=P - 1))  # [B, T]
        ok = (pos < P * ps) & (page != 0)
        if valid is not None:
            ok &= valid
        return torch.where(ok, page * ps + pos % ps, self.sink * ps + pos % ps)

    def write(self, li: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V [N, kvh, hd] of layer li at flat slots [N]."""
        flat = (self.kv_heads, self.n_pages * self.page_size, self.head_dim)
        self.k[li].view(flat).index_copy_(1, slots, k.transpose(0, 1))
        self.v[li].view(flat).index_copy_(1, slots, v.transpose(0, 1))

    def read(self, li: int, tables: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's K/V of the rows whose pages are tables [B, P], positions 0..kv_len-1:
        [B, kvh, kv_len, hd] each (gathered: the head axis is the outer one in memory)."""
        B, n = tables.shape[0], self.pages_for(kv_len)
        idx = tables[:, :n].reshape(-1)
        pages = (self.kv_heads, self.n_pages, self.page_size * self.head_dim)
        shape = (self.kv_heads, B * n, self.page_size * self.head_dim)
        out = []
        for i, pool in enumerate((self.k[li], self.v[li])):
            if self.device.type == "cpu":  # into a buffer kept across layers and steps: no allocation per layer
                g = torch.index_select(pool.view(pages), 1, idx, out=self._buffer(i, shape))
            else:  # a CUDA graph's step allocates from its own pool: no buffer may move under it
                g = pool.view(pages).index_select(1, idx)  # [kvh, B * n, ps * hd]
            out.append(g.view(self.kv_heads, B, n * self.page_size, self.head_dim)[:, :, :kv_len].transpose(0, 1))
        return out[0], out[1]

    @staticmethod
    def _triton_kernel() -> ModuleType | None:
        """server/kernels/paged_attention.py where its kernels can run here."""
        from ..kernels import paged_attention

        if not paged_attention.available():
            log.warning("the paged decode attention kernel is unavailable: %s", paged_attention.ERROR)
            return None
        return paged_attention

    def _buffer(self, i: int, shape: tuple[int, int, int]) -> torch.Tensor:
        """The i-th gather buffer (keys 0, values 1) viewed as `shape`; it grows, never shrinks."""
        n = shape[0] * shape[1] * shape[2]
        if self._gathered[i].numel() < n:
            self._gathered[i] = torch.empty(n, dtype=self.dtype, device=self.device)
        return self._gathered[i][:n].view(shape)

    def decode(self, li: int, q: torch.Tensor, step: DecodeStep, window: int | None, scale: float) -> torch.Tensor:
        """Layer li's attention of one query per row: q [B, H, 1, d] over the pages of `step`, each row's
        keys 0..pos (the last `window` of them on a sliding-window layer). Returns [B, H, 1, d]."""
        B, H, _, d = q.shape
        if self._triton is not None and self._triton.supports(H, self.kv_heads, self.head_dim, self.page_size):
            out = self._triton.decode(q[:, :, 0], self.k[li], self.v[li], step.tables, step.lengths, window, scale)
            return out.view(B, H, 1, d)
        if self._kernel is not None:
            qf = q.reshape(B, H, d).float().contiguous()
            out = torch.empty_like(qf)
            bad = self._kernel(qf.data_ptr(), self.k[li].data_ptr(), self.v[li].data_ptr(), self.dtype == torch.bfloat16,
                               step.tables.data_ptr(), step.tables.shape[1], step.lengths.data_ptr(), B, H,
                               self.kv_heads, d, self.n_pages, self.page_size, window or 0, scale,
                               torch.get_num_threads(), out.data_ptr())
            if bad:
                raise IndexError("a page table names a page outside the pool, or fewer pages than its row's keys")
            return out.to(q.dtype).view(B, H, 1, d)
        return self._gathered_decode(li, q, step, window, scale)

    def _gathered_decode(self, li: int, q: torch.Tensor, step: DecodeStep, window: int | None, scale: float
                         ) -> torch.Tensor:
        """`decode` in PyTorch ops: the rows' pages gathered (`read`), then SDPA with the K/V heads as the
        batch and a head's G queries as its rows (it reads the gathered memory, [kvh, B, L, d], as it lies:
        no GQA expansion). On the CPU in bfloat16 it computes in float32: torch's bfloat16 CPU kernel is
        2.4x (40 keys) to 5x (300 keys) slower there at batch 16 (SmolLM2's shapes)."""
        B, H, _, d = q.shape
        qs = q.view(B, self.kv_heads, H // self.kv_heads, d).transpose(0, 1)  # [kvh, B, G, d]
        keys, values = (t.transpose(0, 1) for t in self.read(li, step.tables, step.width))  # [kvh, B, L, d]
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            qs, keys, values = qs.float(), keys.float(), values.float()
        mask = step.mask(window, qs.dtype)[None, :, None, :]
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale)  # [kvh, B, G, d]
        return o.to(q.dtype).transpose(0, 1).reshape(B, H, 1, d)

    def write_positions(self, table: list[int], first: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Entries [L, kvh, N, hd] at positions first..first+N-1 of the row whose pages are `table` (an
        adapter's prefix, before its prompt)."""
        ps = self.page_size
        n = keys.shape[2]
        slots = torch.tensor([table[p // ps] * ps + p % ps for p in range(first, first + n)], device=self.device)
        flat = (self.layers, self.kv_heads, self.n_pages * ps, self.head_dim)
        self.k.view(flat).index_copy_(2, slots, keys.to(self.dtype))
        self.v.view(flat).index_copy_(2, slots, values.to(self.dtype))

    def copy_page(self, src: int, dst: int) -> None:
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]

    def page_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.page_size * self.head_dim * self.k.element_size()

    def nbytes(self) -> int:
        """Bytes of the pages up to the highest handed out so far (the rest is never touched on the CPU)."""
        return self.clean * self.page_bytes()
