"""A loopback HTTP server on 127.0.0.1 that answers like the Hugging Face Hub, plus plain URL files.

Hub routes (what huggingface_hub's ``file_download.py`` reads):
  HEAD/GET ``/{org}/{repo}/resolve/{revision}/{filename}`` -> ``X-Repo-Commit``, ``ETag`` and
  ``X-Linked-Etag`` (quoted sha256, as for LFS files), ``X-Linked-Size``, ``Content-Length``,
  ``Accept-Ranges``; ``Range: bytes=N-`` answers 206 (hf resumes a cut download with it); unknown repos and
  files answer 404 with the Hub's ``X-Error-Code``.
Plain files: GET/HEAD ``/files/<path>``.

Upload routes (what huggingface_hub's ``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` send,
LFS path: tests set HF_HUB_DISABLE_XET=1):
  POST ``/api/repos/create`` (409 when it exists), POST ``/api/validate-yaml``,
  GET ``/api/models/{repo}[/revision/{rev}]`` (repo_info), POST ``/api/models/{repo}/branch/{branch}``,
  POST ``/api/models/{repo}/preupload/{rev}`` (``*.safetensors``/``*.onnx``/``*.bin`` and files over 10 MB
  go through LFS, with the remote oid so unchanged files are skipped),
  POST ``/{repo}.git/info/lfs/objects/batch`` -> upload + verify actions, PUT ``/lfs/{oid}`` (the body's
  sha256 must equal the oid), POST ``/lfs-verify/{oid}``,
  POST ``/api/models/{repo}/commit/{rev}`` (ndjson: header, file, lfsFile, deletedFile; the LFS objects
  must have been uploaded; ``parentCommit`` must be the branch head). A commit is applied whole or not at
  all: the branch moves to a new snapshot only once the whole payload has been read and checked.
``cut["/lfs/<oid>"]`` (or ``cut_uploads``) drops the connection half-way through reading an upload body.

Every request is recorded so tests can assert "no request at all"; faults can be injected per path:
``cut[path] = n`` closes the connection half-way through the body of the next n GETs, ``delay`` slows
bodies down so concurrent clients overlap.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HubServer", "Request"]

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)$")
_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class _Repo:
    """Branches point at commits; each commit is a full snapshot {path: bytes}."""

    branches: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)
    private: bool = False
    log: list[str] = field(default_factory=list)          # commit ids, oldest first

    @classmethod
    def new(cls, repo: str, files: dict[str, bytes] | None = None) -> "_Repo":
        commit = hashlib.sha1(repo.encode()).hexdigest()
        return cls(branches={"main": commit}, snapshots={commit: dict(files or {})}, log=[commit])

    @property
    def commit(self) -> str:
        return self.branches["main"]

    @property
    def files(self) -> dict[str, bytes]:
        return self.snapshots[self.commit]

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.snapshots else None)


def git_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith((".safetensors", ".onnx", ".bin", ".pth", ".pt")) or size > 10 * 1024 * 1024


class HubServer:
    """Start with ``HubServer().start()``; ``url`` is the endpoint (``http://127.0.0.1:<port>``)."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.cut: dict[str, int] = {}
        self.cut_uploads: int = 0                  # drop the next n LFS upload bodies half-way
        self.lfs: dict[str, bytes] = {}            # uploaded LFS objects by sha256
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
            self.cut_uploads = 0
            self.lfs.clear()
            self.delay = 0.0

    def add_hf(self, repo: str, filename: str, data: bytes) -> str:
        """Publish ``data`` as ``repo/filename``; returns the repo's commit hash (40 hex)."""
        with self._lock:
            if repo not in self.repos:
                self.repos[repo] = _Repo.new(repo)
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

    def snapshot(self, repo: str) -> dict | None:
        """Every branch and the files it holds (for "the repo is unchanged" assertions)."""
        with self._lock:
            r = self.repos.get(repo)
            return None if r is None else {b: (c, dict(r.snapshots[c])) for b, c in r.branches.items()}

    def take_cut(self, path: str) -> bool:
        with self._lock:
            if path.startswith("/lfs/") and self.cut_uploads > 0:
                self.cut_uploads -= 1
                return True
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
        if (m := _INFO.match(path)):
            return self._repo_info(m["repo"], m["rev"] or "main")
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
            from urllib.parse import unquote

            commit = repo.resolve(unquote(m["rev"]))
            if commit is None:
                return self._error(404, {"X-Error-Code": "RevisionNotFound",
                                         "X-Error-Message": "Invalid rev id"})
            data = repo.snapshots[commit].get(m["file"])
            if data is None:
                return self._error(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                         "X-Error-Message": "Entry not found"})
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers.update({"X-Repo-Commit": commit, "ETag": etag, "X-Linked-Etag": etag,
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

    # ------------------------------------------------------------------ upload side
    def _body(self, cut: bool = False) -> bytes | None:
        """The request body (Content-Length or chunked); with ``cut``, read half and drop the connection."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
                if cut:
                    break
            data = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length // 2 if cut else length)
        if cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        return data

    def _json(self, code: int, doc, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(doc).encode()
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _repo_info(self, repo_id: str, rev: str) -> None:
        from urllib.parse import unquote

        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        commit = repo.resolve(unquote(rev))
        if commit is None:
            return self._error(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                         "siblings": [{"rfilename": f} for f in sorted(repo.snapshots[commit])]})

    def do_PUT(self) -> None:
        path = self.path.split("?", 1)[0]
        self.hub.record(Request("PUT", path, None))
        if not path.startswith("/lfs/"):
            return self._error(404, {})
        oid = path[len("/lfs/"):]
        data = self._body(cut=self.hub.take_cut(path))
        if data is None:
            return
        if hashlib.sha256(data).hexdigest() != oid:
            return self._json(400, {"error": "sha256 of the body does not match the oid"})
        with self.hub._lock:
            self.hub.lfs[oid] = data
        self._json(200, {})

    def do_POST(self) -> None:
        from urllib.parse import unquote

        path = self.path.split("?", 1)[0]
        self.hub.record(Request("POST", path, None))
        hub = self.hub
        if path == "/api/repos/create":
            doc = json.loads(self._body() or b"{}")
            repo_id = f"{doc['organization']}/{doc['name']}" if doc.get("organization") else f"user/{doc['name']}"
            with hub._lock:
                if repo_id in hub.repos:
                    exists = True
                else:
                    exists = False
                    hub.repos[repo_id] = _Repo.new(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"})
                    hub.repos[repo_id].private = doc.get("visibility") == "private" or bool(doc.get("private"))
            if exists:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if path == "/api/validate-yaml":
            import yaml

            doc = json.loads(self._body() or b"{}")
            text = doc.get("content", "")
            try:
                if text.startswith("---"):
                    yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._json(400, {"error": f"Invalid YAML: {err}"})
            return self._json(200, {"errors": [], "warnings": []})
        if path.startswith("/lfs-verify/"):
            self._body()
            known = path[len("/lfs-verify/"):] in hub.lfs
            return self._json(200 if known else 404, {} if known else {"error": "object not found"})
        if (m := _BATCH.match(path)):
            doc = json.loads(self._body() or b"{}")
            if m["repo"] not in hub.repos:
                return self._error(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            objects = []
            for obj in doc.get("objects", []):
                item = {"oid": obj["oid"], "size": int(obj["size"])}
                if obj["oid"] not in hub.lfs:
                    item["actions"] = {"upload": {"href": f"{hub.url}/lfs/{obj['oid']}"},
                                       "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"}}
                objects.append(item)
            return self._json(200, {"transfer": "basic", "objects": objects})
        m = _API.match(path)
        if not m:
            return self._error(404, {})
        repo = hub.repos.get(m["repo"])
        if hub.take_cut(path):          # e.g. cut["/api/models/o/n/commit/main"]: the commit body, half-read
            self._body(cut=True)
            return
        body = self._body() or b""
        if repo is None:
            return self._error(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        rev = unquote(m["rev"])
        if m["op"] == "branch":
            with hub._lock:
                if rev in repo.branches:
                    return self._json(409, {"error": "Reference already exists"})
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[rev] = repo.resolve(start) or repo.commit
            return self._json(200, {})
        head = repo.branches.get(rev)
        if head is None:
            return self._error(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        if m["op"] == "preupload":
            files = []
            current = repo.snapshots[head]
            for f in json.loads(body).get("files", []):
                lfs = _is_lfs(f["path"], int(f["size"]))
                old = current.get(f["path"])
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_oid(old))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})
            return self._json(200, {"files": files, "commitOid": head})
        # commit: check everything first, then move the branch in one step
        header, changes = None, {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = hub.lfs.get(value["oid"])
                if data is None:
                    return self._json(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                changes[value["path"]] = data
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:
                return self._json(400, {"error": f"unsupported commit operation {key}"})
        if header is None or not header.get("summary"):
            return self._json(400, {"error": "commit header with a summary is required"})
        with hub._lock:
            if repo.branches[rev] != head or (header.get("parentCommit") not in (None, head)):
                return self._json(412, {"error": "A commit has happened since. Please refresh and try again."})
            files = dict(repo.snapshots[head])
            for p, data in changes.items():
                if data is None:
                    files.pop(p, None)
                else:
                    files[p] = data
            commit = hashlib.sha1(head.encode() + json.dumps(header, sort_keys=True).encode()
                                  + b"".join(p.encode() + hashlib.sha256(d or b"").digest()
                                             for p, d in sorted(changes.items()))).hexdigest()
            repo.snapshots[commit] = files
            repo.branches[rev] = commit
            repo.log.append(commit)
        self._json(200, {"commitUrl": f"{hub.url}/{m['repo']}/commit/{commit}", "commitOid": commit,
                         "pullRequestUrl": None})

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
