"""The cluster as a Ray Serve application: `--replicas` engine replicas behind one ingress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ray import serve

from ..config import Settings
from .ingress import Ingress
from .replica import EngineReplica
from .router import STATS_PERIOD_S, AffinityRouter


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 2
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    min_replicas: int | None = None  # with max_replicas: autoscale between them instead
    max_replicas: int | None = None
    upscale_delay_s: float = 30.0  # autoscaling: how long load must stay above target before adding a replica
    downscale_delay_s: float = 600.0  # ... and below it before removing one (Ray Serve's defaults)
    routing: Literal["affinity", "ray-default"] = "affinity"  # ray-default: Ray's power of two choices


def build(settings: Settings, cfg: ClusterConfig) -> Any:
    """The bound application: an ingress over the engine deployment."""
    scaling: dict[str, Any] = ({"num_replicas": cfg.replicas} if cfg.min_replicas is None or cfg.max_replicas is None
                               else {"autoscaling_config": {"min_replicas": cfg.min_replicas,
                                                            "max_replicas": cfg.max_replicas,
                                                            "target_ongoing_requests": settings.max_batch_size,
                                                            "upscale_delay_s": cfg.upscale_delay_s,
                                                            "downscale_delay_s": cfg.downscale_delay_s}})
    if cfg.routing == "affinity":
        scaling["request_router_config"] = {"request_router_class": AffinityRouter,
                                            "request_routing_stats_period_s": STATS_PERIOD_S}
    engine: Any = serve.deployment(
        EngineReplica, name="EngineReplica", max_ongoing_requests=settings.max_batch_size + settings.max_queue,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}, **scaling,
    )
    # the ingress only forwards: it must admit every request the replicas together can hold (Ray Serve's
    # default of 5 in flight would cap the whole cluster below one replica's batch)
    per_replica = settings.max_batch_size + settings.max_queue
    ingress: Any = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0.1},
                                    max_ongoing_requests=(cfg.max_replicas or cfg.replicas) * per_replica)
    return ingress.bind(engine.bind(settings.model_dump(mode="json")))


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (`import_path: server.cluster.app:build_app`, e.g. in a KubeRay
    RayService): `args` holds the `serve` settings by name plus the ClusterConfig fields."""
    names = set(ClusterConfig.__dataclass_fields__)
    cfg = ClusterConfig(**{k: v for k, v in args.items() if k in names})
    return build(Settings(**{k: v for k, v in args.items() if k not in names}), cfg)
