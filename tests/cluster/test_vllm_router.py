"""vLLM's router (`vllm-router`, the production-stack router wheel from PyPI) in front of two plain
`serve` apps, in its multi-model (inference gateway) mode: it routes each request by `model` to the
server that holds that adapter. Runs in its own network namespace (tests/cluster/netns.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cluster.netns import run_driver


@pytest.fixture(scope="module")
def results():
    if not Path(sys.executable).with_name("vllm-router").exists():
        pytest.skip("vllm-router is not installed (pip install vllm-router, in the dev extra)")
    return run_driver("router_driver.py", timeout=300)


def test_vllm_router_routes_each_adapter_to_the_server_that_holds_it(results):
    assert results["register"] == [200, 200], results["register_errors"]
    assert {"alpha", "beta"} <= set(results["models"])
    # each adapter exists on one server only: a request routed to the other would be a 404
    for name, calls in results["routed"].items():
        assert calls == [[200, True]] * 4, name  # 200, and the text the server itself gives
    status, events, last = results["stream"]
    assert status == 200 and events >= 2 and last == "data: [DONE]"
