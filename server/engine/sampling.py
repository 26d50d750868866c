"""Choosing the next token of every row in one vectorised pass, on the logits' own device.

Greedy rows take the argmax. Sampled rows get temperature, top-k and top-p as batched tensor ops (one
sort for the whole batch, only when some row asks for top-p), then the exponential race: the argmax of
p_i / E_i with E_i ~ Exp(1) independent is an exact draw from p (what vLLM does with `exponential_`).

Before that, rows that ask for it get their logits processed, each row on its own (vLLM's order):
end-of-sequence banned below `min_tokens`, `logit_bias` added, then the repetition, frequency and
presence penalties from the row's own prompt and generated tokens. Rows that ask for none of these are
not touched. Last, a row with a grammar (structured output) has the tokens it forbids masked.
Logprobs (and the top alternatives) are those of the model's raw logits, as vLLM reports
them by default.

The noise is not drawn from a generator. E_i is a counter-based hash of (row seed, step, token id):
no per-request generator state, the same numbers on the CPU and on CUDA, nothing to synchronise, and
a seed reproduces its output whatever batch its row runs in. Rows never share a stream, so one row's
draws cannot shift another's.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import kernels
from ..errors import AdapterServerError, GenerationFailedError
from .grammar import mask_rows
from .types import SamplingParams, TopLogprobs

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # the multiplier of a well-mixing 32-bit integer hash; < 2**31 so int64 never overflows


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & M32
    x = ((x >> 16) ^ x) * _MUL & M32
    return (x >> 16) ^ x


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit stream key per row from a 64-bit seed and the row's step counter. [B] int64."""
    lo, hi = seeds & M32, (seeds >> 32) & M32
    return mix32(lo ^ mix32(hi ^ mix32(steps & M32)))


@functools.lru_cache(maxsize=4)
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """mix32 of every token id [V]: the same for every step, so computed once per vocabulary and device."""
    return mix32(torch.arange(vocab, device=device, dtype=torch.int64))


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """E [B, V] float32 with E ~ Exp(1), a pure function of (key, token id)."""
    return -torch.log(uniforms(keys, vocab))


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """U [B, V] float32 in (0, 1), never 0 or 1: 24 bits of mix32(key ^ mix32(token id)). On the CPU one
    pass of a native kernel (server/kernels/uniform_noise.cpp, the same bits), else tensor ops."""
    hashes = _token_hashes(vocab, keys.device)
    kernel = _uniform_kernel() if keys.device.type == "cpu" else None
    if kernel is not None:
        keys = keys.contiguous()
        out = torch.empty(keys.shape[0], vocab, dtype=torch.float32)
        kernel(keys.shape[0], vocab, keys.data_ptr(), hashes.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out
    u = mix32(keys[:, None] ^ hashes[None, :]) >> 8  # 24 uniform bits
    return (u.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@functools.cache
def _uniform_kernel() -> Any:
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    return kernels.load("uniform_noise", [I64, I64, P, P, P, ctypes.c_int])


@dataclass(frozen=True)
class RowSampling:
    """What sampling needs from one row: its parameters, its seed and how many tokens it has made; for
    logits processing, its prompt and generated tokens and the ids `min_tokens` bans."""

    params: SamplingParams
    seed: int
    step: int
    prompt_ids: tuple[int, ...] = ()
    output_ids: tuple[int, ...] | list[int] = ()
    eos_ids: tuple[int, ...] = ()
    matcher: Any = None  # the row's grammar matcher (structured output), which masks its logits
    vocab: int = 0  # token ids the row has (its adapter's vocabulary): its logits past them are -inf; 0: all


class Sampled(NamedTuple):
    tokens: list[int]
    logprobs: list[float] | None  # of the chosen tokens, where any row asked
    finite: list[bool]  # rows whose logits were all finite (the others: fail them)
    top: list[TopLogprobs | None]  # each row's most likely alternatives, where it asked


def process_logits(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """The logits of rows whose parameters change them, changed; other rows are returned as they were.
    Indices are gathered on the host and applied in one scatter per kind."""
    which = [i for i, r in enumerate(rows) if r.params.processes_logits]
    if not which:
        return logits
    B, V = logits.shape
    dev = logits.device
    idx = torch.tensor(which, device=dev)
    x = logits.index_select(0, idx)  # [R, V]
    ps = [rows[i].params for i in which]
    bias: list[tuple[int, int, float]] = []  # (row, token, added)
    for k, i in enumerate(which):
        r, p = rows[i], ps[k]
        bias += [(k, t, v) for t, v in p.logit_bias]
        if p.min_tokens and len(r.output_ids) < p.min_tokens:
            bias += [(k, t, float("-inf")) for t in r.eos_ids]
    if bias:
        br, bt, bv = zip(*bias, strict=True)
        x = x.index_put((torch.tensor(br, device=dev), torch.tensor(bt, device=dev)),
                        torch.tensor(bv, device=dev, dtype=x.dtype), accumulate=True)
    pen = [k for k, p in enumerate(ps) if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0]
    if pen:
        out_r = [k for k in pen for _ in rows[which[k]].output_ids]
        out_t = [t for k in pen for t in rows[which[k]].output_ids]
        counts = torch.zeros(len(ps), V, device=dev, dtype=x.dtype)
        if out_r:
            counts.index_put_((torch.tensor(out_r, device=dev), torch.tensor(out_t, device=dev)),
                              torch.ones(len(out_r), device=dev, dtype=x.dtype), accumulate=True)
        rep = [k for k in pen if ps[k].repetition_penalty != 1.0]
        if rep:  # over the prompt and the generated tokens
            seen = counts > 0
            pr_r = [k for k in rep for _ in rows[which[k]].prompt_ids]
            pr_t = [t for k in rep for t in rows[which[k]].prompt_ids]
            if pr_r:
                seen = seen.index_put((torch.tensor(pr_r, device=dev), torch.tensor(pr_t, device=dev)),
                                      torch.tensor(True, device=dev))
            penalty = torch.tensor([p.repetition_penalty for p in ps], device=dev, dtype=x.dtype)[:, None]
            x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        f = torch.tensor([[p.frequency_penalty, p.presence_penalty] for p in ps], device=dev, dtype=x.dtype)
        x = x - f[:, :1] * counts - f[:, 1:] * (counts > 0).to(x.dtype)
    return logits.index_copy(0, idx, x)


def filter_logits(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, kmax: int, any_top_p: bool) -> torch.Tensor:
    """Top-k then top-p on rows of already temperature-scaled logits [N, V]; masked entries -inf.

    top_k [N] (0 = off), top_p [N] (1.0 = off); `kmax` and `any_top_p` are known on the host, so
    choosing the path needs no synchronisation. Entries tied with the last kept value are kept.
    """
    N, V = x.shape
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)  # [N]
    if not any_top_p:
        if kmax >= V:
            return x
        vals = torch.topk(x, kmax, dim=-1).values  # [N, kmax]
        thr = vals.gather(1, (k.clamp(max=kmax) - 1)[:, None])
        thr = thr.masked_fill(k[:, None] >= V, float("-inf"))  # rows without top-k keep everything
        return x.masked_fill(x < thr, float("-inf"))
    srt = torch.sort(x, dim=-1, descending=True).values  # [N, V]
    rank = torch.arange(V, device=x.device)[None, :]
    srt = srt.masked_fill(rank >= k[:, None], float("-inf"))  # top-k first, as before top-p
    probs = torch.softmax(srt, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) > top_p[:, None]  # keep the smallest prefix reaching top_p
    keep = (~drop & (rank < k[:, None])).sum(dim=-1).clamp(min=1)  # [N]
    thr = srt.gather(1, (keep - 1)[:, None])
    return x.masked_fill(x < thr, float("-inf"))


def sample(logits: torch.Tensor, rows: list[RowSampling], want_logprobs: bool) -> Sampled:
    """logits [B, V] float32 -> one token per row, log_softmax(raw logits)[token] where asked (and each
    row's `top_logprobs` alternatives), and whether each row's logits were all finite.

    The only host synchronisation is reading the result, in one transfer.
    """
    B, V = logits.shape
    dev = logits.device
    ok = torch.isfinite(logits)
    if any(0 < r.vocab < V for r in rows):  # a row of a smaller vocabulary: -inf past its ids, by design
        widths = torch.tensor([r.vocab or V for r in rows], device=dev)
        ok |= torch.arange(V, device=dev)[None, :] >= widths[:, None]
    finite = ok.all(dim=-1)  # [B]
    raw = torch.where(finite[:, None], logits, 0.0)
    logits = mask_rows(process_logits(raw, rows), [r.matcher for r in rows], [r.vocab or V for r in rows])
    tokens = torch.argmax(logits, dim=-1)  # [B] greedy for every row, replaced for sampled rows
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if sampled:
        ps = [rows[i].params for i in sampled]
        host = torch.tensor([[p.top_k, rows[i].seed & ((1 << 63) - 1), rows[i].step] for i, p in zip(sampled, ps, strict=True)],
                            dtype=torch.int64)
        fhost = torch.tensor([[p.temperature, p.top_p] for p in ps], dtype=torch.float32)
        ints, floats = host.to(dev, non_blocking=True), fhost.to(dev, non_blocking=True)
        idx = torch.tensor(sampled, device=dev) if len(sampled) < B else None
        x = logits if idx is None else logits.index_select(0, idx)
        kmax = max(p.top_k if 0 < p.top_k < V else V for p in ps)
        x = filter_logits(x / floats[:, :1], ints[:, 0], floats[:, 1], kmax, any(p.top_p < 1.0 for p in ps))
        noise = exponential_noise(row_keys(ints[:, 1], ints[:, 2]), V)
        # argmax p / E = argmax (x - log E); x already holds -inf where filtered
        drawn = torch.argmax(x - torch.log(noise), dim=-1)
        tokens = drawn if idx is None else tokens.index_copy(0, idx, drawn)
    cols = [tokens.to(torch.float64)[:, None], finite.to(torch.float64)[:, None]]
    k = min(V, max((r.params.top_logprobs for r in rows if r.params.logprobs), default=0))
    if want_logprobs:
        lsm = torch.log_softmax(raw, dim=-1)
        cols.append(lsm.gather(1, tokens[:, None]).to(torch.float64))
        if k:
            vals, ids = torch.topk(lsm, k, dim=-1)
            cols += [ids.to(torch.float64), vals.to(torch.float64)]  # ids are exact in float64
    out = torch.cat(cols, dim=1).tolist()  # one transfer
    top: list[TopLogprobs | None] = [None] * B
    if want_logprobs and k:
        for i, r in enumerate(rows):
            n = r.params.top_logprobs if r.params.logprobs else 0
            if n:
                row = out[i]
                top[i] = tuple((int(row[3 + j]), row[3 + k + j]) for j in range(n))
    return Sampled([int(o[0]) for o in out], [o[2] for o in out] if want_logprobs else None, [o[1] > 0 for o in out], top)


def sample_rows(logits: torch.Tensor, rows: list[RowSampling], want_logprobs: bool
                ) -> tuple[Sampled, list[AdapterServerError | None]]:
    """`sample`, with each row's failure its own: a row with non-finite logits gets an error; if the
    batched pass raises, every row is sampled alone so that only the rows that fail, fail."""
    def bad() -> AdapterServerError:
        return GenerationFailedError("the model produced non-finite logits for this request")

    try:
        got = sample(logits, rows, want_logprobs)
        return got, [None if f else bad() for f in got.finite]
    except Exception:
        log.exception("batched sampling failed; sampling each row alone")
    toks, lps_out = [0] * len(rows), [0.0] * len(rows)
    top: list[TopLogprobs | None] = [None] * len(rows)
    errors: list[AdapterServerError | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        try:
            one = sample(logits[i : i + 1], [r], want_logprobs)
            toks[i], lps_out[i], top[i] = one.tokens[0], (one.logprobs[0] if one.logprobs else 0.0), one.top[0]
            errors[i] = None if one.finite[0] else bad()
        except Exception as e:
            errors[i] = GenerationFailedError(f"sampling failed: {e}")
    return Sampled(toks, lps_out if want_logprobs else None, [e is None for e in errors], top), errors
