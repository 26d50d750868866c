"""`adapter-server client ...`: manage adapters and generate against a running server, without curl.

    adapter-server client upload FOLDER --id ID [--replace]
    adapter-server client list | show ID | delete ID
    adapter-server client generate [--adapter ID] PROMPT [--stream] [--max-new-tokens N] [--temperature T]

`--url` (default http://127.0.0.1:8000, or ADAPTER_SERVER_URL) and `--api-key` (or ADAPTER_SERVER_API_KEY)
come before the command. A failed call prints the server's own error message and exits non-zero (1 for
an error the server gave, 2 when it could not be reached). Uploads of more than a megabyte show a progress
bar. Talks only HTTP (httpx): it never imports the engine or torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
BAR_BYTES = 1 << 20  # uploads above this show a progress bar


class ClientError(Exception):
    """A call that failed: the server's message, or why the server could not be reached."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _error(r: httpx.Response) -> ClientError:
    try:
        err = r.json()["error"]
        return ClientError(f"{r.status_code} {err['type']}: {err['message']}")
    except (ValueError, KeyError, TypeError):
        return ClientError(f"{r.status_code}: {r.text[:300] or r.reason_phrase}")


class _Progress:
    """A file whose reads advance a tqdm bar (httpx streams multipart bodies by reading their files)."""

    def __init__(self, f: IO[bytes], bar: Any) -> None:
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.bar.update(len(chunk))
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


class Client:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"could not reach {self.http.base_url}: {e}", code=2) from e
        if r.status_code >= 400:
            raise _error(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._call(method, path, **kw)
        try:
            return r.json()
        except ValueError as e:
            raise ClientError(f"{r.status_code}: not a JSON answer from {self.http.base_url}{path}") from e

    def close(self) -> None:
        self.http.close()

    def upload(self, folder: Path, adapter_id: str, replace: bool = False, progress: bool = True) -> dict[str, Any]:
        if not folder.is_dir():
            raise ClientError(f"{folder} is not a folder")
        paths = sorted(p for p in folder.iterdir() if p.is_file())
        if not paths:
            raise ClientError(f"{folder} holds no files")
        total = sum(p.stat().st_size for p in paths)
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {adapter_id}",
                  disable=not progress or total < BAR_BYTES, file=sys.stderr) as bar:
            handles: list[IO[bytes]] = []
            try:
                for p in paths:
                    handles.append(p.open("rb"))
                files = [("files", (p.name, _Progress(h, bar), "application/octet-stream"))
                         for p, h in zip(paths, handles, strict=True)]
                return self._json("POST", "/adapters",  # type: ignore[no-any-return]
                                  params={"replace": "true"} if replace else None,
                                  data={"adapter_id": adapter_id}, files=files)
            except OSError as e:
                raise ClientError(f"cannot read {e.filename}: {e.strerror}") from e
            finally:
                for h in handles:
                    h.close()

    def list(self) -> list[dict[str, Any]]:
        return self._json("GET", "/adapters")["adapters"]  # type: ignore[no-any-return]

    def show(self, adapter_id: str) -> dict[str, Any]:
        return self._json("GET", f"/adapters/{quote(adapter_id, safe='')}")  # type: ignore[no-any-return]

    def delete(self, adapter_id: str) -> None:
        self._call("DELETE", f"/adapters/{quote(adapter_id, safe='')}")

    def generate(self, prompt: str, adapter_id: str | None = None, **params: Any) -> dict[str, Any]:
        return self._json("POST", "/generate", json={"prompt": prompt, "adapter_id": adapter_id, **params})  # type: ignore[no-any-return]

    def stream(self, prompt: str, adapter_id: str | None = None, **params: Any) -> Iterator[dict[str, Any]]:
        """Each event of a streamed generation: the tokens' {"token_id", "text", "logprob"}, then the final
        response object."""
        body = {"prompt": prompt, "adapter_id": adapter_id, **params, "stream": True}
        try:
            with self.http.stream("POST", "/generate", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        ev = json.loads(data)
                    except ValueError as e:
                        raise ClientError(f"a malformed event in the stream: {data[:100]!r}") from e
                    if "error" in ev:
                        raise ClientError(f"{ev['error'].get('type')}: {ev['error'].get('message')}")
                    yield ev
        except httpx.HTTPError as e:
            raise ClientError(f"could not reach {self.http.base_url}: {e}", code=2) from e


TABLE = ("adapter_id", "method", "variant", "num_parameters", "size_bytes", "tier", "created_at")


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[str(r.get(k, "")) for k in TABLE] for r in rows]
    widths = [max([len(k), *(len(c[i]) for c in cells)]) for i, k in enumerate(TABLE)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(TABLE, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("client", help="talk to a running server: upload, list, show, delete adapters; generate")
    p.add_argument("--url", default=os.environ.get("ADAPTER_SERVER_URL", DEFAULT_URL),
                   help=f"the server (env ADAPTER_SERVER_URL; default {DEFAULT_URL})")
    p.add_argument("--api-key", dest="api_key", default=os.environ.get("ADAPTER_SERVER_API_KEY"),
                   help="bearer key, if the server asks for one (env ADAPTER_SERVER_API_KEY)")
    cs = p.add_subparsers(dest="client_cmd", required=True)
    u = cs.add_parser("upload", help="upload a saved adapter folder (PEFT or AdapterHub)")
    u.add_argument("folder", type=Path)
    u.add_argument("--id", dest="adapter_id", required=True)
    u.add_argument("--replace", action="store_true", help="replace an adapter of this id (else 409 if it exists)")
    cs.add_parser("list", help="every adapter, as a table (--json for the raw list)").add_argument("--json", action="store_true")
    cs.add_parser("show", help="one adapter's info (JSON)").add_argument("adapter_id")
    cs.add_parser("delete", help="delete an adapter").add_argument("adapter_id")
    g = cs.add_parser("generate", help="generate from a prompt (the bare model without --adapter)")
    g.add_argument("prompt")
    g.add_argument("--adapter", dest="adapter_id", default=None)
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", dest="top_p", type=float, default=None)
    g.add_argument("--top-k", dest="top_k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print the whole response object")


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    c = Client(args.url, args.api_key)
    try:
        cmd = args.client_cmd
        if cmd == "upload":
            info = c.upload(args.folder, args.adapter_id, args.replace)
            out.write(f"{'replaced' if args.replace else 'uploaded'} {info['adapter_id']} ({info['method']}, "
                      f"{info['variant']}, {info['num_parameters']:,} parameters)\n")
        elif cmd == "list":
            rows = c.list()
            out.write((json.dumps(rows, indent=1) if args.json else _table(rows)) + "\n")
        elif cmd == "show":
            out.write(json.dumps(c.show(args.adapter_id), indent=1) + "\n")
        elif cmd == "delete":
            c.delete(args.adapter_id)
            out.write(f"deleted {args.adapter_id}\n")
        else:
            params = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
                      if getattr(args, k) is not None}
            if args.stream:
                final: dict[str, Any] = {}
                for ev in c.stream(args.prompt, args.adapter_id, **params):
                    if "token_id" in ev and "finish_reason" not in ev:
                        out.write(ev.get("text", ""))
                        out.flush()
                    else:
                        final = ev
                out.write("\n")
                if args.json:
                    out.write(json.dumps(final, indent=1) + "\n")
            else:
                r = c.generate(args.prompt, args.adapter_id, **params)
                out.write((json.dumps(r, indent=1) if args.json else r["text"]) + "\n")
    except ClientError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.code
    finally:
        c.close()
    return 0
