"""The container image as a user runs it (loadtests/container_check.py), where podman is installed and can
start containers and `make image` has built the image: healthy, non-root, the README walk-through
passing against it, adapters in the volume surviving a replaced container. Skipped, saying why, elsewhere
(CI builds no images: `make image` is the documented way, then `make image-check` or this test)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from loadtests.container_check import ENGINE, check, runtime_args

IMAGE = os.environ.get("ADAPTER_SERVER_IMAGE", "localhost/adapter-server:cpu")


def _why_not() -> str | None:
    if shutil.which(ENGINE) is None:
        return f"{ENGINE} is not installed (Debian: apt-get install podman)"
    if subprocess.run([ENGINE, "image", "exists", IMAGE], capture_output=True).returncode != 0:
        return f"no image {IMAGE}: `make image` builds it"
    try:
        runtime_args(IMAGE)
    except RuntimeError as e:
        return f"{ENGINE} cannot start a container here: {e}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif((why := _why_not()) is not None, reason=why or "")]


def test_the_image_serves_the_walk_through_as_a_non_root_user_and_keeps_adapters():
    res = check(IMAGE, 8032)
    assert res["health"] == "healthy"
    assert res["process_uid"] == "10001"
    assert res["walk_through_ok"], res["walk_through"]
    assert res["adapters_before"] and res["adapters_after"] == res["adapters_before"]
    assert res["same_text_after"]
