"""`adapter-server cluster --address` joining a Ray cluster of two nodes (two raylets on this machine,
one CPU each), autoscaling between one and two engine replicas: sustained load scales it up onto the second
node, quiet scales it back down, and nothing fails meanwhile. Runs in its own network namespace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cluster.netns import run_driver


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install adapter-server[cluster])")
    ray_cli = Path(sys.executable).with_name("ray")
    return run_driver("multinode_driver.py", after=f"{ray_cli} stop --force >/dev/null 2>&1")


def test_the_cli_joins_a_two_node_cluster_and_starts_at_the_minimum(results):
    assert results["up"] and results["nodes"] == 2
    assert results["at_start"] == [1]  # one replica, on one node
    assert results["upload"] == 201


def test_sustained_load_scales_up_onto_the_other_node_and_quiet_scales_down(results):
    assert results["scaled_up"] and results["during"] == [1, 1]  # one replica on each node
    assert results["burst_ok"]  # every request answered while it scaled
    assert results["scaled_down"]
    assert results["after"] == [200, 200]  # the adapter and the base model, served after scaling down
