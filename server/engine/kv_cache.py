"""Per-row contiguous K/V cache for every layer. Row i belongs to the i-th running sequence.

Shape [L, rows, kv_heads, cap, head_dim]. `cap` grows by doubling as the longest running sequence
needs it and shrinks again when that sequence leaves, so one long request does not keep the memory
of every row at its length. Running rows stay packed at 0..n-1: a finished row is filled by moving
the last one into it, so attention reads a view, never a gather.

A static cache (for CUDA graphs, which replay fixed addresses) is allocated once at its full shape,
[L, rows, kv_heads, max_len, head_dim], and never moves; each row pins a whole context.
"""

from __future__ import annotations

import torch


def pow2(n: int, floor: int) -> int:
    out = floor
    while out < n:
        out *= 2
    return out


class KVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, min_cap: int = 64, min_rows: int = 4,
                 static: bool = False) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_rows, self.max_len = rows, max_len
        self.min_cap, self.min_rows = min_cap, min(min_rows, rows)
        self.dtype, self.device = dtype, device
        self.static = static
        self.rows = self.cap = 0
        self.k = self.v = torch.empty(0)
        if static:
            self._alloc(rows, max_len, 0, 0)
        else:
            self._alloc(self.min_rows, min_cap, 0, 0)

    def _alloc(self, rows: int, cap: int, keep_rows: int, keep_len: int) -> None:
        shape = (self.layers, rows, self.kv_heads, cap, self.head_dim)  # [L, rows, kvh, cap, hd]
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if keep_rows and keep_len:
            k[:, :keep_rows, :, :keep_len] = self.k[:, :keep_rows, :, :keep_len]
            v[:, :keep_rows, :, :keep_len] = self.v[:, :keep_rows, :, :keep_len]
        self.k, self.v, self.rows, self.cap = k, v, rows, cap

    def shape_for(self, rows: int, needed: int) -> tuple[int, int]:
        """The (rows, cap) the cache takes for `rows` sequences whose longest needs `needed` positions."""
        if self.static:
            return max(rows, 1), self.max_len
        return (min(pow2(max(rows, 1), self.min_rows), self.max_rows),
                min(pow2(needed, self.min_cap), max(self.max_len, needed)))

    def tokens_for(self, rows: int, needed: int) -> int:
        r, c = self.shape_for(rows, needed)
        return r * c

    def fit(self, rows: int, needed: int, used_rows: int, used_len: int) -> None:
        """Grow (or shrink by 4x or more) to hold `rows` rows of `needed` positions, keeping what is in use."""
        if self.static:
            if rows > self.rows or needed > self.cap:
                raise ValueError(f"static KV cache holds {self.rows} rows of {self.cap}; asked {rows} of {needed}")
            return
        r, c = self.shape_for(rows, needed)
        if r > self.rows or c > self.cap or r * 4 <= self.rows or c * 4 <= self.cap:
            r, c = max(r, used_rows), max(c, used_len)
            self._alloc(r, c, min(used_rows, r), min(used_len, c))

    def write_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Entries [L, kvh, N, hd] at positions 0..N-1 of `row` (an adapter's prefix, before its prompt)."""
        n = keys.shape[2]
        self.k[:, row, :, :n] = keys
        self.v[:, row, :, :n] = values

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
