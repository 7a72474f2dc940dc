"""A loopback HTTP server on 127.0.0.1 that answers like the Hugging Face Hub, plus plain URL files.

Hub routes (what huggingface_hub's ``file_download.py`` reads):
  HEAD/GET ``/{org}/{repo}/resolve/{revision}/{filename}`` -> ``X-Repo-Commit``, ``ETag`` and
  ``X-Linked-Etag`` (quoted sha256, as for LFS files), ``X-Linked-Size``, ``Content-Length``,
  ``Accept-Ranges``; ``Range: bytes=N-`` answers 206 (hf resumes a cut download with it); unknown repos and
  files answer 404 with the Hub's ``X-Error-Code``.
Plain files: GET/HEAD ``/files/<path>``.

Every request is recorded so tests can assert "no request at all"; faults can be injected per path:
``cut[path] = n`` closes the connection half-way through the body of the next n GETs, ``delay`` slows
bodies down so concurrent clients overlap.
"""
from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HubServer", "Request"]

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class _Repo:
    commit: str
    files: dict[str, bytes] = field(default_factory=dict)


class HubServer:
    """Start with ``HubServer().start()``; ``url`` is the endpoint (``http://127.0.0.1:<port>``)."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.cut: dict[str, int] = {}
        self.delay: float = 0.0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ set-up
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="loopback-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "call start() first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.files.clear()
            self.requests.clear()
            self.cut.clear()
            self.delay = 0.0

    def add_hf(self, repo: str, filename: str, data: bytes) -> str:
        """Publish ``data`` as ``repo/filename``; returns the repo's commit hash (40 hex)."""
        with self._lock:
            if repo not in self.repos:
                self.repos[repo] = _Repo(commit=hashlib.sha1(repo.encode()).hexdigest())
            self.repos[repo].files[filename] = data
            return self.repos[repo].commit

    def add_file(self, path: str, data: bytes) -> str:
        """Publish ``data`` at ``/files/<path>``; returns its URL."""
        with self._lock:
            self.files[path] = data
        return f"{self.url}/files/{path}"

    # ------------------------------------------------------------------ queries
    def count(self, contains: str = "", method: str | None = None) -> int:
        """Number of requests whose path contains ``contains`` (and with ``method``, if given)."""
        with self._lock:
            return sum(1 for r in self.requests if contains in r.path and (method is None or r.method == method))

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_cut(self, path: str) -> bool:
        with self._lock:
            if self.cut.get(path, 0) > 0:
                self.cut[path] -= 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.hub.record(Request(self.command, path, self.headers.get("Range")))
        headers: dict[str, str] = {}
        if path.startswith("/files/"):
            data = self.hub.files.get(path[len("/files/"):])
            if data is None:
                return self._error(404, {})
        else:
            m = _RESOLVE.match(path)
            if not m:
                return self._error(404, {})
            repo = self.hub.repos.get(m["repo"])
            if repo is None:
                return self._error(404, {"X-Error-Code": "RepoNotFound",
                                         "X-Error-Message": "Repository not found"})
            if m["rev"] not in ("main", repo.commit):
                return self._error(404, {"X-Error-Code": "RevisionNotFound",
                                         "X-Error-Message": "Invalid rev id"})
            data = repo.files.get(m["file"])
            if data is None:
                return self._error(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit,
                                         "X-Error-Message": "Entry not found"})
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers.update({"X-Repo-Commit": repo.commit, "ETag": etag, "X-Linked-Etag": etag,
                            "X-Linked-Size": str(len(data))})
        start = 0
        status = 200
        wanted = self.headers.get("Range")
        if wanted and body and (rm := re.fullmatch(r"bytes=(\d+)-", wanted.strip())):
            start = int(rm.group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        if self.hub.delay:
            time.sleep(self.hub.delay)
        if self.hub.take_cut(path):
            # Half the body, then a hard close: what a dropped connection looks like to the client.
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(payload)

    def _error(self, code: int, headers: dict[str, str]) -> None:
        message = b'{"error": "not found"}'
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(message)
