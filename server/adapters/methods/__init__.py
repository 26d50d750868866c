"""Adapter methods: each owns its device slot storage and builds a per-batch plan. One file per method.

Each method registers one `MethodRecord` (its name, implementation, weights type, whether it folds,
how to synthesise one); `RECORDS` lists them in the order below, and the method names, the metric
labels and the synthetic adapters derive from it. Adding a method is its file and its line here.

How methods compose in one batch (`slots.BatchPlan`), in the order of RECORDS:
- at every Linear, each method may change the input (`linear_in`: input scales), then the base product
  runs once on the result, then each method may change the output (`linear_out`: output scales, then
  additive terms computed from the original input). So (IA)3, LoRA and DoRA on one Linear all apply;
- at every sub-block's residual add, each method may compute the sub-block's output (`residual`);
  where several do, each row takes its own method's (`residual_rows`);
- on rows it does not serve, every hook is exactly the identity, so a row's result does not depend on
  which other methods share its batch;
- a method may instead give a row key/value entries that its KV cache holds before its prompt
  (`prefix`: prompt, P- and prefix tuning); the engine copies them in when the row is admitted;
- at the two ends of the model, one method (vocab) may give rows their own token embeddings and LM
  head (`embed`, `logits`), whatever family the rest of their adapter is.
An adapter may hold parts that several methods serve (LoRA with a trained LM head: `AdapterWeights.parts`);
each writes its part into the adapter's one slot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from ..families import Method
from . import bottleneck, ia3, lora, prefix, vocab
from .base import AdapterMethod, MethodPlan, MethodRecord, Routing, StepTimer, route

RECORDS: dict[str, MethodRecord] = {r.name: r for r in (
    ia3.RECORD, bottleneck.RECORD, lora.RECORD, lora.DORA_RECORD, prefix.PROMPT_RECORD, prefix.PREFIX_RECORD,
    vocab.RECORD)}
assert set(RECORDS) == set(get_args(Method)), "families.Method names exactly the registered methods"
ADAPTER_TYPES: tuple[str, ...] = ("none", *(r.name for r in RECORDS.values()),
                                  *(t for r in RECORDS.values() for t in r.labels[1:]))  # every metric label


def write_demo(kind: str, out: Path, cfg: Any, seed: int = 0) -> Path:
    """An untrained adapter of a synthetic `kind` (see each record's `kinds`: "ia3", "lora8", "seq_bn",
    "compacter", "prefix20", ...) for a model of config `cfg`, in its library's own layout."""
    for r in RECORDS.values():
        if r.synth is not None and r.makes(kind):
            return r.synth(kind, out, cfg, seed)
    known = sorted(k for r in RECORDS.values() for k in r.kinds)
    raise ValueError(f"no synthetic adapter of kind {kind!r} (kinds: {', '.join(known)}, some with a size)")


# the playground's demo adapters: id -> (synthetic kind, seed), in the order of their seeds
DEMO: dict[str, tuple[str, int]] = {f"demo-{kind.replace('_', '-')}": (kind, seed) for kind, seed in
                                    sorted((r.demo for r in RECORDS.values() if r.demo), key=lambda d: d[1])}

__all__ = ["ADAPTER_TYPES", "DEMO", "RECORDS", "AdapterMethod", "MethodPlan", "MethodRecord", "Routing", "StepTimer", "route",
           "write_demo"]
