"""What a PEFT adapter saves at the two ends of the model: trained embeddings and LM heads (docs/adapters.md §10).

PEFT writes these under the module's full path (`base_model.model.` first, or `base_model.` for prompt
learning, the adapter name dropped), in more shapes than its docs say; these are the ones its 0.21 writes (checked on tied and untied bases,
with and without a resized vocabulary):

| key after the module path                 | what it is                                                  |
|-------------------------------------------|-------------------------------------------------------------|
| `.weight`, module in `modules_to_save`   | a trained copy of the module (its end only)                 |
| `.modules_to_save.weight`                | the same, saved inside its wrapper (a resized vocabulary)   |
| `.weight`, module not in `modules_to_save` | the base table as resized for training (save_embedding_layers) |
| `.original_module.weight`, `.base_layer.weight`, `.token_adapter.base_layer.weight` | the same, under a wrapper |
| `.token_adapter.trainable_tokens_delta`  | trained rows (LoRA's `trainable_token_indices`): whole new rows |
| `.trainable_tokens_delta`                | the same for PEFT's TRAINABLE_TOKENS type (`token_indices`) |
| `.lora_embedding_A`, `.lora_embedding_B` | LoRA on the embedding: `[r, V]`, `[H, r]`                   |
| `.lora_A.weight`, `.lora_B.weight`       | LoRA on the LM head: `[r, H]`, `[V, r]`                     |

On a tied base one table sits under both ends: a base table saved for one end is the other's too, and
trained rows of the embedding are the head's rows as well (PEFT ties its token adapter to the head),
while a trained copy or a LoRA stays on its own end (unless `ensure_weight_tying`, where PEFT saves
both ends itself). Each end is then reduced to a `VocabSide`: a trained copy is a table of its own; a
saved base table (frozen while training, loaded by PEFT over the base's) gives the rows that differ from
the base's as served and the rows it adds, its others being the base's own; trained rows stay rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import InvalidAdapterError, UnsupportedAdapterError
from ..methods.vocab import VocabSide, VocabWeights
from ..spec import BaseModelInfo, row_hashes
from .tensors import expect_shape

PREFIX = "base_model.model."
# prompt learning has no tuner wrapper between PeftModel and the model: its module copies sit one level up
PROMPT_PREFIX, PROMPT_TYPES = "base_model.", ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
SUFFIXES: dict[str, str] = {  # longest first: the first that a key ends with says what it is
    ".token_adapter.trainable_tokens_delta": "tokens",
    ".token_adapter.base_layer.weight": "base",
    ".modules_to_save.weight": "copy",
    ".original_module.weight": "base",
    ".trainable_tokens_delta": "tokens",
    ".base_layer.weight": "base",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".weight": "plain",
}


@dataclass
class _End:
    """What the file holds for one end (host float32), with the key each came from."""

    module: str
    copy: torch.Tensor | None = None
    base: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    indices: list[int] | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    keys: dict[str, str] = field(default_factory=dict)  # part -> its key

    @property
    def empty(self) -> bool:
        return all(t is None for t in (self.copy, self.base, self.tokens, self.lora_A, self.lora_B))


def _matches(module: str, names: list[str]) -> bool:
    """PEFT's rule for modules_to_save and trainable_token_indices keys: the module path ends with the name."""
    return any(module.endswith(n) for n in names)


def _names(cfg: dict[str, Any], field_name: str) -> list[str]:
    v = cfg.get(field_name) or []
    if not (isinstance(v, list) and all(isinstance(e, str) for e in v)):
        raise InvalidAdapterError(f"{field_name} must be a list of module names", key=field_name)
    return v


def _check_modules_to_save(cfg: dict[str, Any], base: BaseModelInfo) -> list[str]:
    names = _names(cfg, "modules_to_save")
    for n in names:
        if not _matches(base.embed_module, [n]) and not _matches(base.head_module, [n]):
            raise UnsupportedAdapterError(
                f"modules_to_save names {n!r}: a trained copy of the input embedding ({base.embed_module}) or the "
                f"LM head ({base.head_module}) is served, of no other module", key="modules_to_save")
    return names


def _indices(cfg: dict[str, Any], end: _End, standalone: bool, key: str, tied_to: str | None) -> list[int]:
    """The token ids of one end's trained rows, in the order the file holds them. `tied_to`: on a tied base,
    the LM head's rows are the embedding's (PEFT's tied token adapter) where the config names only it."""
    if standalone:
        field_name, v = "token_indices", cfg.get("token_indices")
    else:
        field_name, v = "trainable_token_indices", cfg.get("trainable_token_indices")
        if isinstance(v, dict):
            hits = [ids for name, ids in v.items() if isinstance(name, str) and _matches(end.module, [name])]
            if not hits and tied_to is not None:
                hits = [ids for name, ids in v.items() if isinstance(name, str) and _matches(tied_to, [name])]
            if len(hits) != 1:
                raise InvalidAdapterError(f"trainable_token_indices names no single entry for {end.module}", key=key)
            v = hits[0]
    if not (isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)):
        raise InvalidAdapterError(f"{field_name} must be a non-empty list of token ids", key=field_name)
    if len(set(v)) != len(v):
        raise InvalidAdapterError(f"{field_name} names a token id twice", key=field_name)
    return list(v)


def split_vocab(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelInfo,
                lora_scale: Callable[[str, int], float]) -> tuple[dict[str, torch.Tensor], VocabWeights | None]:
    """Take the embedding's and the LM head's tensors out of a PEFT file: (the other tensors, this adapter's
    vocabulary, or None when it keeps the base's). `lora_scale(module, r)`: the LoRA scaling of a module."""
    mts = _check_modules_to_save(cfg, base)
    ends = {"embed": _End(base.embed_module), "head": _End(base.head_module)}
    rest: dict[str, torch.Tensor] = {}
    standalone = cfg.get("peft_type") == "TRAINABLE_TOKENS"
    prefix = PROMPT_PREFIX if cfg.get("peft_type") in PROMPT_TYPES else PREFIX
    # With ensure_weight_tying on a tied base, PEFT keeps one trained copy for both ends and saves it under
    # the head's plain key too; a copy saved inside its wrapper (a resized vocabulary) makes the plain key
    # the copy as well. Elsewhere a plain key of a module not in modules_to_save is the base table.
    ensure = bool(cfg.get("ensure_weight_tying")) and base.tied and _matches(base.embed_module, mts)
    wrapped = {end.module for end in ends.values() if prefix + end.module + ".modules_to_save.weight" in tensors}
    for key, t in tensors.items():
        side = None
        for s, end in ends.items():
            if key.startswith(prefix + end.module + "."):
                side = s
        if side is None:
            rest[key] = t
            continue
        end = ends[side]
        tail = key[len(prefix + end.module) :]
        part = next((p for suffix, p in SUFFIXES.items() if tail == suffix), None)
        if part == "plain":
            trained = _matches(end.module, mts) or end.module in wrapped or (ensure and side == "head")
            part = "copy" if trained else "base"
        if part is None or (part in ("lora_A", "lora_B") and ("embedding" in tail) != (side == "embed")):
            why = ("DoRA on the embedding or the LM head is not served" if "magnitude" in tail else
                   "a LoRA bias on the LM head is not served" if "bias" in tail else
                   "not a part of the embedding or LM head that PEFT saves and this server reads")
            raise UnsupportedAdapterError(why, key=key)
        if part in end.keys:
            if part in ("base", "copy") and torch.equal(getattr(end, part), t):
                continue  # the same table under two names (a wrapper and the module it holds)
            raise InvalidAdapterError(f"two tensors for the same part of {end.module} ({end.keys[part]} and this)", key=key)
        end.keys[part] = key
        if part == "tokens":
            tied_to = base.embed_module if base.tied and side == "head" else None
            end.tokens, end.indices = t, _indices(cfg, end, standalone, key, tied_to)
        else:
            setattr(end, part, t)
    if base.tied:
        _tie(ends["embed"], ends["head"], bool(cfg.get("ensure_weight_tying")))
    sides = {s: _side(s, end, base, lora_scale) for s, end in ends.items()}
    if sides["embed"] is None and sides["head"] is None:
        return rest, None
    V0 = base.vocab_size
    for s, other in (("embed", "head"), ("head", "embed")):
        # one end resized down, the other as the base's: the base's rows past the smaller size drop out (a
        # vocabulary resized to its tokenizer, Qwen's padding rows gone); resized up, they are missing
        o = sides[other]
        if sides[s] is None and o is not None and o.size < V0:
            sides[s] = VocabSide(o.size)
    e, h = (v.size if v is not None else V0 for v in (sides["embed"], sides["head"]))
    if e != h:
        raise InvalidAdapterError(
            f"the adapter's input embedding has {e} token ids and its LM head {h} (the base model has {V0}): "
            "PEFT saved no rows for the ids one end lacks; train that end too (modules_to_save or "
            "trainable_token_indices), so that both ends hold every id", key=prefix + (base.head_module if h < e else base.embed_module))
    return rest, VocabWeights(e, sides["embed"], sides["head"])


def _tie(embed: _End, head: _End, ensure: bool) -> None:
    """One table under both ends of a tied base: its base table is both ends', and trained rows of the
    embedding are the head's rows too, unless the file holds the head's own. With `ensure_weight_tying`
    the embedding's trained copy is the head's too (PEFT saves it under the head's plain key as well,
    which would otherwise read as the head's base table)."""
    if ensure and embed.copy is not None and head.copy is None:
        head.copy, head.base = embed.copy, None
        head.keys["copy"] = embed.keys["copy"]
    if embed.base is not None and head.base is not None and not torch.equal(embed.base, head.base):
        raise InvalidAdapterError("the base is tied, but the file holds two different base tables for the "
                                  "embedding and the LM head", key=head.keys["base"])
    shared = embed.base if embed.base is not None else head.base
    embed.base = shared
    if head.copy is None:
        head.base = shared
    if embed.tokens is not None and head.tokens is None and head.copy is None:
        head.tokens, head.indices = embed.tokens, embed.indices
        head.keys["tokens"] = embed.keys["tokens"]


def _side(side: str, end: _End, base: BaseModelInfo, lora_scale: Callable[[str, int], float]) -> VocabSide | None:
    """One end as served: its size, a table of its own (a trained copy) or the rows it replaces or adds over
    the base's, its LoRA."""
    if end.empty:
        return None
    H, V0 = base.hidden_size, base.vocab_size
    if end.copy is not None and any(t is not None for t in (end.tokens, end.lora_A, end.lora_B)):
        raise UnsupportedAdapterError("a trained copy of the module and LoRA or trained rows on it at once",
                                      key=end.keys["copy"])
    table = end.copy if end.copy is not None else end.base
    if table is not None:
        if table.dim() != 2 or table.shape[1] != H or table.shape[0] < 1:
            raise InvalidAdapterError(f"shape {tuple(table.shape)} is not [vocabulary, {H}]",
                                      key=end.keys.get("copy") or end.keys["base"])
        size = int(table.shape[0])
    else:
        size = max(V0, max(end.indices or [0]) + 1)
    lora_A = lora_B = None
    scale = 1.0
    if end.lora_A is not None or end.lora_B is not None:
        if end.lora_A is None or end.lora_B is None:
            raise InvalidAdapterError("LoRA needs both A and B", key=end.keys.get("lora_A") or end.keys["lora_B"])
        A, B = end.lora_A, end.lora_B
        r = int(A.shape[0]) if A.dim() == 2 else 0
        if r < 1:
            raise InvalidAdapterError(f"shape {tuple(A.shape)} has no rank", key=end.keys["lora_A"])
        expect_shape(end.keys["lora_A"], A, (r, size) if side == "embed" else (r, H))
        expect_shape(end.keys["lora_B"], B, (H, r) if side == "embed" else (size, r))
        lora_A, lora_B, scale = A.clone(), B.clone(), lora_scale(end.module, r)
    index = rows = None
    if end.tokens is not None:
        idx = end.indices or []
        expect_shape(end.keys["tokens"], end.tokens, (len(idx), H))
        if max(idx) >= size:
            raise InvalidAdapterError(f"trained token id {max(idx)} is past the {size} rows of {end.module}",
                                      key=end.keys["tokens"])
        index, rows = torch.tensor(idx, dtype=torch.long), end.tokens.clone()
    if end.copy is not None:  # trained whole: a table of its own
        table = end.copy.clone()
    elif end.base is not None:
        # the base table as it was while training (frozen there), which PEFT loads over the base's: its rows that
        # differ from the base's as served (an embedding trained before the resize, say) and the rows it adds
        # are kept; the others are the base's own. Where the base table is not plain weights (a quantized
        # head), its rows below the base's are taken as the base's.
        table = None
        extra = torch.cat([_differing(end.base, base, side), torch.arange(V0, max(V0, size))])
        if index is not None:
            extra = extra[~torch.isin(extra, index)]
        if len(extra):
            index = extra if index is None else torch.cat([index, extra])
            add = end.base[extra]
            rows = add.clone() if rows is None else torch.cat([rows, add])
    elif index is not None:
        missing = sorted(set(range(V0, size)) - set(index.tolist()))
        if missing:
            raise InvalidAdapterError(f"ids {missing[0]}..{missing[-1]} of {end.module} are past the base model's "
                                      f"{V0} and not saved", key=end.keys["tokens"])
    if table is None and index is None and lora_A is None and size == V0:
        return None  # the base's own, as saved for training
    return VocabSide(size, table, index, rows, lora_A, lora_B, scale)


def _differing(t: torch.Tensor, base: BaseModelInfo, side: str) -> torch.Tensor:
    """The ids below the base's whose rows of t [V, H] differ from the base table's in the dtype it is served
    in (compared by the hashes of their bits: BaseModelInfo.rows); none where those are not known."""
    if side not in base.rows:
        return torch.zeros(0, dtype=torch.long)
    dtype, hashes = base.rows[side]
    n = min(len(hashes), t.shape[0])
    return (row_hashes(t[:n].to(dtype)) != hashes[:n]).nonzero().flatten()
