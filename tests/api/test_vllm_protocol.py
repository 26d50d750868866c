"""vLLM's model-server protocol: runtime load and unload from a server-side folder under the operator's
root (off by default), `/v1/models` with `parent`, and the `vllm:` metrics the gateways read."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.helpers import LiveServer, fixture_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("load_root")
    for name in ("lora_qv", "prefix_tuning", "seq_bn"):
        shutil.copytree(fixture_dir(name), r / name)
    (r / "broken").mkdir()
    (r / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    return r


@pytest.fixture(scope="module")
def live(tmp_path_factory, root):
    s = LiveServer(tmp_path_factory.mktemp("store"), adapter_load_root=root, admin_api_key="adm")
    yield s
    s.close()


ADMIN = {"Authorization": "Bearer adm"}


def test_load_generate_unload(live, root, tmp_path):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        for name in ("lora_qv", "prefix_tuning", "seq_bn"):  # any family we serve; a relative path is under the root
            path = name if name == "seq_bn" else str(root / name)
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=ADMIN)
            assert r.status_code == 200 and "added successfully" in r.text, r.text
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        base = next(m for m in models.values() if "parent" not in m)["id"]
        assert {models[n]["parent"] for n in ("lora_qv", "prefix_tuning", "seq_bn")} == {base}
        out = c.post("/v1/completions", json={"model": "prefix_tuning", "prompt": "hello", "max_tokens": 3})
        assert out.status_code == 200, out.text
        again = c.post("/v1/load_lora_adapter", json={"lora_name": "seq_bn", "lora_path": str(root / "seq_bn")}, headers=ADMIN)
        assert again.status_code == 409
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "seq_bn"}, headers=ADMIN)
        assert r.status_code == 200 and "removed successfully" in r.text
        assert c.post("/v1/completions", json={"model": "seq_bn", "prompt": "hi", "max_tokens": 2}).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "seq_bn"}, headers=ADMIN).status_code == 404
        assert "seq_bn" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        # an adapter uploaded through /adapters is the user's: unload does not remove it
        files = [("files", (f.name, f.read_bytes())) for f in sorted((root / "lora_qv").iterdir()) if f.is_file()]
        assert c.post("/adapters", data={"adapter_id": "mine"}, files=files, headers=ADMIN).status_code == 201
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=ADMIN)
        assert r.status_code == 409 and "DELETE /adapters" in r.json()["error"]["message"]
        assert c.get("/adapters/mine", headers=ADMIN).status_code == 200


def test_paths_outside_the_root_and_bad_folders_are_refused(live, root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(fixture_dir("ia3_default"), outside)
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "linked_files").mkdir()
    for f in outside.iterdir():  # a folder under the root whose files lead outside it
        (root / "linked_files" / f.name).symlink_to(f)
    with httpx.Client(base_url=live.url, timeout=60) as c:
        cases = [(str(outside), 403, "load root"), (str(root / "link"), 403, "load root"),
                 (str(root / ".." / root.name / ".." / "x"), 403, "load root"),
                 (str(root / "linked_files"), 403, "symbolic link"), ("../outside", 403, "load root"),
                 (str(root / "missing"), 404, "not a folder"), (str(root / "broken"), 400, "")]
        for path, status, text in cases:
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}, headers=ADMIN)
            assert r.status_code == status and text in r.json()["error"]["message"], (path, r.text)
        assert "x" not in {m["id"] for m in c.get("/v1/models").json()["data"]}  # nothing half-registered
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(root / "lora_qv")})
        assert r.status_code == 401  # the admin key, when keys are set


def test_off_by_default(tmp_path):
    s = LiveServer(tmp_path / "store")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(fixture_dir("lora_qv"))})
            assert r.status_code == 404 and "--adapter-load-root" in r.json()["error"]["message"]
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404
    finally:
        s.close()


def test_vllm_metric_families_are_served(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        text = c.get("/metrics").text
    for family in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert f"\n{family} " in text, family
    assert 'vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""}' in text
