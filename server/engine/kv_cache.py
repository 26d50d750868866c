"""Per-row contiguous K/V cache for every layer. Row i belongs to the i-th running sequence.

Shape [L, rows, kv_heads, cap, head_dim]. `cap` grows by doubling as the longest running sequence
needs it and shrinks again when that sequence leaves, so one long request does not keep the memory
of every row at its length. Running rows stay packed at 0..n-1: a finished row is filled by moving
the last one into it, so attention reads a view, never a gather.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, min_cap: int = 64) -> None:
        self.shape = (layers, rows, kv_heads, head_dim)
        self.max_len = max_len
        self.min_cap = min_cap
        self.dtype, self.device = dtype, device
        self.cap = 0
        self.k = self.v = torch.empty(0)
        self._alloc(min_cap, 0)

    def _alloc(self, cap: int, keep: int) -> None:
        L, R, H, D = self.shape
        k = torch.zeros(L, R, H, cap, D, dtype=self.dtype, device=self.device)  # [L, rows, kvh, cap, hd]
        v = torch.zeros_like(k)
        if keep:
            k[:, :, :, :keep] = self.k[:, :, :, :keep]
            v[:, :, :, :keep] = self.v[:, :, :, :keep]
        self.k, self.v, self.cap = k, v, cap

    def fit(self, needed: int, used: int) -> None:
        """Make cap a power of two >= needed (<= max_len), keeping the first `used` positions of every row."""
        cap = self.min_cap
        while cap < needed:
            cap *= 2
        cap = min(cap, max(self.max_len, needed))
        if cap > self.cap or cap * 4 <= self.cap:
            self._alloc(cap, min(used, cap))

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def cap_for(needed: int, min_cap: int = 64) -> int:
        cap = min_cap
        while cap < needed:
            cap *= 2
        return cap
