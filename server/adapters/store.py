"""The disk tier: adapters_store/<id>/ holds the files as uploaded plus manifest.json.

Writes are atomic: files land in .staging/<uuid>/, then one rename makes them visible. A replace
moves the old folder to .trash/ first; `recover()` at start finishes or undoes whatever a crash
interrupted, so a half-written adapter is never seen.

Several server processes may share one store (replicas on one machine, or on a shared filesystem):
every commit and delete writes a new token to .generation, which a process reads to learn that
another changed the store (`Registry.sync`). `recover()` runs when a process starts and assumes no
other is writing at that moment: start the processes that share a store before uploading to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import AdapterNotFoundError, InvalidAdapterIdError

log = logging.getLogger(__name__)
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MANIFEST = "manifest.json"
STAGING, TRASH = ".staging", ".trash"
GENERATION = ".generation"


@dataclass(frozen=True)
class Manifest:
    """What manifest.json records of a committed adapter: what it is (read without parsing its weights),
    which files it has, and which commit of its id it is."""

    adapter_id: str
    method: str
    format: str
    variant: str
    num_parameters: int
    size_bytes: int
    mergeable: bool
    virtual_tokens: int  # positions it puts before every prompt: what sizes its requests before it is loaded
    files: tuple[str, ...]
    created_at: str
    revision: str | None = None  # tells two commits of one id apart (older manifests have only the time)
    origin: str | None = None  # what added it, when not an upload (vLLM's load_lora_adapter)
    # Its own vocabulary, where it has one (older manifests: the base model's): the tokenizer files'
    # fingerprint (formats/tokenizer.py) and the token ids its rows embed and score.
    tokenizer: str | None = None
    vocab_size: int | None = None
    exportable: bool | None = None  # `adapter-server merge` can write it out (older manifests: `mergeable`)
    digest: str | None = None  # sha256 of its files' names and bytes: what its computations are keyed by

    @staticmethod
    def new(adapter_id: str, method: str, format: str, variant: str, num_parameters: int, size_bytes: int,
            mergeable: bool, virtual_tokens: int, files: list[str], origin: str | None = None,
            tokenizer: str | None = None, vocab_size: int | None = None, exportable: bool | None = None,
            digest: str | None = None) -> Manifest:
        """A manifest for a commit made now."""
        return Manifest(adapter_id=adapter_id, method=method, format=format, variant=variant,
                        num_parameters=num_parameters, size_bytes=size_bytes, mergeable=mergeable,
                        virtual_tokens=virtual_tokens, files=tuple(sorted(files)),
                        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        revision=uuid.uuid4().hex, origin=origin, tokenizer=tokenizer, vocab_size=vocab_size,
                        exportable=exportable, digest=digest)

    @property
    def can_export(self) -> bool:
        return self.mergeable if self.exportable is None else self.exportable

    @staticmethod
    def from_json(data: Any) -> Manifest:
        """Parse and check a manifest.json's content; ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        kinds: dict[str, type | tuple[type, ...]] = {
            "adapter_id": str, "method": str, "format": str, "variant": str, "num_parameters": int, "size_bytes": int,
            "mergeable": bool, "virtual_tokens": int, "files": list, "created_at": str}
        # written before prompt and prefix tuning were served: none of those methods puts positions before a prompt
        data = {"virtual_tokens": 0, **data}
        for key, kind in kinds.items():
            if not isinstance(data.get(key), kind):
                raise ValueError(f"manifest field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
        extra = {k: data.get(k) for k in ("revision", "origin", "tokenizer", "digest")}
        if not all(v is None or isinstance(v, str) for v in extra.values()):
            raise ValueError("manifest fields 'revision', 'origin', 'tokenizer' and 'digest' must be strings")
        vocab, exportable = data.get("vocab_size"), data.get("exportable")
        if not (vocab is None or (isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0)):
            raise ValueError("manifest field 'vocab_size' must be a positive integer")
        if not (exportable is None or isinstance(exportable, bool)):
            raise ValueError("manifest field 'exportable' must be a boolean")
        return Manifest(**{k: data[k] for k in kinds if k != "files"}, files=tuple(str(f) for f in data["files"]),
                        **extra, vocab_size=vocab, exportable=exportable)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["files"] = list(self.files)
        return {k: v for k, v in out.items() if v is not None}

    @property
    def commit(self) -> tuple[str | None, str]:
        """What tells two commits of one id apart."""
        return self.revision, self.created_at


def content_digest(files: dict[str, Path]) -> str:
    """sha256 over the files' names and bytes, in name order: two uploads of the same files have the same."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        with open(files[name], "rb") as f:
            h.update(f"{os.fstat(f.fileno()).st_size}\0".encode())
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def validate_id(adapter_id: str) -> str:
    if not isinstance(adapter_id, str) or not ID_RE.match(adapter_id) or ".." in adapter_id:
        raise InvalidAdapterIdError(
            f"adapter_id {adapter_id!r} must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$ and not contain '..'"
        )
    return adapter_id


def safe_filename(name: str) -> str | None:
    """The base name of an uploaded file, or None for one we will not write (hidden, path tricks)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not base or base.startswith(".") or base == MANIFEST or not re.match(r"^[\w.\-]{1,200}$", base):
        return None
    return base


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STAGING).mkdir(exist_ok=True)
        (self.root / TRASH).mkdir(exist_ok=True)

    def recover(self) -> None:
        """Drop half-written uploads; put back an adapter whose replace was cut between its two renames."""
        for d in (self.root / STAGING).iterdir():
            shutil.rmtree(d, ignore_errors=True)
        for d in (self.root / TRASH).iterdir():
            adapter_id = d.name.split("@", 1)[0]
            if d.is_dir() and (d / MANIFEST).is_file() and not (self.root / adapter_id).exists():
                log.warning("restoring %s: its replace was interrupted", adapter_id)
                os.rename(d, self.root / adapter_id)
            else:
                shutil.rmtree(d, ignore_errors=True)

    def staging_dir(self) -> Path:
        d = self.root / STAGING / uuid.uuid4().hex
        d.mkdir()
        return d

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def folder(self, adapter_id: str) -> Path:
        """The adapter's folder: the one place an id becomes a path, so the one place ids are validated."""
        return self.root / validate_id(adapter_id)

    def commit(self, adapter_id: str, staging: Path, manifest: Manifest) -> None:
        """Make `staging` the adapter's folder, atomically; an existing one is replaced."""
        target = self.folder(adapter_id)
        tmp = staging / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest.to_json(), indent=1))
        os.replace(tmp, staging / MANIFEST)
        if target.exists():
            old = self.root / TRASH / f"{adapter_id}@{uuid.uuid4().hex}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        self._changed()

    def delete(self, adapter_id: str) -> None:
        target = self.folder(adapter_id)
        if not target.is_dir():
            raise AdapterNotFoundError(adapter_id)
        gone = self.root / TRASH / f"{adapter_id}@deleted-{uuid.uuid4().hex}"
        os.rename(target, gone)
        shutil.rmtree(gone, ignore_errors=True)
        self._changed()

    def _changed(self) -> None:
        tmp = self.root / STAGING / f"generation-{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        os.replace(tmp, self.root / GENERATION)

    def generation(self) -> str:
        """A token that changes with every commit and delete, by any process sharing the store."""
        try:
            return (self.root / GENERATION).read_text()
        except FileNotFoundError:
            return ""

    def ids(self) -> list[str]:
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))

    def manifest(self, adapter_id: str) -> Manifest:
        """The adapter's manifest; OSError when unreadable, ValueError when malformed."""
        return Manifest.from_json(json.loads((self.folder(adapter_id) / MANIFEST).read_text()))

    def check_files(self, adapter_id: str, manifest: Manifest) -> None:
        """Cheap start-up check: every file the manifest lists is there, safetensors headers parse."""
        from safetensors import safe_open

        d = self.folder(adapter_id)
        for name in manifest.files:
            p = d / name
            if not p.is_file():
                raise ValueError(f"file {name} listed in the manifest is missing")
            if name.endswith(".safetensors"):
                with safe_open(str(p), framework="pt") as f:
                    f.keys()

    def files(self, adapter_id: str) -> dict[str, Path]:
        d = self.folder(adapter_id)
        if not d.is_dir():
            raise AdapterNotFoundError(adapter_id)
        return {p.name: p for p in d.iterdir() if p.is_file() and p.name != MANIFEST}
