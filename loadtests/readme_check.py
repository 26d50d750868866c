"""Run the README's walk-through (the curl block and the OpenAI client block) against a running server,
`serve` or `cluster`, and say whether every call succeeded. The embedded model must be the one served
(the demo adapters are written for it).

    .venv/bin/python -m loadtests.readme_check --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(readme: str, heading: str, lang: str) -> str:
    section = readme.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(rf"```{lang}\n(.*?)```", section, re.S))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    args = ap.parse_args()
    readme = (ROOT / "README.md").read_text()
    work = Path(tempfile.mkdtemp())
    sh = blocks(readme, "Walk-through (curl)", "bash").replace(".venv/bin/", f"{ROOT}/.venv/bin/")
    sh = sh.replace("http://127.0.0.1:8000", args.url)
    env = {**os.environ, "ADAPTER_SERVER_CACHE_DIR": str(ROOT / ".cache" / "models")}  # the converted model, not again
    r = subprocess.run(["bash", "-c", sh], cwd=work, capture_output=True, text=True, env=env)
    out = r.stdout
    py = blocks(readme, "OpenAI client", "python").replace("http://127.0.0.1:8000", args.url)
    p = subprocess.run([sys.executable, "-c", py], cwd=work, capture_output=True, text=True)
    sys.stdout.write(f"--- curl block (rc {r.returncode})\n{out}\n{r.stderr}\n--- OpenAI block (rc {p.returncode})\n"
                     f"{p.stdout}\n{p.stderr[-2000:]}\n")
    # the curl block ends with the DELETE's 204; the client block with the deleted adapter's 404 (exit 1)
    ok = (r.returncode == 0 and p.returncode == 0 and '"error"' not in out and "204\n" in out
          and out.rstrip().endswith("exit 1: gone"))
    sys.stdout.write("walk-through: " + ("every call succeeded" if ok else "FAILED") + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
