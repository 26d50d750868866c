"""Run the built image as a user would, with podman, and check it (`make image-check`, after `make image`):

1. `podman run -d -p 127.0.0.1:PORT:8000 -v VOLUME:/data/adapters IMAGE`; the image's HEALTHCHECK turns
   healthy (run by `podman healthcheck run`: podman schedules it through systemd, which a container host
   may not have);
2. the server process runs as the image's non-root user (uid 10001);
3. the README walk-through (`loadtests.readme_check`) passes against it;
4. the adapters it left in the volume are there after the container is replaced by a new one on the same
   volume, and answer the same greedy request with the same text;
5. the image's size.

    .venv/bin/python -m loadtests.container_check [--image localhost/adapter-server:cpu] [--port 8031]

Prints one JSON object (also to --out) and exits non-zero when a check fails; the containers and the
volume it made are removed either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENGINE = os.environ.get("ENGINE", "podman")
UID = "10001"  # the Dockerfile's user


def sh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def runtime_args(image: str) -> list[str]:
    """What this machine's podman needs to start a container (deploy/podman_args.sh)."""
    script = f'. "{ROOT}/deploy/podman_args.sh" "$1" && printf "%s\\n" "${{RUNTIME_ARGS[@]}}"'
    r = sh("bash", "-c", script, "_", image)
    return [a for a in r.stdout.splitlines() if a]


def get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def generate(url: str, adapter_id: str) -> str:
    body = json.dumps({"prompt": "The capital of France is", "max_new_tokens": 12, "adapter_id": adapter_id}).encode()
    req = urllib.request.Request(f"{url}/generate", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["text"]


def start(image: str, name: str, volume: str, port: int, rt: list[str]) -> float:
    """Start a container and wait for its health check to pass; seconds to healthy."""
    t0 = time.time()
    sh(ENGINE, "run", *rt, "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{volume}:/data/adapters", image)
    deadline = t0 + 300
    while time.time() < deadline:
        if sh(ENGINE, "healthcheck", "run", name, check=False).returncode == 0:
            return time.time() - t0
        state = sh(ENGINE, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            logs = sh(ENGINE, "logs", name, check=False)
            raise RuntimeError(f"{name} is {state}: {(logs.stdout + logs.stderr)[-1500:]}")
        time.sleep(2)
    raise RuntimeError(f"{name} not healthy in 300 s")


def health_status(name: str) -> str:
    for field in ("{{.State.Health.Status}}", "{{.State.Healthcheck.Status}}"):
        r = sh(ENGINE, "inspect", "--format", field, name, check=False)
        if r.returncode == 0 and r.stdout.strip() not in ("", "<no value>"):
            return r.stdout.strip()
    return "unknown"


def check(image: str, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {"image": image, "engine": sh(ENGINE, "--version").stdout.strip()}
    out["image_mb"] = round(int(sh(ENGINE, "image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6)
    rt = runtime_args(image)
    out["runtime_args"] = rt
    tag = f"adapter-server-check-{os.getpid()}"
    volume, url = tag, f"http://127.0.0.1:{port}"
    sh(ENGINE, "volume", "create", volume)
    names = [f"{tag}-a", f"{tag}-b"]
    try:
        out["seconds_to_healthy"] = round(start(image, names[0], volume, port, rt), 1)
        out["health"] = health_status(names[0])
        out["process_uid"] = sh(ENGINE, "exec", names[0], "id", "-u").stdout.strip()
        out["server_user"] = sh(ENGINE, "top", names[0], "user", "comm").stdout.split("\n")[1:2]
        walk = subprocess.run([sys.executable, "-m", "loadtests.readme_check", "--url", url], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        out["walk_through"] = walk.stdout.strip().splitlines()[-1] if walk.stdout.strip() else walk.stderr[-500:]
        out["walk_through_ok"] = walk.returncode == 0
        before = sorted(a["adapter_id"] for a in get(f"{url}/adapters")["adapters"])
        texts = {a: generate(url, a) for a in before}
        sh(ENGINE, "rm", "-f", names[0])  # the container replaced, the volume kept
        start(image, names[1], volume, port, rt)
        after = sorted(a["adapter_id"] for a in get(f"{url}/adapters")["adapters"])
        out["adapters_before"], out["adapters_after"] = before, after
        out["same_text_after"] = all(generate(url, a) == t for a, t in texts.items())
    finally:
        for n in names:
            sh(ENGINE, "rm", "-f", n, check=False)
        sh(ENGINE, "volume", "rm", "-f", volume, check=False)
    out["ok"] = bool(out["health"] == "healthy" and out["process_uid"] == UID and out["walk_through_ok"]
                     and out["adapters_before"] and out["adapters_before"] == out["adapters_after"]
                     and out["same_text_after"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="localhost/adapter-server:cpu")
    ap.add_argument("--port", type=int, default=8031)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = check(args.image, args.port)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
