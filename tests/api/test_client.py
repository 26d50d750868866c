"""`adapter-server client`: every command against a live server, the server's errors passed through with
a non-zero exit, the API key, and the upload progress bar."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from server.cli import main
from tests.helpers import LiveServer, fixture_dir, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("store"))
    yield s
    s.close()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["client", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_upload_list_show_generate_delete(server, capsys):
    url = ["--url", server.url]
    code, out, _ = cli(capsys, *url, "upload", str(fixture_dir("lora_qv")), "--id", "cli-lo")
    assert code == 0 and "uploaded cli-lo (lora" in out
    code, out, _ = cli(capsys, *url, "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["adapter_id", "method", "variant"]
    assert any(line.split()[:2] == ["cli-lo", "lora"] for line in out.splitlines()[1:])
    code, out, _ = cli(capsys, *url, "show", "cli-lo")
    assert code == 0 and json.loads(out) == httpx.get(server.url + "/adapters/cli-lo").json()

    body = {"prompt": "the quick brown fox", "adapter_id": "cli-lo", "max_new_tokens": 8, "ignore_eos": False}
    want = httpx.post(server.url + "/generate", json=body).json()
    code, out, _ = cli(capsys, *url, "generate", "--adapter", "cli-lo", "--max-new-tokens", "8", "the quick brown fox")
    assert code == 0 and out == want["text"] + "\n"
    code, out, _ = cli(capsys, *url, "generate", "--adapter", "cli-lo", "--max-new-tokens", "8", "--stream",
                       "the quick brown fox")
    assert code == 0 and out == want["text"] + "\n"
    code, out, _ = cli(capsys, *url, "generate", "--max-new-tokens", "8", "--json", "the quick brown fox")
    bare = httpx.post(server.url + "/generate", json={**body, "adapter_id": None}).json()
    assert code == 0 and json.loads(out)["token_ids"] == bare["token_ids"] != want["token_ids"]

    code, out, _ = cli(capsys, *url, "delete", "cli-lo")
    assert code == 0 and out == "deleted cli-lo\n"
    assert httpx.get(server.url + "/adapters/cli-lo").status_code == 404


def test_the_servers_errors_are_printed_and_exit_non_zero(server, capsys, tmp_path):
    url = ["--url", server.url]
    code, out, err = cli(capsys, *url, "show", "nope")
    assert code == 1 and out == "" and err.startswith("error: 404 ") and "nope" in err
    assert cli(capsys, *url, "upload", str(fixture_dir("ia3_default")), "--id", "twice")[0] == 0
    code, _, err = cli(capsys, *url, "upload", str(fixture_dir("ia3_default")), "--id", "twice")
    assert code == 1 and "409" in err
    code, out, _ = cli(capsys, *url, "upload", str(fixture_dir("seq_bn")), "--id", "twice", "--replace")
    assert code == 0 and "replaced twice (bottleneck" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    code, _, err = cli(capsys, *url, "upload", str(bad), "--id", "bad")
    assert code == 1 and err.startswith("error: 4")
    code, _, err = cli(capsys, *url, "generate", "--max-new-tokens", "100000", "x")
    assert code == 1 and "400" in err
    code, _, err = cli(capsys, "--url", f"http://127.0.0.1:{free_port()}", "list")
    assert code == 2 and "could not reach" in err


def test_api_key_and_upload_progress(tmp_path, capsys):
    s = LiveServer(tmp_path / "store", api_key="user-key", admin_api_key="admin-key")
    try:
        folder = tmp_path / "big"
        shutil.copytree(fixture_dir("lora_qv"), folder)
        (folder / "README.md").write_bytes(b"x" * (3 << 20))  # extra files are ignored by the server
        code, out, _ = cli(capsys, "--url", s.url, "--api-key", "user-key", "list")
        assert code == 0 and out.split() == ["adapter_id", "method", "variant", "num_parameters", "size_bytes", "tier",
                                             "created_at"]  # an empty store: the header alone
        code, _, err = cli(capsys, "--url", s.url, "upload", str(folder), "--id", "big")
        assert code == 1 and "401" in err
        code, out, err = cli(capsys, "--url", s.url, "--api-key", "admin-key", "upload", str(folder), "--id", "big")
        assert code == 0 and "uploaded big" in out and "upload big" in err and "100%" in err  # the bar, on stderr
        code, out, _ = cli(capsys, "--url", s.url, "--api-key", "user-key", "list", "--json")
        assert code == 0 and [a["adapter_id"] for a in json.loads(out)] == ["big"]
    finally:
        s.close()
