"""A stand-in Hugging Face Hub on 127.0.0.1, serving local folders in the hub's URL layout.

Point huggingface_hub at it with HF_ENDPOINT (or endpoint=) and its real download code runs against it:
  GET  /api/models/<org>/<name>/tree/<revision>?recursive=true   the file list (paths, sizes, lfs)
  HEAD /<org>/<name>/resolve/<revision>/<path>                    X-Repo-Commit, ETag, Content-Length
  GET  /<org>/<name>/resolve/<revision>/<path>                    the bytes, with Range support (resumes)
Every request is logged (method, path, Range) so tests can check what was asked; `slow` spreads a file's
transfer over some seconds (time for a Cancel), and `cut_after` makes
the next transfer of a file stop after N bytes (a dropped line), and optionally the file answer 503
until `heal()` (a server gone for good).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_THRESHOLD = 1024  # files from this size on are listed as LFS files, as the hub does for weights


class HubServer:
    """Serve {repo_id: folder} until stop(); `url` is the HF_ENDPOINT to use."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}  # repo path -> bytes to send before dropping the connection
        self.broken: set[str] = set()
        self.stay_down = False
        self.slow: dict[str, float] = {}  # repo path -> seconds to spread its transfer over
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def cut_after(self, path: str, nbytes: int, *, stay_down: bool) -> None:
        """The next transfer of `path` stops after `nbytes`; with `stay_down` the file then answers 503."""
        self.cut[path] = nbytes
        self.stay_down = stay_down

    def heal(self) -> None:
        self.cut.clear()
        self.broken.clear()

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send_json(self, data, status=200):
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if tree:
                    return ("tree", tree.group(1), None)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve:
                    return ("file", resolve.group(1), resolve.group(3))
                return (None, None, None)

            def do_GET(self):
                kind, repo, file = self._route()
                if repo not in hub.repos:
                    return self._send_json({"error": "Repository not found"}, 404)
                if kind == "tree":
                    entries = []
                    for rel, path in hub.files(repo).items():
                        data = path.read_bytes()
                        entry = {"type": "file", "path": rel, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()}
                        if len(data) >= LFS_THRESHOLD:
                            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                            "pointerSize": 134}
                        entries.append(entry)
                    return self._send_json(entries)
                if kind == "file":
                    return self._file(repo, file, body=True)
                return self._send_json({"error": "not found"}, 404)

            def do_HEAD(self):
                kind, repo, file = self._route()
                if kind != "file" or repo not in hub.repos:
                    self.send_response(404)
                    self.end_headers()
                    return
                self._file(repo, file, body=False)

            def _file(self, repo: str, file: str, body: bool):
                path = hub.files(repo).get(file)
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                if file in hub.broken:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                if file in hub.cut:
                    self.wfile.write(data[start:start + hub.cut.pop(file)])
                    self.wfile.flush()
                    if hub.stay_down:
                        hub.broken.add(file)
                    self.close_connection = True
                    return
                if file in hub.slow:  # in 20 pieces, to leave time for a Cancel mid-file
                    piece = max(1, (len(data) - start) // 20)
                    for offset in range(start, len(data), piece):
                        self.wfile.write(data[offset:offset + piece])
                        self.wfile.flush()
                        time.sleep(hub.slow[file] / 20)
                    return
                self.wfile.write(data[start:])

        return Handler
