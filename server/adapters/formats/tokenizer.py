"""An adapter folder's own tokenizer (a vocabulary with tokens added, a chat template of its own): read,
fingerprinted, and checked against the vocabulary the adapter's weights hold (docs/adapters.md §10.4).

Trainers save the tokenizer beside the adapter (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`, ...). When a folder has one, its requests are tokenised, templated and
detokenised with it (a partial set, a chat template alone say, laid over the base's files); the
fingerprint (sha256 of the folder's tokenizer files) names it, so adapters that share one share
its loaded copy, and a request can tell whether the version it pinned speaks the one it was tokenised with.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from ...errors import InvalidAdapterError
from ..spec import AdapterWeights, BaseModelInfo

# the files transformers reads for a tokenizer; any of them in a folder makes the tokenizer the folder's own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
# the ones that hold a vocabulary: a folder with none of them (a chat template alone, say) changes the base's
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files a loaded tokenizer saves (the base model's: what an adapter's partial set lays over)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file() and p.name in TOKENIZER_FILES}


def _has_template(blobs: dict[str, bytes]) -> bool:
    if any(n.startswith("chat_template") for n in blobs):
        return True
    try:
        return "chat_template" in json.loads(blobs.get("tokenizer_config.json", b"{}"))
    except ValueError:
        return False


def load_tokenizer(files: dict[str, Path], base: dict[str, bytes] | None = None) -> tuple[str, Any] | None:
    """(fingerprint, tokenizer) of the tokenizer files among `files`, or None when it has none. A set without
    a vocabulary file (a chat template alone, a tokenizer_config) is laid over the base tokenizer's files
    `base` (the base's chat template left out where the set brings one in any form). The fingerprint is a
    sha256 of the folder's own files (so a re-saved base tokenizer does not change it); the tokenizer is
    built from the very bytes fingerprinted (copied aside), so a folder replaced meanwhile cannot make them
    disagree. Never runs code from the folder (`trust_remote_code` off, no download)."""
    names = [n for n in TOKENIZER_FILES if n in files]
    if not names:
        return None
    blobs = {n: files[n].read_bytes() for n in names}
    under = dict(base) if base and not any(n in VOCABULARY_FILES for n in names) else {}
    if under and _has_template(blobs):  # its own template, in whatever form, wins over the base's
        under = {n: b for n, b in under.items() if not n.startswith("chat_template")}
    digest = hashlib.sha256(b"over the base\0" if under else b"")  # the adapter's own bytes name it, not the base's
    for n, b in blobs.items():
        digest.update(n.encode() + b"\0" + len(b).to_bytes(8, "little") + b)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        for n, b in {**under, **blobs}.items():
            (Path(d) / n).write_bytes(b)
        try:
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False, local_files_only=True)
        except Exception as e:  # malformed JSON, an unknown class, remote code asked for: the folder's fault
            raise InvalidAdapterError(f"the adapter's tokenizer cannot be loaded: {e}", key=names[0]) from e
    return "sha256:" + digest.hexdigest(), tok


def check_vocabulary(weights: AdapterWeights, tokenizer_size: int | None, base: BaseModelInfo) -> int:
    """The token ids the adapter's rows have (its embedding's and LM head's rows), checked against the
    tokenizer that will make them: its own (`tokenizer_size` tokens), or else the base model's."""
    V0 = base.vocab_size
    V = weights.vocab_size or V0
    if tokenizer_size is not None:
        if tokenizer_size > V:
            whose = "its embedding and LM head have" if weights.vocab_size else "the base model's embedding has"
            raise InvalidAdapterError(
                f"the adapter's tokenizer has {tokenizer_size} tokens, but {whose} {V} rows: save the embedding "
                "and LM head rows of the added tokens with it (modules_to_save, or trainable_token_indices)",
                key="tokenizer.json")
        return V
    if V > V0:
        raise InvalidAdapterError(f"the adapter has {V} token ids, the base model {V0}: upload the tokenizer it was "
                                  "trained with (tokenizer.json, tokenizer_config.json)", key="tokenizer.json")
    if base.tokenizer_size and base.tokenizer_size > V:
        raise InvalidAdapterError(f"the adapter has {V} token ids, but the base model's tokenizer makes "
                                  f"{base.tokenizer_size}: upload the tokenizer it was trained with", key="tokenizer.json")
    return V
