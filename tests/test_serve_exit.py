"""`adapter-server serve` with a model it cannot load ends at start, with a non-zero exit and a message
naming why, instead of staying up answering /health 503 forever (read as "still starting")."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import TINY, free_port


def test_serve_exits_non_zero_naming_an_architecture_it_cannot_load(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    cfg = json.loads((TINY / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3n", "architectures": ["Gemma3nForCausalLM"]}))
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--store", str(tmp_path / "store"),
         "--port", str(free_port()), "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "gemma3n" in proc.stderr.splitlines()[-1] and "loading failed" in proc.stderr.splitlines()[-1]
