"""The deployment examples parse, and the RayService's Serve application builds from its own args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_rayservice_manifest_builds_its_serve_application():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from ray.serve.schema import ServeDeploySchema

    from server.cluster.app import build_app

    docs = list(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    svc = next(d for d in docs if d["kind"] == "RayService")
    assert svc["apiVersion"] == "ray.io/v1" and svc["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    serve_cfg = ServeDeploySchema(**yaml.safe_load(svc["spec"]["serveConfigV2"]))  # Ray's own schema
    (application,) = serve_cfg.applications
    assert application.import_path == "server.cluster.app:build_app"
    assert type(build_app(application.args)).__name__ == "Application"  # the settings and flags are valid
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims["adapter-store"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_gateway_example_parses_and_routes_to_the_pool():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "gateway-inference-pool.yaml").read_text())}
    pool, route = docs["InferencePool"], docs["HTTPRoute"]
    assert pool["spec"]["targetPorts"][0]["number"] == 8000
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])


def test_the_ingress_admits_what_every_replica_together_can_hold():
    """Ray Serve admits 5 requests in flight per replica unless told: on the ingress, that capped the whole
    cluster below one engine's batch (a hot adapter never spilled). Private attribute: the bound graph."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from server.cluster.app import ClusterConfig, build
    from server.config import Settings

    s = Settings(model="tests/fixtures/tiny_llama", max_batch_size=8, max_queue=16)
    for cfg, replicas in ((ClusterConfig(replicas=3), 3), (ClusterConfig(min_replicas=1, max_replicas=4), 4)):
        ingress = build(s, cfg)._bound_deployment
        engine = ingress.init_args[0]._bound_deployment
        assert engine.max_ongoing_requests == 8 + 16
        assert ingress.max_ongoing_requests == replicas * (8 + 16)
