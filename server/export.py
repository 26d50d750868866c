"""`adapter-server merge`: a standalone HF model folder with one adapter written into its weights: (IA)3, LoRA
and DoRA folded in; a trained embedding or LM head (and trained rows, LoRA on them) as the model's own tables,
the vocabulary resized to the adapter's; and the adapter's own tokenizer where its folder has one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .adapters.formats import parse_adapter
from .adapters.formats.tokenizer import load_tokenizer
from .adapters.methods import StepTimer
from .adapters.slots import AdapterSlots
from .adapters.spec import BaseModelInfo
from .adapters.store import AdapterStore
from .config import ModelConfig
from .engine.model_loader import load_base_model
from .errors import NotMergeableError

log = logging.getLogger(__name__)


def _not_mergeable(adapter_id: str, variant: object) -> NotMergeableError:
    return NotMergeableError(f"adapter {adapter_id!r} ({variant}) is not a linear change of the base weights "
                             "(bottlenecks add non-linear modules, prompt and prefix tuning add positions before "
                             "the prompt), so it can never be folded into them")


def export_merged(model_cfg: ModelConfig, store_dir: Path, adapter_id: str, out: Path) -> Path:
    """Write `adapter_id` from the store into the base model and save model + tokenizer to `out`."""
    store = AdapterStore(store_dir)
    manifest = store.manifest(adapter_id) if store.folder(adapter_id).is_dir() else None
    if manifest is not None and not manifest.can_export:  # refuse before loading any model
        raise _not_mergeable(adapter_id, manifest.variant)
    loaded = load_base_model(ModelConfig(model_cfg.model, "cpu", "float32", model_cfg.cache_dir))
    files = store.files(adapter_id)
    base = BaseModelInfo.from_model(loaded.model, loaded.tokenizer)
    weights = parse_adapter(files, base)
    if not weights.exportable:
        raise _not_mergeable(adapter_id, weights.variant)
    slots = AdapterSlots(loaded.model, 1, loaded.device, loaded.dtype, StepTimer(loaded.device))
    slots.write(1, weights)
    slots.export(1, loaded.model)
    own = load_tokenizer(files, base.tokenizer_files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model: Any = loaded.model
    with torch.no_grad():
        model.save_pretrained(out)
    (loaded.tokenizer if own is None else own[1]).save_pretrained(out)
    log.info("wrote %s: %s with %s written in", out, loaded.name, adapter_id)
    return out
