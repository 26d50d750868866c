"""Run a driver script inside a network namespace that holds only loopback (`unshare --net`, then `lo`
up): Ray and vLLM's router open listening sockets we do not choose, and must reach nothing else."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def netns_available() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    r = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot make a network namespace: {r.stderr.strip()}"


def run_driver(script: str, after: str = "true", timeout: float = 600) -> dict:
    """Run tests/cluster/<script> in its own namespace, then the shell command `after` (cleanup); return
    the JSON of the driver's last `RESULT ` line. Skips, saying why, where no namespace can be made."""
    if (why := netns_available()) is not None:
        pytest.skip(why)
    cmd = f"ip link set lo up && {sys.executable} {ROOT / 'tests' / 'cluster' / script}; rc=$?; {after}; exit $rc"
    p = subprocess.run(["unshare", "--net", "sh", "-c", cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
