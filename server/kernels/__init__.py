"""Small native kernels for the CPU, compiled on first use with the machine's C++ compiler and cached.

Each kernel is one C++ file here with a C entry point, built with `-O3 -march=native -fopenmp` into a
shared library under `$ADAPTER_SERVER_KERNELS` (default `~/.cache/adapter-server/kernels`), named by a
hash of its source, the flags and the CPU, and loaded with ctypes. The OpenMP runtime is the one torch
already loaded (same soname), so torch's thread count applies. Without a compiler, or if building fails,
`load` returns None and says why once; callers keep an eager PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}
errors: dict[str, str] = {}  # why a kernel is not available, by name


def cache_dir() -> Path:
    root = os.environ.get("ADAPTER_SERVER_KERNELS")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapter-server" / "kernels"


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(x for x in lines if x.startswith(("model name", "flags")))[:4000]
    except OSError:
        return platform.processor()


def load(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any:
    """The C function `name` of HERE/name.cpp with this signature, built if this machine has none cached
    (or None: see `errors`)."""
    with _LOCK:
        if name not in _LOADED:
            try:
                fn = getattr(ctypes.CDLL(str(_build(name))), name)
                fn.argtypes, fn.restype = argtypes, restype
                _LOADED[name] = fn
            except Exception as e:  # no compiler, a failed build: the caller's eager path serves
                errors[name] = f"{type(e).__name__}: {e}"[:500]
                log.warning("native kernel %s unavailable, using PyTorch ops: %s", name, errors[name])
                _LOADED[name] = None
        return _LOADED[name]


def _build(name: str) -> Path:
    source = (HERE / f"{name}.cpp").read_bytes()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    headers = [h.read_bytes() for h in sorted(HERE.glob("*.h"))]  # what the sources include from here
    key = hashlib.sha256(b"\0".join([source, *headers, " ".join(FLAGS).encode(), cxx.encode(), _cpu().encode()])).hexdigest()[:20]
    out = cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, renamed into place: atomic
        src, lib = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
        src.write_bytes(source)
        run = subprocess.run([cxx, *FLAGS, f"-I{HERE}", str(src), "-o", str(lib)], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {run.stderr.strip()[-400:]}")
        os.replace(lib, out)
    return out
