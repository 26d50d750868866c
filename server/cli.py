"""Command line: `adapter-server serve` and `adapter-server merge`. Flags map onto Settings fields."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import Settings
from .errors import AdapterServerError


def _settings(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("cmd", "adapter", "out")}
    return Settings(**given)


def _serve_flags(p: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, help=f"{field.description or ''} (env ADAPTER_SERVER_{name.upper()}; default {field.default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapter-server", description="Serve many adapters on one frozen base model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _serve_flags(sub.add_parser("serve", help="start the HTTP server"))
    m = sub.add_parser("merge", help="export a standalone HF model folder with an (IA)3 adapter folded in")
    m.add_argument("--adapter", required=True, help="adapter id in the store")
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument("--model", default=None)
    m.add_argument("--store", default=None)
    m.add_argument("--cache-dir", dest="cache_dir", default=None)
    args = parser.parse_args(argv)
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
    from .main import run

    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
