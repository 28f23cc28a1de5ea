"""A Hugging Face Hub stand-in on 127.0.0.1, close enough that the real huggingface_hub client talks to it.

It serves what huggingface_hub 2.4 reads: `GET /api/models/{repo}[/revision/{rev}]` (siblings with size,
blobId and lfs.sha256), `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with X-Repo-Commit, ETag and Range. Regular
files answer directly with `ETag: "<git blob id>"`; LFS files answer 302 with `X-Linked-Etag: "<sha256>"` and
`X-Linked-Size` and are served by a second server standing in for the CDN (another origin, so the client drops
the Authorization header on the way, as it does with the real one). Errors carry X-Error-Code like the Hub's.

Tests can count the body bytes served per file and inject faults into the next GETs of a file:
`("cut", n)` closes the connection after n bytes, `("stall", n)` sends n bytes and then waits for
`release`, `"corrupt"` flips a byte, an int answers with that HTTP status. `api_faults` does the same
for the next model-info answers: `"stall"` never answers (until `release`), `("cut", n)` sends n bytes
of the announced JSON and closes, an int answers with that HTTP status. `tamper` edits the model-info
JSON before it is sent (a Hub that lies about names, commits or blob ids), and `raw` serves fixed bytes
at exact URL paths, whatever the repos hold.

`silent_endpoint()` is a server that accepts connections and never answers; `closed_endpoint()` is an
address where nothing listens.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pdparams", ".model", ".gguf", ".pth")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= 1_000_000


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    token: str | None = None  # when set, the repo is gated: this bearer token is required

    def commit_of(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: Counter[str] = Counter()  # path in the repo -> body bytes sent
        self.gets: list[tuple[str, str | None]] = []  # (path, Range header) of every body GET
        self.faults: dict[str, list] = defaultdict(list)
        self.api_faults: list = []
        self.api_calls = 0  # model-info requests received, faulty ones included
        self.tamper: Callable[[dict], None] | None = None
        self.raw: dict[str, bytes] = {}
        self.release = threading.Event()
        self._by_sha: dict[str, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        self.api = _Server(self, cdn=False)
        self.cdn = _Server(self, cdn=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.api.server_port}"

    def add(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", token: str | None = None) -> str:
        """Publish `files` as a new commit on `branch`; returns the commit hash."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.token = token or repo.token
        h = hashlib.sha1(f"{repo_id}@{branch}#{len(repo.commits)}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        commit = h.hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[branch] = commit
        for path, data in files.items():
            self._by_sha[hashlib.sha256(data).hexdigest()] = (path, data)
        return commit

    def start(self) -> "FakeHub":
        for server in (self.api, self.cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def next_fault(self, path: str):
        with self._lock:
            return self.faults[path].pop(0) if self.faults[path] else None

    def next_api_fault(self):
        with self._lock:
            self.api_calls += 1
            return self.api_faults.pop(0) if self.api_faults else None

    def count(self, path: str, n: int) -> None:
        with self._lock:
            self.served[path] += n


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, cdn: bool):
        self.hub, self.is_cdn = hub, cdn
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # ---- routing ----

    def _route(self, body: bool) -> None:
        hub, path = self.server.hub, unquote(urlsplit(self.path).path)
        try:
            if self.server.is_cdn:
                m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
                if not m or m[1] not in hub._by_sha:
                    return self._error(404, "EntryNotFound")
                name, data = hub._by_sha[m[1]]
                return self._send_file(name, data, {"ETag": f'"{m[1]}"'}, body)
            if path in hub.raw:
                return self._send_file(path, hub.raw[path], {}, body)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path):
                return self._model_info(m[1], m[2] or "main")
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3], body)
            self._error(404, None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _repo(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", "Access to this model is restricted. Please log in.")
                return None
            if auth != f"Bearer {repo.token}":
                self._error(403, "GatedRepo", "Your token has no access to this model.")
                return None
        commit = repo.commit_of(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    def _model_info(self, repo_id: str, rev: str) -> None:
        hub = self.server.hub
        fault = hub.next_api_fault()
        if fault == "stall":
            hub.release.wait(60)
            self.close_connection = True
            return
        if isinstance(fault, int):
            return self._error(fault, None, "injected")
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name, data in sorted(repo.commits[commit].items()):
            sibling = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if is_lfs(name, data):
                sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.token is not None,
                "gated": False, "siblings": siblings}
        if hub.tamper:
            hub.tamper(info)
        payload = json.dumps(info).encode()
        if isinstance(fault, tuple):  # a body cut short of its Content-Length
            self._respond(200, {"Content-Type": "application/json"}, None, length=len(payload))
            self.wfile.write(payload[:fault[1]])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._respond(200, {"Content-Type": "application/json"}, payload)

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}
        if is_lfs(name, data):
            sha = hashlib.sha256(data).hexdigest()
            headers |= {
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"http://127.0.0.1:{self.server.hub.cdn.server_port}/cdn/{sha}",
            }
            return self._respond(302, headers, b"")
        self._send_file(name, data, headers, body)

    # ---- responses ----

    def _send_file(self, name: str, data: bytes, headers: dict, body: bool) -> None:
        hub = self.server.hub
        start, status = 0, 200
        headers = dict(headers, **{"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        if rng := self.headers.get("Range"):
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m[1]) if m else 0
            if start >= len(data):
                return self._respond(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        chunk = data[start:]
        if not body:
            return self._respond(status, headers, b"", length=len(chunk))
        hub.gets.append((name, rng))
        fault = hub.next_fault(name)
        if isinstance(fault, int):
            return self._error(fault, None, "injected")
        if fault == "corrupt":
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        self._respond(status, headers, None, length=len(chunk))
        limit = fault[1] if isinstance(fault, tuple) else len(chunk)
        for i in range(0, min(limit, len(chunk)), 64 * 1024):
            piece = chunk[i:min(i + 64 * 1024, limit)]
            self.wfile.write(piece)
            hub.count(name, len(piece))
        self.wfile.flush()
        if isinstance(fault, tuple):
            if fault[0] == "stall":
                hub.release.wait(60)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, status: int, code: str | None, message: str = "", extra: dict | None = None) -> None:
        headers = dict(extra or {}, **{"Content-Type": "application/json"})
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self._respond(status, headers, json.dumps({"error": message or "Not Found"}).encode())

    def _respond(self, status: int, headers: dict, payload: bytes | None, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload) if payload is not None and length is None else length))
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)


@dataclass
class Silent:
    endpoint: str
    held: list = field(default_factory=list)  # the connections accepted so far, never answered
    requests: list = field(default_factory=list)  # their request lines ("GET /api/models/... HTTP/1.1")

    def asked(self, prefix: str) -> int:
        """How many requests for a path starting with `prefix` came in."""
        return sum(line.split(" ")[1].startswith(prefix) for line in list(self.requests) if line.count(" ") >= 2)


@contextmanager
def silent_endpoint() -> Iterator[Silent]:
    """An address that accepts every connection, reads the request and never sends a byte: a Hub hung behind
    its load balancer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    silent = Silent(f"http://127.0.0.1:{listener.getsockname()[1]}")

    def read_request_line(conn: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n" not in data and (chunk := conn.recv(4096)):
                data += chunk
        except OSError:
            return
        silent.requests.append(data.split(b"\r\n")[0].decode("latin-1"))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            silent.held.append(conn)
            threading.Thread(target=read_request_line, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield silent
    finally:
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        listener.close()
        for conn in silent.held:
            conn.close()


def closed_endpoint() -> str:
    """An address where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
