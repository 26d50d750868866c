"""The tiered LRU registry: every adapter on disk, warm ones parsed in host memory, hot ones in device slots.

Each upload is a new version of its id; a request pins the version it started with (pins count
queued and running requests), so a replace or delete never changes what a running request computes,
and a pinned version keeps its host copy. The device tier is not kept here: the engine thread's
AdapterManager owns the slot table, hears of replaced and deleted versions through `Events.retire`
(a message to the engine), and publishes which versions are resident for `info` and the tier counts.

Thread-safe. `_lock` guards the in-memory catalogue and is never held across disk I/O, so the engine
never waits on a disk; `_admin` serialises uploads and deletes, which do disk I/O, against each other.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RegistryConfig
from ..errors import (
    AdapterChangedError,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidAdapterError,
)
from ..metrics import Metrics
from ..threads import on_own_thread
from .formats import parse_adapter, read_upload
from .formats.tokenizer import load_tokenizer
from .methods import RECORDS
from .spec import AdapterWeights, BaseModelInfo
from .store import AdapterStore, Manifest, content_digest

log = logging.getLogger(__name__)
Key = tuple[str, int]  # (adapter_id, version)


@dataclass
class AdapterRecord:
    adapter_id: str
    version: int
    manifest: Manifest
    weights: AdapterWeights | None = None  # host tier
    pins: int = 0
    current: bool = True  # False once replaced or deleted: lives only while pinned

    @property
    def key(self) -> Key:
        return (self.adapter_id, self.version)

    def tier(self, resident: frozenset[Key]) -> str:
        return "device" if self.key in resident else "host" if self.weights is not None else "disk"

    def info(self, resident: frozenset[Key], fold_refusal: str | None = None) -> dict[str, Any]:
        """`fold_refusal`: why the base model takes no fold (BaseModelInfo.fold_refusal), if it takes none."""
        m = self.manifest
        out: dict[str, Any] = {
            "adapter_id": self.adapter_id, "method": m.method, "format": m.format, "variant": m.variant,
            "num_parameters": m.num_parameters, "size_bytes": m.size_bytes, "mergeable": m.mergeable,
            "created_at": m.created_at, "tier": self.tier(resident), "vocab_size": m.vocab_size,
            "tokenizer": m.tokenizer}
        if fold_refusal is not None and m.mergeable:  # served on top, never folded into these weights
            out["mergeable"] = False
            out["merge_note"] = fold_refusal
        return out


@dataclass(frozen=True)
class AdapterRef:
    """What a request holds: one pinned version of one adapter."""

    adapter_id: str
    version: int
    method: str
    virtual_tokens: int = 0  # positions it puts before every prompt (prompt and prefix tuning)
    tokenizer: str | None = None  # its own tokenizer's fingerprint (None: the base model's)
    vocab_size: int | None = None  # token ids its rows have (None: the base model's)
    digest: str = ""  # what its K/V are keyed by: its files' content digest (older manifests: its commit)

    @staticmethod
    def of(rec: AdapterRecord) -> AdapterRef:
        m = rec.manifest
        digest = m.digest or f"{rec.adapter_id}@{m.revision or m.created_at}"
        return AdapterRef(rec.adapter_id, rec.version, m.method, m.virtual_tokens, m.tokenizer, m.vocab_size, digest)


@dataclass
class Events:
    """Callbacks: cache hit/miss/evict and load seconds by source (metrics), tier counts (metrics),
    `retire`, a version replaced or deleted (the engine forwards it to its AdapterManager), and `check`,
    what the engine refuses of an upload before it is stored."""

    cache: Callable[[str], None] = lambda event: None
    load: Callable[[str, float], None] = lambda source, seconds: None
    tiers: Callable[[dict[str, int]], None] = lambda counts: None
    retire: Callable[[Key], None] = lambda key: None
    check: Callable[[AdapterWeights], object] = lambda weights: None

    @staticmethod
    def for_metrics(m: Metrics) -> Events:
        """Record cache events, load times and tier counts in the Prometheus metrics."""
        return Events(cache=lambda e: m.cache.labels(e).inc(), load=lambda src, s: m.load.labels(src).observe(s),
                      tiers=m.set_tiers)


def manifest_for(adapter_id: str, w: AdapterWeights, files: list[str], origin: str | None = None,
                 tokenizer: str | None = None, base_vocab: int = 0, digest: str | None = None) -> Manifest:
    """`base_vocab`: the base model's token ids (a vocabulary of the same size is recorded as the base's)."""
    vocab = w.vocab_size if w.vocab_size and w.vocab_size != base_vocab else None
    return Manifest.new(adapter_id, w.method, w.format, w.variant, w.num_parameters, w.size_bytes, w.mergeable,
                        w.virtual_tokens, files, origin, tokenizer, vocab, w.exportable, digest)


def _served(m: Manifest) -> Manifest:
    if m.method not in RECORDS:
        raise ValueError(f"manifest names method {m.method!r}, which this server does not serve")
    return m


class Registry:
    def __init__(self, store: AdapterStore, base: BaseModelInfo, cfg: RegistryConfig, events: Events | None = None) -> None:
        self.store = store
        self.base = base
        self.cfg = cfg
        self.events = events or Events()
        self._lock = threading.RLock()
        self._admin = threading.Lock()
        self._current: dict[str, AdapterRecord] = {}
        self._records: dict[Key, AdapterRecord] = {}
        self._host: OrderedDict[Key, None] = OrderedDict()  # LRU, oldest first
        self._resident: frozenset[Key] = frozenset()  # published by the engine's AdapterManager
        self._next_version = 1
        self._generation = ""  # the store's generation token as of our last scan or sync
        self.skipped: dict[str, str] = {}  # adapters found corrupt at start -> why

    # -- start-up -----------------------------------------------------------------------------
    def scan(self) -> None:
        """List every adapter in the store at once (disk tier); they load on first use."""
        self._generation = self.store.generation()  # read first: a change during the scan is seen later
        self.store.recover()
        for adapter_id in self.store.ids():
            try:
                manifest = _served(self.store.manifest(adapter_id))  # validates the id
                self.store.check_files(adapter_id, manifest)
            except Exception as e:  # a corrupt entry is reported and skipped, the rest load
                log.error("skipping adapter %r in the store: %s", adapter_id, e)
                self.skipped[adapter_id] = str(e)
                continue
            with self._lock:
                self._install(AdapterRecord(adapter_id, self._bump(), manifest))
        self._report_tiers()

    def sync(self) -> None:
        """Take in what other processes sharing the store committed or deleted since we last looked:
        new and replaced adapters become new versions (disk tier), deleted ones retire. Requests keep
        the version they pinned. Cheap when nothing changed: one small file read."""
        if self.store.generation() == self._generation:
            return
        with self._admin:
            gen = self.store.generation()
            if gen == self._generation:
                return
            on_disk: dict[str, Manifest] = {}
            for adapter_id in self.store.ids():
                try:
                    on_disk[adapter_id] = _served(self.store.manifest(adapter_id))
                except (OSError, ValueError):
                    continue  # not a committed adapter folder
            with self._lock:
                for adapter_id in [a for a in self._current if a not in on_disk]:
                    self._retire(self._current.pop(adapter_id))
                for adapter_id, m in on_disk.items():
                    cur = self._current.get(adapter_id)
                    if cur is None or cur.manifest.commit != m.commit:
                        self._install(AdapterRecord(adapter_id, self._bump(), m))
            self._generation = gen
        self._report_tiers()

    def _bump(self) -> int:
        v = self._next_version
        self._next_version += 1
        return v

    # -- catalogue operations -----------------------------------------------------------------
    def add(self, adapter_id: str, staging: Path, replace: bool = False, origin: str | None = None) -> dict[str, Any]:
        """Validate the files in `staging` against the base model, then commit and register them.
        `origin` (kept in the manifest) names what added it, when not an upload.

        Nothing is registered and the store is unchanged unless every check passes.
        """
        self.sync()  # an id another process added is taken, and replacing it replaces theirs
        try:
            if not replace and self.exists(adapter_id):
                raise AdapterExistsError(adapter_id)
            files = {p.name: p for p in staging.iterdir() if p.is_file()}
            t0 = time.perf_counter()
            weights, tokenizer = read_upload(files, self.base)
            self.events.check(weights)  # what the engine refuses outright (over its device byte budget)
            manifest = manifest_for(adapter_id, weights, list(files), origin, tokenizer, self.base.vocab_size,
                                    content_digest(files))
            with self._admin:  # one upload or delete at a time; the catalogue lock only for the swap
                if not replace and self.exists(adapter_id):
                    raise AdapterExistsError(adapter_id)
                self.store.commit(adapter_id, staging, manifest)
                with self._lock:
                    rec = AdapterRecord(adapter_id, self._bump(), manifest, weights=weights)
                    self._install(rec)
                    self._host_touch(rec)
            self.events.load("disk", time.perf_counter() - t0)
        finally:
            if staging.exists():
                self.store.discard(staging)
        self._report_tiers()
        with self._lock:
            return rec.info(self._resident, self.base.fold_refusal)

    def add_folder(self, adapter_id: str, folder: Path, replace: bool = False, origin: str | None = None
                   ) -> dict[str, Any]:
        """Copy a saved adapter folder into the store (the CLI, tests and vLLM's load_lora_adapter)."""
        staging = self.store.staging_dir()
        for p in Path(folder).iterdir():
            if p.is_file():
                shutil.copyfile(p, staging / p.name)
        return self.add(adapter_id, staging, replace, origin)

    def delete(self, adapter_id: str) -> None:
        self.sync()
        with self._admin:
            with self._lock:
                rec = self._current.get(adapter_id)
                if rec is None:
                    raise self._missing(adapter_id)
                del self._current[adapter_id]  # no new request pins it from here on
                self._retire(rec)
            self.store.delete(adapter_id)
        self._report_tiers()

    def _install(self, rec: AdapterRecord) -> None:
        old = self._current.get(rec.adapter_id)
        self._current[rec.adapter_id] = rec
        self._records[rec.key] = rec
        if old is not None:
            self._retire(old)

    def _retire(self, rec: AdapterRecord) -> None:
        """A replaced or deleted version: dropped now if unpinned, else when its last request ends."""
        rec.current = False
        self.events.retire(rec.key)
        if rec.pins == 0:
            self._drop(rec)

    def _drop(self, rec: AdapterRecord) -> None:
        self._records.pop(rec.key, None)
        self._host.pop(rec.key, None)
        rec.weights = None

    def _missing(self, adapter_id: str) -> Exception:
        """Why an id is not in the catalogue: malformed (400, the store's rule), or unknown (404)."""
        self.store.folder(adapter_id)  # raises InvalidAdapterIdError for a malformed id
        return AdapterNotFoundError(adapter_id)

    def exists(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._current

    def info(self, adapter_id: str) -> dict[str, Any]:
        self.sync()
        with self._lock:
            rec = self._current.get(adapter_id)
            if rec is None:
                raise self._missing(adapter_id)
            return rec.info(self._resident, self.base.fold_refusal)

    def resident_ids(self) -> list[str]:
        """Adapters on the device now, as the engine last published (current versions only)."""
        with self._lock:
            return sorted(aid for aid, v in self._resident if (rec := self._current.get(aid)) is not None and rec.version == v)

    def infos(self) -> list[dict[str, Any]]:
        self.sync()
        with self._lock:
            return [r.info(self._resident, self.base.fold_refusal) for _, r in sorted(self._current.items())]

    # -- requests -----------------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> AdapterRef:
        """Pin the current version of `adapter_id` for one request, loading it from disk if needed.

        Called from request threads, never from the engine loop: the disk read happens outside the lock.
        """
        self.sync()
        while True:
            with self._lock:
                rec = self._current.get(adapter_id)
                if rec is None:
                    raise self._missing(adapter_id)
                if rec.weights is not None:  # in host memory (a pinned version keeps its host copy)
                    rec.pins += 1
                    self._host_touch(rec)
                    self.events.cache("hit" if rec.key in self._resident else "miss")
                    return AdapterRef.of(rec)
                version = rec.version
            t0 = time.perf_counter()
            try:
                # on a thread that ends: the request threads live on (asyncio's pool), and torch work there
                # would leave them an OpenMP team that slows the engine's (server/threads.py)
                weights = on_own_thread(parse_adapter, self.store.files(adapter_id), self.base)
            except (InvalidAdapterError, AdapterNotFoundError, OSError) as e:
                self._admin_settled()
                with self._lock:
                    if self._current.get(adapter_id) is not rec:
                        continue  # replaced or deleted while we read: try the new state
                if isinstance(e, OSError):
                    raise InvalidAdapterError(f"adapter {adapter_id!r} could not be read from the store: {e}") from e
                raise
            self.events.load("disk", time.perf_counter() - t0)
            self._admin_settled()
            with self._lock:
                cur = self._current.get(adapter_id)
                if cur is not None and cur.version == version and cur.weights is None:
                    cur.weights = weights
                    self._host_touch(cur)
            self._report_tiers()

    def _admin_settled(self) -> None:
        """Wait for an upload or delete in progress (its files may have changed under a read); after it
        the catalogue says which version the files were. Request threads only: the engine never waits here."""
        with self._admin:
            pass

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            rec = self._records.get((ref.adapter_id, ref.version))
            if rec is None:
                return
            rec.pins = max(0, rec.pins - 1)
            if rec.pins == 0 and not rec.current:
                self._drop(rec)
            else:
                self._host_evict()

    def on_retire(self, fn: Callable[[Key], None]) -> None:
        """Who hears of replaced and deleted versions: the engine, which owns the device slots."""
        self.events.retire = fn

    def on_check(self, fn: Callable[[AdapterWeights], object]) -> None:
        """What every upload must also pass before it is stored: the engine's refusals (a typed error)."""
        self.events.check = fn

    def vocabulary(self, adapter_id: str) -> tuple[str | None, int | None]:
        """The current version's (tokenizer fingerprint, vocabulary size), None where it keeps the base
        model's; AdapterNotFoundError for an unknown id."""
        self.sync()
        with self._lock:
            rec = self._current.get(adapter_id)
            if rec is None:
                raise self._missing(adapter_id)
            return rec.manifest.tokenizer, rec.manifest.vocab_size

    def read_tokenizer(self, adapter_id: str) -> tuple[str, Any] | None:
        """(fingerprint, tokenizer) of the tokenizer files in the adapter's folder now, or None (no files).
        Request threads only (it may wait for an upload or delete in progress). A folder caught between a
        replace's two renames is AdapterChangedError: the caller reads the catalogue again."""
        try:
            return load_tokenizer(self.store.files(adapter_id), self.base.tokenizer_files)
        except (OSError, AdapterNotFoundError) as e:
            self._admin_settled()
            if self.exists(adapter_id):
                raise AdapterChangedError(f"adapter {adapter_id!r} was being replaced; send the request again") from e
            raise AdapterNotFoundError(adapter_id) from e

    def weights(self, ref: AdapterRef) -> AdapterWeights:
        """The host copy of a pinned version, for the engine to write into a device slot."""
        with self._lock:
            w = self._records[(ref.adapter_id, ref.version)].weights
            assert w is not None, "a pinned version keeps its host copy"
            return w

    def set_resident(self, keys: frozenset[Key]) -> None:
        """The engine's AdapterManager publishes which versions are on the device (for info and tiers)."""
        with self._lock:
            self._resident = keys
        self._report_tiers()

    # -- host tier ----------------------------------------------------------------------------
    def _host_touch(self, rec: AdapterRecord) -> None:
        self._host[rec.key] = None
        self._host.move_to_end(rec.key)
        self._host_evict(keep=rec.key)

    def _host_evict(self, keep: Key | None = None) -> None:
        """Keep at most host_capacity parsed adapters, holding at most host_bytes (0: no limit), least recently
        used out first. Pinned ones stay even past either, and so does `keep`, the one just loaded or used (its
        request pins it next: one larger than the whole budget is held alone)."""
        cap, budget = self.cfg.host_capacity, self.cfg.host_bytes
        size = {k: r.manifest.size_bytes for k in self._host if (r := self._records.get(k)) is not None}
        count, total = len(self._host), sum(size.values())
        for key in list(self._host):
            if count <= cap and (not budget or total <= budget):
                break
            rec = self._records.get(key)
            if key != keep and rec is not None and rec.pins == 0:
                rec.weights = None
                del self._host[key]
                count, total = count - 1, total - size.get(key, 0)

    # -- introspection ------------------------------------------------------------------------
    def tier_counts(self) -> dict[str, int]:
        with self._lock:
            counts = {"device": 0, "host": 0, "disk": 0}
            for rec in self._current.values():
                counts[rec.tier(self._resident)] += 1
            return counts

    def record(self, adapter_id: str) -> AdapterRecord | None:
        with self._lock:
            return self._current.get(adapter_id)

    def _report_tiers(self) -> None:
        self.events.tiers(self.tier_counts())
