"""Plain data describing a parsed, validated adapter, and what a checkpoint is checked against.

Tensors here live on the host in float32; methods copy them into device slots.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ..architectures import architecture, text_config
from .families import Method

Format = Literal["peft", "adapterhub"]
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # a routed MLP's fused expert weights, [E, out, in] each
Location = Literal["attn", "mlp"]


@dataclass(frozen=True)
class BaseModelInfo:
    """The facts about the frozen base model that every adapter tensor is validated against."""

    model_type: str
    hidden_size: int
    num_layers: int
    # full module path -> (out_features, in_features), for every Linear an adapter may target
    linears: dict[str, tuple[int, int]]
    num_attention_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    quantization: str = "none"  # the Linears' weights: "none", "int8", "int4"; nothing folds into quantized ones
    # (module path prefix, what it is) of the model's parts outside the text decoder (a vision tower)
    refused: tuple[tuple[str, str], ...] = ()
    # a routed MLP's experts module path -> {parameter: (experts, out, in)} (transformers' fused 3-D weights)
    experts: dict[str, dict[str, tuple[int, int, int]]] = field(default_factory=dict)
    # The vocabulary: the input embedding's and the LM head's module paths and rows (token ids), whether
    # the checkpoint ties them (one table: what an adapter trains on one side may reach the other, as in
    # PEFT), and how many tokens the base tokenizer has (0: not known here).
    embed_module: str = "model.embed_tokens"
    head_module: str = "lm_head"
    vocab_size: int = 0
    tied: bool = False
    tokenizer_size: int = 0
    # the base tokenizer's files (name -> bytes), which an adapter's partial set of tokenizer files lays over
    tokenizer_files: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    # side ("embed", "head") -> (the dtype its table is served in, a hash of each row's bits [V] int64 on the
    # host): what tells a saved table's rows that differ from the base's, without keeping the table twice.
    # Absent where the table is not plain weights (a quantized head).
    rows: dict[str, tuple[torch.dtype, torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def from_model(model: Any, tokenizer: Any = None) -> BaseModelInfo:
        """The facts of a loaded model, and of its tokenizer where given (what adapter tokenizers are checked
        against and laid over)."""
        # formats reads this module at import; it is read here, when a model is described, not at import
        from .formats.tokenizer import tokenizer_files

        arch = architecture(model.config.model_type)
        cfg: Any = text_config(model.config)
        layers = arch.decoder + ".layers."
        linears = {
            name: (m.out_features, m.in_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(layers)
        }
        experts: dict[str, dict[str, tuple[int, int, int]]] = {}
        for name, m in model.named_modules():
            if arch.moe and name.startswith(layers) and hasattr(m, "experts") and hasattr(m, "gate"):
                linears[f"{name}.gate"] = tuple(m.gate.weight.shape)  # the router: F.linear with a [E, H] weight
                experts[f"{name}.experts"] = {p: tuple(getattr(m.experts, p).shape) for p in EXPERT_PARAMS}
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        quant = next((m.scheme for name, m in model.named_modules() if name.startswith(layers) and getattr(m, "quantized", False)),
                     "none")
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): name for name, m in model.named_modules()}
        return BaseModelInfo(model.config.model_type, cfg.hidden_size, cfg.num_hidden_layers, linears, heads,
                             getattr(cfg, "num_key_value_heads", None) or heads, head_dim, quant, arch.refused_modules, experts,
                             embed_module=names[id(embed)], head_module=names[id(head)],
                             vocab_size=int(embed.weight.shape[0]), tied=tied_embeddings(model),
                             tokenizer_size=len(tokenizer) if tokenizer is not None else 0,
                             tokenizer_files={} if tokenizer is None else tokenizer_files(tokenizer),
                             rows={side: (m.weight.dtype, _row_hashes_of(m.weight)) for side, m in
                                   (("embed", embed), ("head", head)) if not getattr(m, "quantized", False)})

    def outside(self, module: str) -> str | None:
        """What part of the model `module` belongs to where that part is not served (the vision tower), or None."""
        return next((what for prefix, what in self.refused if module == prefix or module.startswith(prefix + ".")), None)

    @property
    def fold_refusal(self) -> str | None:
        """Why no adapter may be folded into these weights, or None: a fold into quantized weights would be
        rounded away (and the layers keep no weight to fold into)."""
        if self.quantization != "none":
            return f"folding is off: the base model's weights are quantized ({self.quantization})"
        return None

    def side(self, module: str) -> str | None:
        """"embed" or "head" for the input embedding's or the LM head's module path, else None."""
        return "embed" if module == self.embed_module else "head" if module == self.head_module else None

    @staticmethod
    def split(module: str) -> tuple[int, str]:
        """'model.layers.3.self_attn.k_proj' -> (3, 'k_proj')."""
        parts = module.split(".")
        i = parts.index("layers")
        return int(parts[i + 1]), parts[-1]


def row_hashes(w: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """[V] int64 on the host: a hash of the bits of each row of w [V, H] (a weighted sum with odd 64-bit
    weights, which any one changed element always changes), to tell which rows of two tables differ."""
    kind = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    weights = torch.randint(1, 2**62, (w.shape[1],), generator=torch.Generator().manual_seed(0x5EED), dtype=torch.int64) | 1
    weights = weights.to(w.device)
    out = [(w[i : i + chunk].contiguous().view(kind).to(torch.int64) * weights).sum(-1).cpu()
           for i in range(0, w.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


# each table's row hashes, made once per table (and version of it): a model is described more than once
# (the registry's description, the slots', one per parse in the tests), and a tied table serves both ends
# (by identity: tensors compare elementwise), dropped with its table
_HASHED: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}


def _row_hashes_of(weight: torch.Tensor) -> torch.Tensor:
    key = id(weight)
    got = _HASHED.get(key)
    if got is None or got[0]() is not weight or got[1] != weight._version:

        def gone(_: weakref.ref[torch.Tensor]) -> None:
            _HASHED.pop(key, None)

        got = _HASHED[key] = (weakref.ref(weight, gone), weight._version, row_hashes(weight.detach()))
    return got[2]


def tied_embeddings(model: Any) -> bool:
    """Whether the checkpoint ties the LM head to the input embedding: one parameter under both, as
    transformers loaded it. A quantized head is a table of its own, but an adapter trained on the tied
    checkpoint saw one table: then the text model's config says."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not getattr(head, "quantized", False):
        return head.weight is embed.weight
    cfg = model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


class MethodWeights(Protocol):
    """A method's own weights type (defined in its module under methods/, subclassing this): what it writes
    into a slot. The optional traits have their defaults here."""

    def tensors(self) -> list[torch.Tensor]: ...

    @property
    def mergeable(self) -> bool:
        """This adapter folds into the base weights exactly (its method's fold holds all it has)."""
        return False

    @property
    def virtual_tokens(self) -> int:
        """Positions the adapter puts before every prompt (prompt and prefix tuning)."""
        return 0

    @property
    def exportable(self) -> bool:
        """`adapter-server merge` can write it into a standalone model: what folds, and what a standalone
        model holds as its own tables (a trained embedding or LM head)."""
        return self.mergeable

    @property
    def vocab_size(self) -> int:
        """Token ids the adapter's rows embed and score; 0: the base model's."""
        return 0


@dataclass
class AdapterWeights:
    """A parsed adapter, ready to be written into device slots. `payload` is what its family (`method`)
    serves; `extras` are parts other methods serve beside it, written into the same slot (a trained
    embedding or LM head beside LoRA or (IA)3)."""

    method: Method
    format: Format
    variant: str
    payload: MethodWeights  # the method's own weights type: IA3Weights, BottleneckWeights
    config: dict[str, Any] = field(default_factory=dict)
    extra_parameters: int = 0  # trained parameters held outside `tensors()` (a learned or channel scaling)
    extras: dict[Method, MethodWeights] = field(default_factory=dict)

    @property
    def parts(self) -> dict[Method, MethodWeights]:
        """Every part and the method that serves it, its family's first."""
        return {self.method: self.payload, **self.extras}

    @property
    def mergeable(self) -> bool:
        """Its family's part folds into the shared weights while serving (extras stay per row)."""
        return self.payload.mergeable

    @property
    def exportable(self) -> bool:
        return all(p.exportable for p in self.parts.values())

    @property
    def virtual_tokens(self) -> int:
        """They count against the context window."""
        return self.payload.virtual_tokens

    @property
    def vocab_size(self) -> int:
        """Token ids its rows embed and score (0: the base model's)."""
        return max((p.vocab_size for p in self.parts.values()), default=0)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for p in self.parts.values() for t in p.tensors()) + self.extra_parameters

    @property
    def size_bytes(self) -> int:
        return self.num_parameters * 4
