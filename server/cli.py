"""Command line: `adapter-server serve`, `cluster`, `merge`, `demo-adapters` and `client`. Serve flags map onto
Settings fields."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import client
from .config import Settings
from .errors import AdapterServerError


def _settings(args: argparse.Namespace) -> Settings:
    local = ("cmd", "adapter", "out", "count", "kinds", "seed", *CLUSTER_FLAGS)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in local}
    return Settings(**given)


CLUSTER_FLAGS = ("replicas", "address", "cpus_per_replica", "gpus_per_replica", "min_replicas", "max_replicas",
                 "upscale_delay_s", "downscale_delay_s", "proxy_location", "routing")


def run_cluster(settings: Settings, args: argparse.Namespace) -> None:
    """Start (or join, with --address) a Ray cluster and serve the app on it until interrupted."""
    import math
    import os
    import time

    import ray
    from ray import serve

    from .cluster.app import ClusterConfig, build

    # replicas run elsewhere: every path they read must not depend on this process's directory
    settings = settings.model_copy(update={"store": settings.store.resolve(), "cache_dir": settings.cache_dir.resolve()})
    cfg = ClusterConfig(args.replicas, args.cpus_per_replica, args.gpus_per_replica, args.min_replicas, args.max_replicas,
                        args.upscale_delay_s, args.downscale_delay_s, args.routing)
    if args.address:
        ray.init(address=args.address, include_dashboard=False)
    else:  # a local cluster: enough logical CPUs for every replica and the ingress, whatever the cores
        need = math.ceil((cfg.max_replicas or cfg.replicas) * cfg.cpus_per_replica + 1)
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location=args.proxy_location)
    serve.run(build(settings, cfg), name="adapter-server", route_prefix="/")
    logging.getLogger("adapter-server").info("cluster serving on http://%s:%d with %s", settings.host, settings.port,
                                             f"{cfg.min_replicas}-{cfg.max_replicas} replicas" if cfg.max_replicas
                                             else f"{cfg.replicas} replicas")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def _serve_flags(p: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, help=f"{field.description or ''} (env ADAPTER_SERVER_{name.upper()}; default {field.default})")


def write_demo_adapters(settings: Settings, out: Path, count: int = 0, kinds: list[str] | None = None,
                        seed: int = 0) -> None:
    """Untrained adapters that fit the served model, for trying the API: they change outputs, not skills."""
    from transformers import AutoConfig

    from .adapters.methods import write_demo
    from .engine.model_loader import EMBEDDED, embedded_folder

    folder = embedded_folder(settings.cache_dir) if settings.model == EMBEDDED else Path(settings.model)
    cfg = AutoConfig.from_pretrained(folder)

    def one(kind: str, path: Path, s: int) -> None:
        write_demo(kind, path, cfg, seed=s)

    if count:
        kinds = kinds or ["ia3"]
        for i in range(count):
            kind = kinds[i % len(kinds)]
            one(kind, out / f"{kind.replace('_', '-')}-{i}", seed + i)
    else:
        one("ia3", out / "peft-ia3", seed + 1)
        one("lora", out / "peft-lora", seed + 3)
        one("dora", out / "peft-dora", seed + 4)
        one("prompt", out / "peft-prompt", seed + 5)
        one("prefix", out / "peft-prefix", seed + 6)
        for preset in ("seq_bn", "double_seq_bn", "par_bn", "compacter"):
            one(preset, out / f"hub-{preset.replace('_', '-')}", seed + 2)
    logging.getLogger("adapter-server").info("wrote demo adapters under %s", out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapter-server", description="Serve many adapters on one frozen base model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _serve_flags(sub.add_parser("serve", help="start the HTTP server"))
    c = sub.add_parser("cluster", help="serve on a Ray cluster: engine replicas with adapter affinity behind one "
                                       "ingress (needs `pip install adapter-server[cluster]`)")
    _serve_flags(c)
    c.add_argument("--replicas", type=int, default=2, help="engine replicas (one base model each)")
    c.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    c.add_argument("--cpus-per-replica", dest="cpus_per_replica", type=float, default=1.0)
    c.add_argument("--gpus-per-replica", dest="gpus_per_replica", type=float, default=0.0)
    c.add_argument("--min-replicas", dest="min_replicas", type=int, default=None, help="with --max-replicas: autoscale")
    c.add_argument("--max-replicas", dest="max_replicas", type=int, default=None)
    c.add_argument("--upscale-delay-s", dest="upscale_delay_s", type=float, default=30.0,
                   help="autoscaling: seconds of load above the target before a replica is added")
    c.add_argument("--downscale-delay-s", dest="downscale_delay_s", type=float, default=600.0,
                   help="autoscaling: seconds of load below the target before a replica is removed")
    c.add_argument("--proxy-location", dest="proxy_location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                   help="where Ray Serve runs the HTTP ingress proxy (EveryNode: put a load balancer in front)")
    c.add_argument("--routing", choices=["affinity", "ray-default"], default="affinity",
                   help="affinity: to a replica holding the adapter, spilling when it is saturated; "
                        "ray-default: Ray Serve's power of two choices (for comparison)")
    m = sub.add_parser("merge", help="export a standalone HF model folder with an (IA)3, LoRA or DoRA adapter folded in")
    m.add_argument("--adapter", required=True, help="adapter id in the store")
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument("--model", default=None)
    m.add_argument("--store", default=None)
    m.add_argument("--cache-dir", dest="cache_dir", default=None)
    d = sub.add_parser("demo-adapters", help="write demo adapters (random weights, real PEFT and AdapterHub layouts)")
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--model", default=None)
    d.add_argument("--cache-dir", dest="cache_dir", default=None)
    d.add_argument("--count", type=int, default=0, help="write this many, named <kind>-<i>, cycling over --kinds")
    d.add_argument("--kinds", default="ia3,seq_bn,double_seq_bn,par_bn,compacter,lora,dora,prompt,prefix",
                   help="ia3, seq_bn, double_seq_bn, par_bn, compacter, lora or dora (rank 16), lora<r> or dora<r>, "
                        "prompt or prefix (20 virtual tokens), prompt<n> or prefix<n>")
    d.add_argument("--seed", type=int, default=0)
    client.add_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "client":
        return client.run(args)
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "merge":
        from .export import export_merged

        try:
            out = export_merged(settings.model_cfg(), settings.store, args.adapter, args.out)
        except AdapterServerError as e:
            logging.getLogger("adapter-server").error("%s", e)
            return 2
        logging.getLogger("adapter-server").info("merged model written to %s", out)
        return 0
    if args.cmd == "demo-adapters":
        write_demo_adapters(settings, args.out, args.count, args.kinds.split(","), args.seed)
        return 0
    if args.cmd == "cluster":
        run_cluster(settings, args)
        return 0
    from .main import run

    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
