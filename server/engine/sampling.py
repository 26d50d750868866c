"""Choosing the next token for each row: greedy, or temperature / top-k / top-p with a per-request generator."""

from __future__ import annotations

import torch

from .types import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row's logits [V]; masked entries become -inf."""
    x = logits / p.temperature
    if 0 < p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        srt, order = torch.sort(x, descending=True)
        probs = torch.softmax(srt, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > p.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator],
           want_logprobs: bool) -> tuple[list[int], list[float] | None]:
    """logits [B, V] float32 -> one token per row, and log_softmax(raw logits)[token] if asked."""
    tokens = torch.argmax(logits, dim=-1)  # [B] greedy for every row, overwritten for sampled rows
    for i, p in enumerate(params):
        if p.temperature > 0:
            probs = torch.softmax(filter_logits(logits[i], p), dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=gens[i])[0]
    lp = None
    if want_logprobs:
        lp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
    return tokens.tolist(), lp
