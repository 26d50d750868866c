"""The forward pass: the frozen HF model's own modules, called layer by layer over our KV cache.

We do not call the HF decoder layers: we call their submodules in the same order (so the base
model's numbers are the library's), with hook points where adapters act, routed per row by the batch
plan: every Linear of a layer, the residual add of each sub-block, and at the two ends the token
embedding and the LM head (rows whose adapters bring their own).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ..adapters.slots import BatchPlan
from ..architectures import architecture, decoder, text_config
from .fused import FusedOps, pack_layers
from .kv_cache import DecodeStep, PagedKVCache
from .moe import routed_experts
from .small_products import SmallProducts

Fn = TypeVar("Fn", bound=Callable[..., Any])
_MKLDNN = threading.RLock()


def cpu_kernels(fn: Fn) -> Fn:
    """On the CPU in bfloat16, a pass of one token (a batch-1 decode step: every product a matrix-vector
    one) runs ATen's own products, which beat oneDNN's there (SmolLM2's LM head 2.4 against 4.2 ms on
    this project's CPU); every other pass runs oneDNN's, several times faster from two rows up."""

    @functools.wraps(fn)
    def wrapped(self: ModelRunner, input_ids: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return fn(self, input_ids, *args, **kw)
        with _MKLDNN:  # the switch is the process's: two engines in one process take turns
            was = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(input_ids.numel() > 1)
            try:
                return fn(self, input_ids, *args, **kw)
            finally:
                torch._C._set_mkldnn_enabled(was)

    return wrapped  # type: ignore[return-value]


class ModelRunner:
    def __init__(self, model: Any, max_rows: int, max_len: int, kv_tokens: int | None = None, page_size: int = 16,
                 compile_kernels: bool = False, pack: bool = False, native: bool = True) -> None:
        """A pool of `kv_tokens` positions (default: `max_rows` rows of `max_len`, the layout `fixed_tables`
        gives callers that manage no pages: benchmarks and tests). `native`: on the CPU, decode attention by
        the native kernel that reads the pages in place (kv_cache.py)."""
        self.model = model
        self.arch = arch = architecture(model.config.model_type)
        cfg: Any = text_config(model.config)
        self.cfg = cfg
        self.inner: Any = decoder(model)
        self.layers = list(self.inner.layers)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.rope = importlib.import_module(type(self.layers[0]).__module__).apply_rotary_pos_emb
        self.windows = self._windows(cfg)
        self.layer_types: list[str] = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.attn_softcap: float | None = getattr(cfg, arch.attn_softcap, None) if arch.attn_softcap else None
        self.final_softcap: float | None = getattr(cfg, arch.final_softcap, None) if arch.final_softcap else None
        rope = getattr(cfg, "rope_parameters", None) or {}
        # LongRoPE's original context (its long factors apply past it), or 0: see `_longrope`
        self.longrope = int(rope.get("original_max_position_embeddings") or 0) if rope.get("rope_type") == "longrope" else 0
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.row_pages = -(-max_len // page_size)  # pages of one row in the fixed layout
        n_pages = -(-(kv_tokens or max_rows * self.row_pages * page_size) // page_size) + 2  # + the zero page and the sink
        self.cache = PagedKVCache(len(self.layers), self.n_kv, self.head_dim, n_pages, page_size, self.dtype, self.device,
                                  native)
        fused = FusedOps(cfg, self.inner) if compile_kernels and arch.llama_layout else None
        self.fused = fused if fused is not None and fused.enabled else None  # decode_static only
        self.small = SmallProducts(native and self.device.type == "cpu" and self.dtype == torch.bfloat16)
        self.packed = pack_layers(self.layers, arch, self.small.linear) if pack else None

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              gqa: bool) -> torch.Tensor:
        """Attention over the cache, in the model's dtype, as the libraries compute it. With attention-logit
        soft-capping (Gemma 2), which SDPA cannot apply, the library's eager attention: scores, cap, mask,
        float32 softmax, values."""
        if self.attn_softcap is not None:
            return self._capped_attention(q, k, v, mask, scale, self.attn_softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    @staticmethod
    def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                          cap: float) -> torch.Tensor:
        """q [B, H, T, d] over k, v [B, kvh, Lk, d] (H a multiple of kvh: each K/V head serves H / kvh
        consecutive query heads, as repeat_kv lays them out); mask boolean or additive, broadcast to
        [B, 1, T, Lk]."""
        B, H, T, d = q.shape
        kvh = k.shape[1]
        qg = q.reshape(B, kvh, H // kvh * T, d)  # the query heads of one K/V head as one block of rows
        s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, kvh, G * T, Lk]
        s = torch.tanh(s / cap) * cap
        s = s.view(B, kvh, H // kvh, T, -1)
        m = mask[:, :, None] if mask.dim() == 4 else mask  # [B, 1, 1, T, Lk]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype).view(B, kvh, H // kvh * T, -1)
        return torch.matmul(p, v).view(B, H, T, d)

    def embed(self, input_ids: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """The input embeddings of ids [B, T], each row's own where its adapter has them."""
        return plan.embed(input_ids, self.inner.embed_tokens)

    def logits(self, h: torch.Tensor, plan: BatchPlan, rows: list[int] | None = None) -> torch.Tensor:
        """The LM head on normed hidden states (entry n of h is batch row rows[n], or row n), each row's own
        where its adapter has one, soft-capped where the architecture caps, as float32."""
        return plan.logits(h, self.small.module(self.model.lm_head), self._finish, rows)

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does after its head: the final soft-cap (in the model's dtype, as the library
        does), then float32."""
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    @staticmethod
    def _windows(cfg) -> list[int | None]:  # noqa: ANN001
        """Sliding-window size per layer (Mistral, Qwen2 with use_sliding_window), None for full attention."""
        n, w = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
        if not w or getattr(cfg, "use_sliding_window", True) is False:
            return [None] * n
        types = getattr(cfg, "layer_types", None)
        return [w if (types is None or types[i] == "sliding_attention") else None for i in range(n)]

    def _mask(self, start: torch.Tensor, lengths: torch.Tensor, T: int, Lk: int, window: int | None) -> torch.Tensor:
        """[B, 1, T, Lk] bool, True where query t of row b may attend key j."""
        q = start[:, None] + torch.arange(T, device=self.device)[None, :]  # [B, T] absolute positions
        j = torch.arange(Lk, device=self.device)[None, None, :]  # [1, 1, Lk]
        m = (j <= q[:, :, None]) & (j < (start + lengths)[:, None, None])
        if window is not None:
            m &= j > q[:, :, None] - window
        return m[:, None]

    def fixed_tables(self, row0: int, rows: int) -> torch.Tensor:
        """Page tables [rows, P] of rows row0.. in the fixed layout: row r holds the r-th run of `row_pages`
        pages (for callers that manage no pages; the engine's rows hold pages from `pages.PagePool`)."""
        if 1 + (row0 + rows) * self.row_pages > self.cache.n_pages - 1:
            raise ValueError(f"the pool holds {self.cache.n_pages - 1} pages: not rows {row0}..{row0 + rows - 1} "
                             f"of {self.row_pages} pages each")
        r = torch.arange(row0, row0 + rows, device=self.device)[:, None]
        tables = 1 + r * self.row_pages + torch.arange(self.row_pages, device=self.device)[None, :]
        self.cache.ready(int(tables.max()) + 1)
        return tables

    def write_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Entries [L, kvh, N, hd] at positions 0..N-1 of `row` of the fixed layout (an adapter's prefix)."""
        self.cache.write_positions(self.fixed_tables(row, 1)[0].tolist(), 0, keys, values)

    def forward(self, input_ids: torch.Tensor, *, start: torch.Tensor, lengths: torch.Tensor, row0: int = 0,
                plan: BatchPlan, all_logits: bool = False, kv_len: int | None = None,
                rope_shift: torch.Tensor | None = None, tables: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_full` without the extra rows' logits."""
        return self.forward_full(input_ids, start=start, lengths=lengths, row0=row0, plan=plan, all_logits=all_logits,
                                 kv_len=kv_len, rope_shift=rope_shift, tables=tables)[0]

    @cpu_kernels
    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, *, start: torch.Tensor, lengths: torch.Tensor, row0: int = 0,
                     plan: BatchPlan, all_logits: bool = False, kv_len: int | None = None,
                     rope_shift: torch.Tensor | None = None, full_rows: list[int] | None = None,
                     tables: torch.Tensor | None = None, token_plan: BatchPlan | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run B rows on `input_ids` [B, T] (right-padded; row b has lengths[b] real tokens starting at cache
        position start[b]), the rows whose pages are `tables` [B, P] (default: rows row0.. of the fixed
        layout). Writes the real tokens' K/V at their positions (padding goes to the cache's sink) and
        attends over each row's positions 0..start+length-1. Returns logits [B, V] at each row's last real
        token, or [B, T, V] with all_logits (V: the widest vocabulary of the batch's rows; a row's ids past
        its own are -inf).

        `kv_len` (max of start + lengths) is what the caller knows on the host; without it, it is read from
        the tensors, a device synchronisation.
        `rope_shift` [B]: rotary position minus cache position, per row (see methods/prefix.py).
        `full_rows`: also return the logits at every position of these rows, [R, T, V] (prompt logprobs).
        `token_plan`: the plan of the real tokens, row by row, each its own row (see `_packed`).
        """
        B, T = input_ids.shape
        if tables is None:
            tables = self.fixed_tables(row0, B)
        if kv_len is None:
            kv_len = int((start + lengths).max())
        t = torch.arange(T, device=self.device)[None, :]
        pos = start[:, None] + t  # [B, T] cache positions
        slots = self.cache.slots(tables, pos, t < lengths[:, None]).reshape(-1)  # [B * T]
        masks: dict[int | None, torch.Tensor] = {}

        # a decode pass (every row one token at its position start): attention reads the pages in place
        step = DecodeStep(tables, start + lengths - 1, kv_len, self.cache.page_size) \
            if T == 1 and self.attn_softcap is None else None

        # every row a whole prompt from position 0 (no cached prefix, no padding): plain causal attention,
        # which SDPA computes without a mask and without the key blocks past each query block (CPU and CUDA)
        causal = kv_len == T and self.attn_softcap is None and (T == 1 or bool(((start == 0) & (lengths == T)).all()))

        def over_pages(li: int, attn: Any, q: torch.Tensor) -> torch.Tensor:
            """Queries q [B, heads, T, hd] over each row's pages (their K/V written)."""
            w = self.windows[li]
            kc, vc = self.cache.read(li, tables, kv_len)  # [B, kvh, kv_len, hd]
            if causal and (w is None or w >= T):
                return F.scaled_dot_product_attention(q, kc, vc, is_causal=True, scale=attn.scaling,
                                                      enable_gqa=self.n_heads != self.n_kv)
            if w not in masks:
                masks[w] = self._mask(start, lengths, T, kv_len, w)
            return self._sdpa(q, kc, vc, masks[w], attn.scaling, self.n_heads != self.n_kv)  # [B, heads, T, hd]

        def attend(li: int, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kvh = k.shape[1]
            self.cache.write(li, slots, k.transpose(1, 2).reshape(B * T, kvh, -1), v.transpose(1, 2).reshape(B * T, kvh, -1))
            if step is not None:
                return self.cache.decode(li, q, step, self.windows[li], attn.scaling)  # [B, heads, 1, hd]
            return over_pages(li, attn, q)

        rope_pos = pos if rope_shift is None else pos + rope_shift[:, None]
        last = rope_pos[torch.arange(B, device=self.device), lengths - 1] if self.longrope else None
        if token_plan is not None and not all_logits:
            return self._packed(input_ids, lengths, rope_pos, last, slots, plan, token_plan, over_pages, full_rows)
        h = self._layers(self.embed(input_ids, plan), rope_pos, plan, attend, packed=self.packed, last=last)
        full = None if not full_rows else self.logits(self.inner.norm(h[full_rows]), plan, full_rows)
        if not all_logits:
            h = h[torch.arange(B, device=self.device), lengths - 1]  # [B, H]
        return self.logits(self.inner.norm(h), plan), full

    def _packed(self, input_ids: torch.Tensor, lengths: torch.Tensor, rope_pos: torch.Tensor, last: torch.Tensor | None,
                slots: torch.Tensor, plan: BatchPlan, token_plan: BatchPlan,
                over_pages: Callable[[int, Any, torch.Tensor], torch.Tensor], full_rows: list[int] | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward_full` of right-padded rows with the padding left out: the layers run on the N real
        tokens, each its own row of `token_plan` (the rows' adapters, token by token), so a short prompt
        prefilled beside a long one costs its own tokens, not the long one's. Attention alone puts each
        row's queries back in the padded [B, heads, T, hd] layout, over its pages. The ends (logits)
        run per row on `plan`."""
        B, T = input_ids.shape
        sel = (torch.arange(T, device=self.device)[None, :] < lengths[:, None]).reshape(-1).nonzero().squeeze(1)  # [N]
        at = slots[sel]  # each token's cache slot

        def attend(li: int, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            heads, hd = q.shape[1], q.shape[3]  # q [N, heads, 1, hd], k, v [N, kvh, 1, hd]
            self.cache.write(li, at, k[:, :, 0], v[:, :, 0])
            qp = q.new_zeros(B * T, heads, hd).index_copy_(0, sel, q[:, :, 0]).view(B, T, heads, hd).transpose(1, 2)
            o = over_pages(li, attn, qp)  # [B, heads, T, hd]
            return o.transpose(1, 2).reshape(B * T, heads, hd)[sel][:, :, None]  # [N, heads, 1, hd]

        ids = input_ids.reshape(-1)[sel][:, None]  # [N, 1]
        row = sel // T
        h = self._layers(self.embed(ids, token_plan), rope_pos.reshape(-1)[sel][:, None], token_plan, attend,
                         packed=self.packed, last=None if last is None else last[row])[:, 0]  # [N, H]
        full = None
        if full_rows:
            padded = h.new_zeros(B * T, h.shape[-1]).index_copy_(0, sel, h).view(B, T, -1)
            full = self.logits(self.inner.norm(padded[full_rows]), plan, full_rows)
        ends = torch.cumsum(lengths, 0) - 1  # each row's last token among the N
        return self.logits(self.inner.norm(h[ends]), plan), full

    @torch.inference_mode()
    def prefix_kv(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bare model's keys and values [L, n_kv, N, d] for input embeddings [N, H] at positions
        0..N-1, causal: what the cache holds after prefilling them (prompt tuning's virtual tokens)."""
        N = embeds.shape[0]
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []

        zero, n = torch.zeros(1, dtype=torch.long, device=self.device), torch.tensor([N], device=self.device)
        masks = {w: self._mask(zero, n, N, N, w) for w in set(self.windows)}

        def attend(li: int, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ks.append(k[0])
            vs.append(v[0])
            return self._sdpa(q, k, v, masks[self.windows[li]], attn.scaling, self.n_heads != self.n_kv)

        pos = torch.arange(N, device=self.device)[None, :]
        self._layers(embeds[None].to(self.dtype), pos, BatchPlan((), []), attend)
        return torch.stack(ks), torch.stack(vs)

    @cpu_kernels
    @torch.inference_mode()
    def decode_static(self, input_ids: torch.Tensor, pos: torch.Tensor, plan: BatchPlan, kv_len: int,
                      tables: torch.Tensor, rope_pos: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                      head: bool = True) -> torch.Tensor:
        """One decode step of B rows whose pages are tables [B, >= kv_len / page_size], with shapes fixed by
        (B, kv_len) and no host synchronisation, so a CUDA graph can capture it. input_ids [B, 1], pos [B]
        (each row's new cache position, < kv_len), rope_pos [B] its rotary position (default pos). Returns
        logits [B, V] float32; with `embeds` [B, 1, H] the step starts from these input embeddings instead
        of the ids' and with `head=False` it returns the normed hidden states [B, H] (rows whose adapters
        bring their own embedding and LM head: those ends run outside the captured step, graphs.py).

        Attention reads the pages in place on the CPU (`PagedKVCache.decode`).
        """
        slots = self.cache.slots(tables, pos[:, None]).reshape(-1)  # [B]
        step = DecodeStep(tables, pos, kv_len, self.cache.page_size)

        def attend(li: int, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.cache.write(li, slots, k[:, :, 0], v[:, :, 0])
            w = self.windows[li]
            if self.attn_softcap is None:
                return self.cache.decode(li, q, step, w, attn.scaling)  # [B, heads, 1, hd]
            kc, vc = self.cache.read(li, tables, kv_len)  # [B, kvh, kv_len, hd]
            m = step.mask(w, self.cache.mask_dtype)[:, None, None, :kv_len]
            return self._capped_attention(q, kc, vc, m, attn.scaling, self.attn_softcap)

        e = self.embed(input_ids, plan) if embeds is None else embeds
        x = self._layers(e, (pos if rope_pos is None else rope_pos)[:, None], plan, attend, self.fused, self.packed,
                         final_norm=self.inner.norm)
        return self.logits(x[:, 0], plan) if head else x[:, 0]


    def _rotary(self, h: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer: one rotary embedding, or one per layer type with its own base (Gemma 3).
        `last` [B]: each row's last real rotary position (None: every position of `pos` is real)."""
        if not self.arch.rope_per_layer_type:
            one = self._longrope(h, pos, last) if self.longrope else self.inner.rotary_emb(h, pos)
            return [one] * len(self.layers)
        by_type = {t: self.inner.rotary_emb(h, pos, t) for t in set(self.layer_types)}
        return [by_type[t] for t in self.layer_types]

    def _longrope(self, h: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) picks its long or short factors from the largest
        position of the whole call; the library runs one sequence per call, so here each row picks by its
        own largest position (a row's neighbours, or graph padding at the last position, must not switch
        it). Both sets are computed for every row, on positions that force the choice, and each row keeps
        its own. (A prompt past the original length prefilled in chunks takes the short factors for the
        chunks before it; the library's one-call prefill takes the long ones for all.)"""
        B, T = pos.shape
        orig = self.longrope
        long = (pos.amax(dim=1) if last is None else last) + 1 > orig  # [B], by each row's real tokens
        cos_l, sin_l = self.inner.rotary_emb(h, torch.cat([pos, pos.new_full((B, 1), orig)], dim=1))
        cos_s, sin_s = self.inner.rotary_emb(h, torch.where(long[:, None], 0, pos.clamp(max=orig - 1)))  # padding clamped
        pick = long[:, None, None]
        return torch.where(pick, cos_l[:, :T], cos_s), torch.where(pick, sin_l[:, :T], sin_s)

    def _layers(self, h: torch.Tensor, pos: torch.Tensor, plan: BatchPlan, attend: Any,
                fused: FusedOps | None = None, packed: list[dict[str, Any]] | None = None,
                final_norm: Any = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Every decoder layer over h [B, T, H]: the library's submodules in the order the architecture
        describes, adapters at the hook points (each Linear by its own name, fused ones included; the
        residual add of each sub-block, after the sub-block's own output norm where it has one).
        With `fused`, the norms, rotary embedding, SiLU-and-multiply and each residual add with the norm
        that reads it run as compiled equivalents; with `packed`, sibling projections run as one product
        wherever no adapter of the batch changes their input (output changes apply to each slice).
        With `final_norm`, returns the normed output of the last layer."""
        A = self.arch
        B, T = h.shape[:2]
        rotary = self._rotary(h, pos, last)
        if fused is None:
            norm = lambda m, x: m(x)  # noqa: E731
            rope, act_mul = self.rope, None
        else:
            norm = lambda m, x: fused.rms_norm(x, m.weight, m.variance_epsilon)  # noqa: E731
            rope, act_mul = fused.rope, fused.silu_mul

        def add_norm(li: int, loc: Any, h: torch.Tensor, a: torch.Tensor, m: Any,
                     out_norm: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
            """h + a (h + out_norm(a) where the sub-block norms its output), as adapters change it, and the
            next norm of it."""
            r = plan.residual(li, loc, h, a)
            if r is None:  # the plain decoder layer's h + a
                if out_norm is not None:
                    a = out_norm(a)
                if fused is not None and m is not None:
                    return fused.add_rms_norm(h, a, m.weight, m.variance_epsilon)
                r = h + a
            return r, (r if m is None else norm(m, r))

        def project(li: int, module: Any, names: tuple[str, ...], group: str, x: torch.Tensor) -> list[torch.Tensor]:
            pk = packed[li] if packed is not None else {}
            if group in pk and not any(plan.changes_input(li, n) for n in names):
                return plan.linear_out_group(li, names, x, list(pk[group](x)))
            return [plan.linear(li, n, self.small.module(getattr(module, n)), x) for n in names]

        x = norm(self.layers[0].input_layernorm, h)
        for li, layer in enumerate(self.layers):
            attn: Any = layer.self_attn
            qkv = project(li, attn, A.qkv, "qkv", x)
            q, k, v = qkv[0].split(self.qkv_sizes, dim=-1) if A.fused_qkv else qkv
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # [B, T, heads, hd]
            if A.qk_norm:  # each head's queries and keys normed before rotary, as the library does
                q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            q, k = rope(q, k, *rotary[li])  # [B, heads, T, hd], [B, kvh, T, hd]
            o = attend(li, attn, q, k, v).transpose(1, 2).reshape(B, T, -1)
            o = plan.linear(li, "o_proj", self.small.module(attn.o_proj), o)
            attn_norm = getattr(layer, A.attn_out_norm) if A.attn_out_norm else None
            h, x = add_norm(li, "attn", h, o, getattr(layer, A.mlp_in_norm), attn_norm)
            a = self._mlp(li, layer.mlp, x, plan, project, act_mul)
            mlp_norm = getattr(layer, A.mlp_out_norm) if A.mlp_out_norm else None
            nxt = self.layers[li + 1].input_layernorm if li + 1 < len(self.layers) else final_norm
            h, x = add_norm(li, "mlp", h, a, nxt, mlp_norm)
        return h if final_norm is None else x

    def _mlp(self, li: int, mlp: Any, x: torch.Tensor, plan: BatchPlan, project: Any, act_mul: Any) -> torch.Tensor:
        """The MLP of layer li on x [B, T, H]: gated (gate and up as two Linears or one fused), or a
        routed block (`_moe`: its router's and experts' weights; a dense layer of a MoE model is gated)."""
        A = self.arch
        if A.moe and hasattr(mlp, "experts"):
            return self._moe(li, mlp, x, plan)
        gu = project(li, mlp, A.gate_up, "gate_up", x)
        g, u = gu[0].chunk(2, dim=-1) if A.fused_gate_up else gu
        act = getattr(mlp, A.act)
        return plan.linear(li, "down_proj", self.small.module(mlp.down_proj), act(g) * u if act_mul is None else act_mul(g, u))

    def _moe(self, li: int, mlp: Any, x: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """A routed MLP: the router's logits (a Linear to the adapters: LoRA may change them), the top-k
        experts as the library picks and weighs them, then the grouped expert products (moe.py), with
        the adapters' per-pair hook after each."""
        B, T, H = x.shape
        router = mlp.gate
        logits = plan.linear(li, "gate", lambda t: F.linear(t, router.weight), x)  # [B, T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if not self.arch.moe_renormalize or getattr(self.cfg, self.arch.moe_renormalize):
            top = top / top.sum(dim=-1, keepdim=True)
        if self.arch.moe_weights_in_model_dtype:
            top = top.to(logits.dtype)
        rows = torch.arange(B, device=x.device).repeat_interleave(T)

        def hook(name: str, xp: torch.Tensor, ep: torch.Tensor, rp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
            return plan.experts_out(li, name, xp, ep, rp, yp)

        k = router.top_k
        return routed_experts(mlp.experts, x.reshape(-1, H), index.reshape(-1, k), top.reshape(-1, k), rows, hook).view_as(x)
