"""A routed MLP (mixture of experts) over the library's own router weights and fused 3-D expert weights,
with a hook after each expert product where adapters act per (token, expert) pair.

The experts run as transformers' grouped products do (`grouped_mm_experts_forward`): the (token, expert)
pairs sorted by expert, one grouped product for every expert's gate|up and one for down, weighted and
summed per token, with no Python loop over experts or tokens. We use transformers' own grouped-product
dispatcher (`integrations.moe._grouped_mm`, a private helper: torch's grouped_mm where the device and
dtype have it, its fallback elsewhere), so the bare model's numbers are the library's. Torch's native
kernel never synchronises with the host; its fallback does (`capture_refusal`).
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
    """[n] int32 cumulative counts of the sorted group ids `groups`, counted exactly (searchsorted: a float
    histogram, as the library counts, puts ids into the next bin once there are thousands of groups)."""
    ids = torch.arange(n, device=groups.device, dtype=groups.dtype)
    return torch.searchsorted(groups, ids, right=True).to(torch.int32)


def capture_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a routed MLP's step cannot be captured in a CUDA graph here, or None: torch's grouped product
    runs natively only in bfloat16 on compute capability 9.x and 10.x; elsewhere its fallback reads the
    group sizes on the host, which a capture forbids."""
    if device.type != "cuda":
        return None
    if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "a routed MLP's grouped products read group sizes on the host outside bfloat16 on sm90 / sm100"
    return None


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
