"""Readers for the checkpoint layouts the training libraries write; `parse_adapter` picks one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import InvalidAdapterError
from ..spec import AdapterWeights, BaseModelInfo
from . import adapterhub, peft
from .tokenizer import check_vocabulary, load_tokenizer

CONFIG_FILE = "adapter_config.json"


def read_config(files: dict[str, Path]) -> dict[str, Any]:
    """The adapter_config.json of an upload, parsed, or a typed error."""
    path = files.get(CONFIG_FILE)
    if path is None:
        raise InvalidAdapterError(f"no {CONFIG_FILE} among the files", key=CONFIG_FILE)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {e}", key=CONFIG_FILE) from e
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object", key=CONFIG_FILE)
    return cfg


def parse_adapter(files: dict[str, Path], base: BaseModelInfo) -> AdapterWeights:
    """Detect the library that wrote `files` (name -> path), parse and validate every tensor."""
    cfg = read_config(files)
    if "peft_type" in cfg:
        return peft.parse(cfg, files, base)
    if isinstance(cfg.get("config"), dict):
        return adapterhub.parse(cfg, files, base)
    raise InvalidAdapterError(
        f"{CONFIG_FILE} is neither a PEFT config (no 'peft_type') nor an AdapterHub one (no 'config')",
        key=CONFIG_FILE,
    )


def read_upload(files: dict[str, Path], base: BaseModelInfo) -> tuple[AdapterWeights, str | None]:
    """An upload, whole: its weights (`parse_adapter`) and its own tokenizer, checked against the vocabulary
    the weights hold. Returns the weights and the tokenizer's fingerprint (None: it speaks the base model's)."""
    weights = parse_adapter(files, base)
    tok = load_tokenizer(files, base.tokenizer_files)
    check_vocabulary(weights, None if tok is None else len(tok[1]), base)
    return weights, None if tok is None else tok[0]
