"""The registry as a state machine: the whole slot table and tiers asserted after each operation."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest

from server.adapters.registry import Registry
from server.adapters.spec import BaseModelInfo
from server.adapters.store import AdapterStore
from server.config import RegistryConfig
from server.errors import AdapterExistsError, AdapterNotFoundError, InvalidAdapterIdError
from tests.helpers import fixture_dir, tiny_model

BASE = BaseModelInfo.from_model(tiny_model())


def make(tmp_path, slots: int = 2, host: int = 8) -> Registry:
    r = Registry(AdapterStore(tmp_path / "store"), BASE, RegistryConfig(tmp_path / "store", slots, host))
    r.scan()
    return r


def table(r: Registry) -> list:
    return [None if k is None else k[0] for k in r.slot_table()]


def tiers(r: Registry) -> dict[str, str]:
    return {i["adapter_id"]: i["tier"] for i in r.infos()}


def test_lru_slots_pins_and_waiting(tmp_path):
    r = make(tmp_path, slots=2)
    for name, src in [("a", "ia3_default"), ("b", "seq_bn"), ("c", "par_bn")]:
        r.add_folder(name, fixture_dir(src))
    assert table(r) == [None, None, None]
    assert tiers(r) == {"a": "host", "b": "host", "c": "host"}

    ra = r.acquire("a")
    g = r.assign_slot(ra)
    assert g.slot == 1 and g.write is not None and g.evicted is None
    assert table(r) == [None, "a", None]
    assert r.assign_slot(ra).write is None  # resident: nothing to write

    rb = r.acquire("b")
    assert r.assign_slot(rb).slot == 2
    assert table(r) == [None, "a", "b"]

    rc = r.acquire("c")
    assert r.assign_slot(rc) is None  # every slot pinned: c waits, nothing evicted
    assert table(r) == [None, "a", "b"]

    r.release(ra)  # a unpinned: the LRU candidate
    g = r.assign_slot(rc)
    assert g.slot == 1 and g.evicted == ("a", 1)
    assert table(r) == [None, "c", "b"]
    assert tiers(r) == {"a": "host", "b": "device", "c": "device"}

    r.release(rb)
    r.release(rc)
    ra = r.acquire("a")
    g = r.assign_slot(ra)  # b is least recently used now
    assert g.slot == 2 and g.evicted[0] == "b"
    assert table(r) == [None, "c", "a"]
    r.release(ra)


def test_pinned_adapter_is_never_evicted_under_random_traffic(tmp_path):
    r = make(tmp_path, slots=3)
    names = [f"x{i}" for i in range(6)]
    for i, n in enumerate(names):
        r.add_folder(n, fixture_dir(["ia3_default", "seq_bn", "par_bn"][i % 3]))
    rng = random.Random(0)
    held: list = []
    for _ in range(400):
        if held and rng.random() < 0.45:
            ref = held.pop(rng.randrange(len(held)))
            r.release(ref)
        else:
            ref = r.acquire(rng.choice(names))
            before = {k for k in r.slot_table() if k}
            pinned_resident = {(h.adapter_id, h.version) for h in held if r.slot_of(h) is not None}
            g = r.assign_slot(ref)
            after = {k for k in r.slot_table() if k}
            assert pinned_resident <= after, "a pinned adapter lost its slot"
            if g is None:
                assert len(before) == 3
            held.append(ref)
        # invariants of the slot table
        t = r.slot_table()
        assert t[0] is None
        for s, key in enumerate(t[1:], start=1):
            if key is not None:
                assert r.record(key[0]).slot == s
    for ref in held:
        r.release(ref)
    assert all(r.record(n).pins == 0 for n in names)


def test_replace_keeps_the_running_version_until_released(tmp_path):
    r = make(tmp_path)
    r.add_folder("m", fixture_dir("seq_bn"))
    old = r.acquire("m")
    r.assign_slot(old)
    with pytest.raises(AdapterExistsError):
        r.add_folder("m", fixture_dir("par_bn"))
    info = r.add_folder("m", fixture_dir("par_bn"), replace=True)
    assert info["variant"] == "par_bn"
    assert table(r) == [None, "m", None]  # the old version keeps its slot while pinned
    assert r.slot_table()[1] == ("m", old.version)
    new = r.acquire("m")
    assert new.version > old.version
    g = r.assign_slot(new)
    assert g.slot == 2 and g.write.variant == "par_bn"
    r.release(old)
    assert r.slot_table() == [None, None, ("m", new.version)]
    r.release(new)


def test_delete_running_adapter_finishes_then_404(tmp_path):
    r = make(tmp_path)
    r.add_folder("d", fixture_dir("ia3_default"))
    ref = r.acquire("d")
    r.assign_slot(ref)
    r.delete("d")
    with pytest.raises(AdapterNotFoundError):
        r.acquire("d")
    with pytest.raises(AdapterNotFoundError):
        r.delete("d")
    assert r.slot_of(ref) == 1  # still usable by the running request
    r.release(ref)
    assert r.slot_table() == [None, None, None]
    assert not (tmp_path / "store" / "d").exists()


def test_host_tier_lru_and_lazy_reload(tmp_path):
    r = make(tmp_path, slots=1, host=2)
    for n, src in [("a", "ia3_default"), ("b", "seq_bn"), ("c", "par_bn")]:
        r.add_folder(n, fixture_dir(src))
    assert tiers(r) == {"a": "disk", "b": "host", "c": "host"}
    ref = r.acquire("a")  # read from disk again
    assert tiers(r) == {"a": "host", "b": "disk", "c": "host"}
    r.release(ref)


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
    r = make(tmp_path, slots=2)
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
                    r.assign_slot(ref)
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
    for s, key in enumerate(r.slot_table()[1:], start=1):
        if key is not None:
            rec = r.record(key[0])
            assert rec is not None and rec.version == key[1] and rec.slot == s
