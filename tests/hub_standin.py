"""A Hugging Face Hub stand-in on loopback, for tests of the real download code (``HF_ENDPOINT`` points at it).

It answers the requests huggingface_hub's ``snapshot_download`` makes, with the Hub's status codes and error
headers (``X-Error-Code``: ``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``, ``EntryNotFound``):

- ``GET /api/models/{repo}/revision/{revision}``: the repo's commit ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{revision}``: every file with its ``size`` and blob ``oid`` (one page);
- ``HEAD``/``GET /{repo}/resolve/{revision}/{file}``: ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and the bytes.

Every request is recorded (``requests``: method and path), so a test can count what was downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubStandIn:
    """``repos``: ``{repo_id: {file name: bytes}}``; ``gated``: repo ids that refuse anonymous downloads."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()):
        self.repos = repos
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []
        self.commits = {repo: hashlib.sha1(json.dumps(sorted((n, hashlib.sha1(b).hexdigest()) for n, b in
                                                              files.items())).encode()).hexdigest()
                        for repo, files in repos.items()}  # fmt: skip
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                standin._serve(self, body=False)

            def do_GET(self):
                standin._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        """The files whose bytes were fetched (GETs of resolve URLs), in order."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path]  # fmt: skip

    # --- routing ----------------------------------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo is None:
            return self._error(handler, 404, "EntryNotFound", f"no route {path}", body)
        if repo not in self.repos:
            return self._error(handler, 401, "RepoNotFound", "Repository Not Found", body)
        if repo in self.gated and not handler.headers.get("authorization"):
            return self._error(handler, 401, "GatedRepo", f"Access to model {repo} is restricted.", body)
        revision = (api or resolve).group(3 if api else 2)
        commit = self.commits[repo]
        if revision not in ("main", commit):
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        files = self.repos[repo]
        if api and api.group(2) == "revision":
            return self._json(handler, {"id": repo, "modelId": repo, "sha": commit, "private": False,
                                        "gated": repo in self.gated,
                                        "siblings": [{"rfilename": name} for name in sorted(files)]}, body)  # fmt: skip
        if api:  # tree
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(files.items())]  # fmt: skip
            return self._json(handler, tree, body)
        name = resolve.group(3)
        if name not in files:
            return self._error(handler, 404, "EntryNotFound", f"{name} does not exist", body)
        data = files[name]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _json(handler: BaseHTTPRequestHandler, value, body: bool) -> None:
        data = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str, body: bool) -> None:
        data = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
