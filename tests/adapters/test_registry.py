"""The registry as a state machine: the whole slot table and tiers asserted after each operation."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
import torch

from server.adapters.manager import AdapterManager
from server.adapters.methods import StepTimer
from server.adapters.registry import Registry
from server.adapters.slots import AdapterSlots
from server.adapters.spec import BaseModelInfo
from server.adapters.store import AdapterStore
from server.config import RegistryConfig
from server.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    InvalidAdapterError,
    InvalidAdapterIdError,
)
from tests.helpers import FIXTURES, fixture_dir, tiny_model

MODEL = tiny_model()
BASE = BaseModelInfo.from_model(MODEL)
CPU = torch.device("cpu")


def make(tmp_path, host: int = 8) -> Registry:
    r = Registry(AdapterStore(tmp_path / "store"), BASE, RegistryConfig(host))
    r.scan()
    return r


class Device:
    """The registry wired to an AdapterManager as the engine wires them (retire messages delivered at
    once), with the whole device state checked after every operation."""

    def __init__(self, tmp_path, slots: int = 2, host: int = 8, budget: int = 0) -> None:
        self.r = make(tmp_path, host)
        self.slots = AdapterSlots(MODEL, slots, CPU, torch.float32, StepTimer(CPU))
        self.m = AdapterManager(self.slots, on_change=self.r.set_resident, byte_budget=budget)
        self.r.on_retire(self.m.retire)
        self.r.on_check(self.m.needs)
        self.weights: dict = {}  # key -> the weights written for it, to rebuild the expected storage

    def grant(self, ref):
        key = (ref.adapter_id, ref.version)
        self.weights[key] = self.r.weights(ref)
        g = self.m.grant(key, lambda: self.r.weights(ref))
        self.check()
        return g

    def release(self, ref, slot: int | None) -> None:
        if slot:
            self.m.release(slot)
        self.r.release(ref)
        self.check()

    def table(self) -> list:
        return [None if k is None else k[0] for k in self.m.table()]

    def check(self) -> None:
        """The slot table, each method's slot storage and device_bytes agree: the storage holds exactly
        the table's adapters (rebuilt from scratch for comparison), and tiers say so."""
        t = self.m.table()
        assert t[0] is None
        assert set(self.slots.slot_method) == {s for s, k in enumerate(t) if k is not None}
        fresh = AdapterSlots(MODEL, self.slots.num_slots, CPU, torch.float32, StepTimer(CPU))
        for s, k in enumerate(t):
            if k is not None:
                fresh.write(s, self.weights[k])
        assert self.m.device_bytes() == fresh.device_bytes()
        resident = {k[0] for k in t if k is not None}
        for info in self.r.infos():
            if any(k is not None and k == (info["adapter_id"], self.r.record(info["adapter_id"]).version) for k in t):
                assert info["tier"] == "device"
            else:
                assert info["tier"] != "device" or info["adapter_id"] in resident


def tiers(r: Registry) -> dict[str, str]:
    return {i["adapter_id"]: i["tier"] for i in r.infos()}


def test_lru_slots_rows_and_waiting(tmp_path):
    d = Device(tmp_path, slots=2)
    r = d.r
    for name, src in [("a", "ia3_default"), ("b", "seq_bn"), ("c", "par_bn")]:
        r.add_folder(name, fixture_dir(src))
    assert d.table() == [None, None, None]
    assert tiers(r) == {"a": "host", "b": "host", "c": "host"}

    ra = r.acquire("a")
    assert d.grant(ra) == (1, True)
    assert d.table() == [None, "a", None]
    assert d.grant(ra) == (1, False)  # resident: nothing to write (a second row of a)
    d.m.release(1)

    rb = r.acquire("b")
    assert d.grant(rb) == (2, True)
    rc = r.acquire("c")
    assert d.grant(rc) is None  # every slot used by a running row: c waits, nothing evicted
    assert d.table() == [None, "a", "b"]

    d.release(ra, 1)  # a's row left: the LRU candidate
    assert d.grant(rc) == (1, True)
    assert d.table() == [None, "c", "b"] and d.m.evictions == 1
    assert tiers(r) == {"a": "host", "b": "device", "c": "device"}

    d.release(rb, 2)
    d.release(rc, 1)
    ra = r.acquire("a")
    assert d.grant(ra) == (2, True)  # b is least recently granted now
    assert d.table() == [None, "c", "a"]
    d.release(ra, 2)


def test_the_device_tier_makes_room_by_bytes(tmp_path):
    """A trained LM head is 64 KB on the tiny model, an (IA)3 adapter 2 KB: with slots to
    spare, the byte budget decides. A big adapter waits while busy ones hold the bytes (evicting nothing),
    then evicts idle ones, least recently granted first, only as far as it needs; one over the whole
    budget is refused at upload, and the store stays as it was."""
    vocab = FIXTURES / "vocab" / "llama"
    probe = Device(tmp_path / "probe", slots=4)
    size = {}
    for name, src in [("h1", vocab / "mts_head"), ("h2", vocab / "mts_embed"), ("small", fixture_dir("ia3_default"))]:
        probe.r.add_folder(name, src)
        size[name] = probe.slots.bytes_for(probe.r.weights(probe.r.acquire(name)))
    assert size["h1"] > 65536 and size["small"] < 4096
    d = Device(tmp_path / "d", slots=4, budget=size["h1"] + size["small"] + 100)
    r = d.r
    for name, src in [("h1", vocab / "mts_head"), ("h2", vocab / "mts_embed"), ("small", fixture_dir("ia3_default"))]:
        r.add_folder(name, src)
    r1, rs, r2 = r.acquire("h1"), r.acquire("small"), r.acquire("h2")
    assert d.grant(r1) == (1, True) and d.grant(rs) == (2, True)
    assert d.grant(r2) is None  # both busy: h2 waits, nothing evicted
    d.release(rs, 2)
    assert d.grant(r2) is None  # evicting the idle small one would not make room: it stays
    assert d.table() == [None, "h1", "small", None, None] and d.m.evictions == 0
    d.release(r1, 1)
    assert d.grant(r2) == (3, True)  # h1 (least recently granted, idle) goes; small fits beside h2
    assert d.table() == [None, None, "small", "h2", None] and d.m.evictions == 1
    assert d.m.slot_bytes(3) == size["h2"] and d.m.slot_bytes(1) == 0
    tight = Device(tmp_path / "t", slots=4, budget=size["h1"] - 1)
    with pytest.raises(AdapterTooLargeError, match="more than the server's whole budget"):
        tight.r.add_folder("h1", vocab / "mts_head")
    assert tight.r.infos() == [] and tight.r.store.ids() == []
    tight.r.add_folder("small", fixture_dir("ia3_default"))
    assert [i["adapter_id"] for i in tight.r.infos()] == ["small"]


def test_a_slot_in_use_is_never_evicted_under_random_traffic(tmp_path):
    d = Device(tmp_path, slots=3)
    r = d.r
    names = [f"x{i}" for i in range(6)]
    for i, n in enumerate(names):
        r.add_folder(n, fixture_dir(["ia3_default", "seq_bn", "par_bn"][i % 3]))
    rng = random.Random(0)
    held: list = []  # (ref, slot) of admitted rows
    for _ in range(300):
        if held and rng.random() < 0.45:
            ref, slot = held.pop(rng.randrange(len(held)))
            d.release(ref, slot)
        else:
            ref = r.acquire(rng.choice(names))
            in_use = {d.m.table()[s] for _, s in held}
            g = d.grant(ref)
            assert in_use <= set(d.m.table()), "a slot used by a running row was evicted"
            if g is None:
                assert len(in_use) == 3
                r.release(ref)
            else:
                held.append((ref, g[0]))
    for ref, slot in held:
        d.release(ref, slot)
    assert all(r.record(n).pins == 0 for n in names)
    assert all(d.m.rows(s) == 0 for s in range(4))


def test_replace_of_a_resident_adapter_keeps_the_running_version_until_released(tmp_path):
    d = Device(tmp_path)
    r = d.r
    r.add_folder("m", fixture_dir("seq_bn"))
    old = r.acquire("m")
    slot_old = d.grant(old)[0]
    with pytest.raises(AdapterExistsError):
        r.add_folder("m", fixture_dir("par_bn"))
    info = r.add_folder("m", fixture_dir("par_bn"), replace=True)
    assert info["variant"] == "par_bn"
    d.check()
    assert d.m.table() == [None, ("m", old.version), None]  # the running version keeps its slot
    new = r.acquire("m")
    assert new.version > old.version
    assert d.grant(new) == (2, True) and d.slots.methods["bottleneck"].options[2].parallel
    d.release(old, slot_old)  # the old version's last row: its slot is cleared
    assert d.m.table() == [None, None, ("m", new.version)]
    d.release(new, 2)
    assert d.m.table() == [None, None, ("m", new.version)]  # current: stays resident, evictable


def test_replace_of_an_idle_resident_adapter_clears_its_slot_at_once(tmp_path):
    d = Device(tmp_path)
    r = d.r
    r.add_folder("m", fixture_dir("ia3_default"))
    ref = r.acquire("m")
    d.release(ref, d.grant(ref)[0])
    assert d.table() == [None, "m", None] and d.m.device_bytes() > 0
    r.add_folder("m", fixture_dir("seq_bn"), replace=True)
    d.check()
    assert d.table() == [None, None, None] and d.m.device_bytes() == 0


def test_delete_of_a_resident_adapter(tmp_path):
    d = Device(tmp_path)
    r = d.r
    r.add_folder("d", fixture_dir("ia3_default"))
    r.add_folder("e", fixture_dir("seq_bn"))
    ref = r.acquire("d")
    slot = d.grant(ref)[0]
    idle = r.acquire("e")
    d.release(idle, d.grant(idle)[0])
    bytes_before = d.m.device_bytes()
    r.delete("e")  # resident and idle: cleared at once
    d.check()
    assert d.table() == [None, "d", None] and d.m.device_bytes() < bytes_before
    r.delete("d")  # resident and running: finishes, then cleared
    d.check()
    with pytest.raises(AdapterNotFoundError):
        r.acquire("d")
    with pytest.raises(AdapterNotFoundError):
        r.delete("d")
    assert d.table() == [None, "d", None]  # still usable by the running row
    d.release(ref, slot)
    assert d.table() == [None, None, None] and d.m.device_bytes() == 0
    assert not (tmp_path / "store" / "d").exists()


def test_host_tier_lru_and_lazy_reload(tmp_path):
    r = make(tmp_path, host=2)
    for n, src in [("a", "ia3_default"), ("b", "seq_bn"), ("c", "par_bn")]:
        r.add_folder(n, fixture_dir(src))
    assert tiers(r) == {"a": "disk", "b": "host", "c": "host"}
    ref = r.acquire("a")  # read from disk again
    assert tiers(r) == {"a": "host", "b": "disk", "c": "host"}
    r.release(ref)


def test_a_read_from_disk_parses_on_a_thread_that_ends(tmp_path, monkeypatch):
    """Requests pin adapters from asyncio's pooled threads, which live on: torch work there would leave
    them an OpenMP team, and the engine's decode steps slower for good (server/threads.py). The disk read
    and parse of an acquire run on a new thread, gone once it returns; errors come through as before."""
    from server.adapters import registry

    ran: list[threading.Thread] = []
    parse = registry.parse_adapter
    monkeypatch.setattr(registry, "parse_adapter", lambda *a: ran.append(threading.current_thread()) or parse(*a))
    r = make(tmp_path, host=1)
    for n, src in [("a", "ia3_default"), ("b", "seq_bn")]:
        r.add_folder(n, fixture_dir(src))
    ran.clear()  # (uploads parse where their caller runs them: the API's routes give each its own thread)
    r.release(r.acquire("a"))  # on disk only: read again
    assert len(ran) == 1 and ran[0] is not threading.current_thread()
    ran[0].join(5)
    assert not ran[0].is_alive()
    for f in (tmp_path / "store").rglob("*"):  # b's weights file damaged on disk
        if f.is_file() and "b" in f.relative_to(tmp_path / "store").parts[:1] and f.suffix in (".bin", ".safetensors"):
            f.write_bytes(b"damaged")
    r.release(r.acquire("a"))  # keeps a in host memory, b on disk only
    with pytest.raises(InvalidAdapterError):
        r.acquire("b")


def test_host_tier_holds_bytes_too(tmp_path):
    """A trained LM head holds 64 KB of host memory, (IA)3 vectors under 1 KB: with --adapter-host-bytes the
    host tier evicts the least recently used until both the count and the bytes fit."""
    head = FIXTURES / "vocab" / "llama" / "mts_head"
    probe = make(tmp_path / "probe")
    size = {n: probe.record(n).weights.size_bytes for n, src in [("h", head), ("b", fixture_dir("ia3_all_out"))]
            if probe.add_folder(n, src)}
    r = Registry(AdapterStore(tmp_path / "store"), BASE, RegistryConfig(8, host_bytes=size["h"] + size["b"] + 8))
    r.scan()
    for n, src in [("a", fixture_dir("ia3_default")), ("h", head), ("b", fixture_dir("ia3_all_out"))]:
        r.add_folder(n, src)
    assert tiers(r) == {"a": "disk", "h": "host", "b": "host"}  # a (least recent) made room for b
    ref = r.acquire("a")  # pinned, it stays even past the budget; h, least recent, goes
    assert tiers(r) == {"a": "host", "h": "disk", "b": "host"}
    r.release(ref)
    tiny = Registry(AdapterStore(tmp_path / "store"), BASE, RegistryConfig(8, host_bytes=16))  # under any adapter
    tiny.scan()
    ref = tiny.acquire("h")  # loaded and kept alone (it used to be dropped as soon as read, and read again)
    assert tiers(tiny)["h"] == "host" and tiny.weights(ref) is not None
    tiny.release(ref)


def test_restart_lists_everything_at_once_and_loads_lazily(tmp_path):
    r = make(tmp_path)
    r.add_folder("p", fixture_dir("ia3_bin"))
    r.add_folder("q", fixture_dir("double_seq_bn"))
    r2 = make(tmp_path)
    assert tiers(r2) == {"p": "disk", "q": "disk"}
    assert r2.info("q")["variant"] == "double_seq_bn"
    ref = r2.acquire("q")
    assert tiers(r2)["q"] == "host"
    r2.release(ref)


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "x" * 129, "", "a..b"])
def test_bad_ids_are_refused_and_store_untouched(tmp_path, bad):
    r = make(tmp_path)
    with pytest.raises(InvalidAdapterIdError):
        r.add_folder(bad, fixture_dir("seq_bn"))
    assert r.infos() == []
    assert [p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == []
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_concurrent_add_replace_delete_acquire(tmp_path):
    r = make(tmp_path)
    srcs = ["ia3_default", "seq_bn", "par_bn", "double_seq_bn"]
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(25):
                n = f"c{rng.randrange(3)}"
                op = rng.random()
                if op < 0.3:
                    with contextlib.suppress(AdapterExistsError):
                        r.add_folder(n, fixture_dir(rng.choice(srcs)), replace=True)
                elif op < 0.45:
                    with contextlib.suppress(AdapterNotFoundError):
                        r.delete(n)
                else:
                    try:
                        ref = r.acquire(n)
                    except AdapterNotFoundError:
                        continue
                    r.release(ref)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # the catalogue and the disk agree, and nothing is left pinned or half-written
    ids = {i["adapter_id"] for i in r.infos()}
    on_disk = {p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")}
    assert ids == on_disk
    assert all(r.record(n).pins == 0 for n in ids)
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_one_id_check_per_upload(tmp_path, monkeypatch):
    """The id rule has one authority, the store's id-to-path function: one check per upload."""
    import server.adapters.store as store_mod

    calls = []
    real = store_mod.validate_id
    monkeypatch.setattr(store_mod, "validate_id", lambda i: (calls.append(i), real(i))[1])
    r = make(tmp_path)
    r.add_folder("ok", fixture_dir("seq_bn"))
    assert calls == ["ok"]
    with pytest.raises(InvalidAdapterIdError):
        r.add_folder("../up", fixture_dir("seq_bn"))
    assert [p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == ["ok"]


def test_engine_side_calls_never_wait_on_an_upload_doing_disk_io(tmp_path, monkeypatch):
    """Uploads and deletes hold only the admin lock across disk I/O; what the engine thread calls
    (weights, release, set_resident) takes the catalogue lock alone, so it never waits on a disk."""
    import time

    d = Device(tmp_path)
    r = d.r
    r.add_folder("a", fixture_dir("ia3_default"))
    ref = r.acquire("a")
    slow_started = threading.Event()
    real_commit = r.store.commit

    def slow_commit(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        slow_started.set()
        time.sleep(1.5)
        return real_commit(*args, **kw)

    monkeypatch.setattr(r.store, "commit", slow_commit)
    t = threading.Thread(target=r.add_folder, args=("b", fixture_dir("seq_bn")))
    t.start()
    assert slow_started.wait(10)
    t0 = time.perf_counter()
    slot = d.grant(ref)[0]  # reads the host copy through the registry
    d.release(ref, slot)
    assert time.perf_counter() - t0 < 0.5  # did not wait for the upload's disk I/O
    t.join()
    assert r.exists("b")


def test_two_processes_sharing_a_store_see_each_others_changes(tmp_path):
    """Two registries over one store folder, as two server processes (or replicas) have: an add, a
    replace and a delete by one are seen by the other at its next call; a request pinned before a
    replace or delete keeps the version it started with; the retired version is announced once."""
    a, b = make(tmp_path), make(tmp_path)
    retired: list = []
    b.on_retire(retired.append)
    a.add_folder("x", fixture_dir("ia3_default"))
    assert [i["adapter_id"] for i in b.infos()] == ["x"] and b.info("x")["variant"] == "ia3"
    ref = b.acquire("x")  # a request on b, running on the first version
    w1 = b.weights(ref)
    a.add_folder("x", fixture_dir("lora_qv"), replace=True)
    assert b.info("x")["method"] == "lora" and retired == [(ref.adapter_id, ref.version)]
    assert b.weights(ref) is w1  # the running request still has its version
    ref2 = b.acquire("x")
    assert ref2.version != ref.version and b.weights(ref2).method == "lora"
    b.release(ref)
    with pytest.raises(AdapterExistsError):  # b knows the id exists before writing over it
        b.add_folder("x", fixture_dir("seq_bn"))
    a.delete("x")
    with pytest.raises(AdapterNotFoundError):
        b.acquire("x")
    assert b.infos() == [] and len(retired) == 2
    b.release(ref2)
    b.add_folder("y", fixture_dir("seq_bn"))  # and the other way round
    assert a.info("y")["method"] == "bottleneck"


def test_manifests_round_trip_and_older_ones_still_load(tmp_path):
    """A manifest reads back as it was written; one written before revisions, virtual tokens and origins
    existed still loads and serves; one naming a method not served, or with a field of the wrong type,
    is skipped at start with the reason, and the rest load."""
    import json

    from server.adapters.store import MANIFEST, Manifest

    r = make(tmp_path)
    for aid in ("old", "alien", "broken", "fine"):
        r.add_folder(aid, fixture_dir("ia3_default"))
    m = r.store.manifest("fine")
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert m.method == "ia3" and m.virtual_tokens == 0 and m.revision and m.origin is None and m.files
    root = tmp_path / "store"
    old = json.loads((root / "old" / MANIFEST).read_text())
    for key in ("revision", "virtual_tokens"):
        del old[key]
    (root / "old" / MANIFEST).write_text(json.dumps(old))
    (root / "alien" / MANIFEST).write_text(json.dumps({**old, "method": "adalora"}))
    (root / "broken" / MANIFEST).write_text(json.dumps({**old, "num_parameters": "many"}))
    again = make(tmp_path)
    assert {i["adapter_id"] for i in again.infos()} == {"old", "fine"}
    assert "adalora" in again.skipped["alien"] and "num_parameters" in again.skipped["broken"]
    info = again.info("old")
    assert info == {**r.info("fine"), "adapter_id": "old", "created_at": old["created_at"], "tier": "disk"}
    ref = again.acquire("old")  # served: read from disk, pinned, with no virtual tokens
    assert ref.virtual_tokens == 0 and again.weights(ref).method == "ia3"
    again.release(ref)
