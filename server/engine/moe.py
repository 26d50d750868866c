"""A routed MLP (mixture of experts) over the library's own router weights and fused 3-D expert weights,
with a hook after each expert product where adapters act per (token, expert) pair.

The experts run as transformers' grouped products do (`grouped_mm_experts_forward`): the (token, expert)
pairs sorted by expert, one grouped product for every expert's gate|up and one for down, weighted and
summed per token. No Python loop over experts or tokens, and no host synchronisation. We use
transformers' own grouped-product dispatcher (`integrations.moe._grouped_mm`: torch's grouped_mm where
the device and dtype have it, its own fallback elsewhere), so the bare model's numbers are the library's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.moe import _grouped_mm

# (projection name, pair inputs [P, in], expert of each pair [P], batch row of each pair [P], outputs [P, out])
PairHook = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [P, in] sorted by group, weight [G, out, in]; offsets [G] int32 cumulative pair counts."""
    return _grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


def group_offsets(groups: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int32 cumulative counts of sorted group ids `groups` (histc, as the library counts: no sync)."""
    h = groups.float() if groups.device.type in ("cpu", "mps") else groups.int()
    return torch.cumsum(torch.histc(h, bins=n, min=0, max=n - 1), dim=0, dtype=torch.int32)


def routed_experts(experts: Any, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                   hook: PairHook) -> torch.Tensor:
    """x [N, H] tokens, index / weights [N, k] their experts and routing weights, rows [N] each token's
    batch row. Returns [N, H] in x's dtype."""
    N, k = index.shape
    E = experts.gate_up_proj.shape[0]
    expert, perm = torch.sort(index.reshape(-1))
    token = perm // k
    xs, rs = x[token], rows[token]
    offsets = group_offsets(expert, E)
    gu = hook("gate_up_proj", xs, expert, rs, grouped_linear(xs, experts.gate_up_proj, offsets))
    gate, up = gu.chunk(2, dim=-1)
    h = experts.act_fn(gate) * up
    y = hook("down_proj", h, expert, rs, grouped_linear(h, experts.down_proj, offsets))
    y = y * weights.reshape(-1)[perm].unsqueeze(-1)
    out = torch.empty_like(y)
    out[perm] = y  # back to (token, k) order
    return out.view(N, k, -1).sum(dim=1).to(x.dtype)
