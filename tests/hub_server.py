"""In-memory Hugging Face Hub speaking enough of the real HTTP protocol for ``huggingface_hub``'s own client.

Tests point the unmodified client at it (``HfApi(endpoint=hub.endpoint)`` or ``HF_ENDPOINT``) so that
``create_repo``, ``upload_folder``, ``hf_hub_download`` and ``timm.create_model("hf-hub:...")`` run their
real request/response code paths with no network.

Routes (model repos only; ``{repo}`` is ``ORG/NAME``, dots allowed):

* ``POST /api/repos/create`` - create a repo (409 if it exists).
* ``POST /api/validate-yaml`` - README.md front-matter check run by ``upload_folder`` (delimiters only).
* ``GET  /api/models/{repo}[/revision/{rev}]`` - repo info (``repo_info``/``model_info``).
* ``POST /api/models/{repo}/preupload/{rev}`` - says "regular" or "lfs" for each file.
* ``POST /{repo}.git/info/lfs/objects/batch`` - git-lfs batch API, always the "basic" transfer.
* ``PUT  /lfs-upload/{ticket}`` - the object upload (a capability URL, like a presigned S3 URL).
* ``POST /{repo}.git/info/lfs/objects/verify`` - confirms an object was stored.
* ``POST /api/models/{repo}/commit/{rev}`` - NDJSON commit (header/file/lfsFile/deletedFile/deletedFolder).
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` - file download with the Hub's metadata headers.

Everything else (e.g. the Xet token endpoints) is a 404. Errors carry ``X-Error-Code``/``X-Error-Message`` so
the client raises ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError`` etc.

Xet: with ``hf_xet`` installed, huggingface_hub (2.4 here) uploads every "lfs" file through Xet (a chunked CAS
protocol, token from ``/api/models/{repo}/xet-write-token/{rev}``) and never calls the LFS batch API; no server
answer switches it to HTTP (the choice is client-side, ``is_xet_available()``). The only server-side
lever is the preupload answer: "regular" files travel base64-encoded inside the commit. So by default
(``lfs=None``) this server says "lfs" only when the client in this process would use plain LFS (``hf_xet``
missing or ``HF_HUB_DISABLE_XET`` set), and "regular" otherwise. ``lfs=True``/``False`` forces it, e.g. for
a client in a subprocess started with ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

# Suffixes the Hub's default .gitattributes routes through LFS (the ones a model repo meets).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".npy", ".npz",
                ".pkl", ".pickle", ".zip", ".gz", ".tar", ".zst", ".parquet", ".arrow")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub also sends any file of 10 MB or more to LFS
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_API, _GIT = r"^/api/models/" + _REPO, r"^/" + _REPO + r"\.git/info/lfs/objects/"
# (method, compiled path regex, handler name, needs write token)
ROUTES: List[Tuple[str, "re.Pattern[str]", str, bool]] = [
    (m, re.compile(p), h, w) for m, p, h, w in [
        ("POST", r"^/api/repos/create$", "_create_repo", True),
        ("POST", r"^/api/validate-yaml$", "_validate_yaml", False),
        ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?$", "_repo_info", False),
        ("POST", _API + r"/preupload/(?P<rev>[^/]+)$", "_preupload", True),
        ("POST", _API + r"/commit/(?P<rev>[^/]+)$", "_commit", True),
        ("POST", _GIT + r"batch$", "_lfs_batch", True),
        ("POST", _GIT + r"verify$", "_lfs_verify", True),
        ("PUT", r"^/lfs-upload/(?P<ticket>\w+)$", "_lfs_put", False),
        ("GET", r"^/" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "_resolve", False),
    ]
]
Response = Tuple[int, Dict[str, str], bytes]


def git_blob_sha1(data: bytes) -> str:
    """Return the git object id of ``data``, which the Hub uses as ETag/oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _client_speaks_lfs() -> bool:
    """Tell whether an in-process huggingface_hub would upload "lfs" files over HTTP (True) or Xet (False)."""
    consts = sys.modules.get("huggingface_hub.constants")  # the flag the client read at import time
    disabled = consts.HF_HUB_DISABLE_XET if consts is not None else (
        os.environ.get("HF_HUB_DISABLE_XET", "").upper() in {"1", "ON", "YES", "TRUE"})
    return bool(disabled) or importlib.util.find_spec("hf_xet") is None


def _error(status: int, message: str, code: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
           **fields: Any) -> Response:
    """Build an error the way the Hub sends it: headers for the client's error mapping, JSON body for the text."""
    hdrs = {"X-Error-Message": message, "Content-Type": "application/json", **(headers or {})}
    if code:
        hdrs["X-Error-Code"] = code
    return status, hdrs, json.dumps({"error": message, **fields}).encode()


def _json(obj: Any, content_type: str = "application/json") -> Response:
    return 200, {"Content-Type": content_type}, json.dumps(obj).encode()


@dataclass
class Commit:
    """One commit: full file snapshot, plus which paths are LFS pointers (served with X-Linked-* headers)."""

    sha: str
    message: str
    files: Dict[str, bytes]
    lfs: Set[str]

    def oid(self, path: str) -> str:
        """Return the Hub's oid of ``path``: sha256 for LFS files, git blob sha1 for regular ones."""
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_sha1(data)


class LoopbackHub:
    """In-memory Hub on ``127.0.0.1`` served from a daemon thread; use as ``with LoopbackHub() as hub:``.

    Attributes:
        token: Bearer token required by write endpoints.
        user: Namespace used when ``create_repo`` is given no organization.
        lfs: Force the preupload answer for binary files ("lfs" if True, "regular" if False), or None for
            auto-detection (see module docstring).
        repos: ``repo_id`` -> commits, oldest first; the last one is ``main``.
        requests: ``(method, path)`` of every request received, query strings stripped.
    """

    def __init__(self, token: str = "hf_test", user: str = "loopback-user", lfs: Optional[bool] = None) -> None:
        self.token, self.user, self.lfs = token, user, lfs
        self.repos: Dict[str, List[Commit]] = {}
        self.requests: List[Tuple[str, str]] = []
        self._objects: Dict[str, bytes] = {}  # LFS store: sha256 oid -> content
        self._tickets: Dict[str, Tuple[str, int]] = {}  # pending upload URLs: ticket -> (oid, size)
        self._lock = threading.Lock()  # handlers run one at a time: state stays consistent, code stays simple
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        """Base URL to give the client, e.g. ``http://127.0.0.1:54321``."""
        assert self._server is not None, "LoopbackHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "LoopbackHub":
        """Bind a free port and serve in a daemon thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        # A short poll interval keeps shutdown() (and so each test's teardown) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()  # type: ignore[union-attr]
            self._server = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        """Return ``{path: content}`` of ``repo_id`` at ``revision`` (branch "main" or a commit sha)."""
        commit = self._commit_at(repo_id, revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return dict(commit.files)

    # ------------------------------------------------------------------ helpers

    def _commit_at(self, key: str, rev: str) -> Optional[Commit]:
        commits = self.repos.get(key, [])
        if rev == "main":
            return commits[-1] if commits else None
        return next((c for c in commits if c.sha == rev), None)

    def _add_commit(self, key: str, message: str, files: Dict[str, bytes], lfs: Set[str]) -> Commit:
        commits = self.repos.setdefault(key, [])
        parent = commits[-1].sha if commits else ""
        oids = sorted((p, git_blob_sha1(d)) for p, d in files.items())
        digest = json.dumps([parent, message, oids, time.time_ns()])  # the clock keeps re-commits distinct
        commit = Commit(hashlib.sha1(digest.encode()).hexdigest(), message, files, lfs)
        commits.append(commit)
        return commit

    def _locate(self, m: Dict[str, str]) -> Tuple[str, Optional[Response]]:
        """Return the repo id of a matched route, and a RepoNotFound error if it does not exist."""
        return m["repo"], None if m["repo"] in self.repos else _error(404, "Repository not found", "RepoNotFound")

    def _url(self, key: str) -> str:
        return f"{self.endpoint}/{key}"

    # ------------------------------------------------------------------ handlers

    # Each handler takes the route's named groups and the request body, and returns (status, headers, body).

    def _create_repo(self, m: Dict[str, str], body: bytes) -> Response:
        """Create ``{organization or user}/{name}``; 409 with the repo url if it exists."""
        req = json.loads(body)
        if req.get("type", "model") != "model":
            return _error(400, "LoopbackHub only hosts model repos")
        repo_id = f"{req.get('organization') or self.user}/{req['name']}"
        if repo_id in self.repos:  # create_repo(exist_ok=True) reads "url" from this 409 body
            return _error(409, "You already created this model repo", url=self._url(repo_id))
        # Like the Hub, a new repo starts with a commit holding .gitattributes.
        self._add_commit(repo_id, "initial commit", {".gitattributes": GITATTRIBUTES}, set())
        return _json({"url": self._url(repo_id), "name": repo_id, "id": repo_id})

    def _validate_yaml(self, m: Dict[str, str], body: bytes) -> Response:
        """Check a README.md's front matter, as ``upload_folder`` asks before hashing anything."""
        lines = json.loads(body)["content"].splitlines()
        # No YAML parser in the standard library: only check that a front matter that opens also closes.
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            return 400, {"Content-Type": "application/json"}, json.dumps(
                {"errors": [{"message": "README.md front matter is not closed by '---'"}], "warnings": []}).encode()
        return _json({"errors": [], "warnings": []})

    def _repo_info(self, m: Dict[str, str], body: bytes) -> Response:
        """Describe the repo at a revision: the fields ``ModelInfo`` needs (id, sha, siblings)."""
        key, err = self._locate(m)
        commit = None if err else self._commit_at(key, unquote(m.get("rev") or "main"))
        if err or commit is None:
            return err or _error(404, "Invalid rev id", "RevisionNotFound")
        return _json({"id": key, "sha": commit.sha, "private": False, "gated": False, "disabled": False,
                      "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _preupload(self, m: Dict[str, str], body: bytes) -> Response:
        """Tell the client, per file, whether to inline it in the commit ("regular") or send it to LFS."""
        key, err = self._locate(m)
        head = None if err else self._commit_at(key, unquote(m["rev"]))
        if err or head is None:
            return err or _error(404, "Invalid rev id", "RevisionNotFound")
        use_lfs = _client_speaks_lfs() if self.lfs is None else self.lfs
        files = []
        for f in json.loads(body)["files"]:
            binary = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_SIZE_THRESHOLD \
                or b"\0" in base64.b64decode(f["sample"])
            # "oid" of the current version lets the client skip unchanged files (no empty commits).
            files.append({"path": f["path"], "uploadMode": "lfs" if use_lfs and binary else "regular",
                          "shouldIgnore": False, "oid": head.oid(f["path"]) if f["path"] in head.files else None})
        return _json({"files": files, "commitOid": head.sha})

    def _lfs_batch(self, m: Dict[str, str], body: bytes) -> Response:
        """git-lfs batch API: hand out one-shot "basic" upload URLs for objects not stored yet."""
        key, err = self._locate(m)
        req = json.loads(body)
        if err or req.get("operation") != "upload":
            return err or _error(400, "Only the upload operation is supported")
        objects = []
        for obj in req["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if oid in self._objects and len(self._objects[oid]) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions => client skips it
                continue
            ticket = secrets.token_hex(16)
            self._tickets[ticket] = (oid, size)
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}"},
                "verify": {"href": f"{self._url(key)}.git/info/lfs/objects/verify"}}})
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     "application/vnd.git-lfs+json")

    def _lfs_put(self, m: Dict[str, str], body: bytes) -> Response:
        """Store an uploaded object; the client sends no token here, the ticket is the credential."""
        if m["ticket"] not in self._tickets:
            return _error(403, "Unknown or used upload URL")
        oid, size = self._tickets[m["ticket"]]
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            return _error(400, f"Uploaded content does not match oid {oid} / size {size}")
        del self._tickets[m["ticket"]]
        self._objects[oid] = body
        return 200, {}, b""

    def _lfs_verify(self, m: Dict[str, str], body: bytes) -> Response:
        """Confirm that an object with this oid and size was stored."""
        req = json.loads(body)
        if req["oid"] not in self._objects or len(self._objects[req["oid"]]) != req["size"]:
            return _error(404, f"LFS object {req['oid']} not found")
        return _json({"success": True})

    def _commit(self, m: Dict[str, str], body: bytes) -> Response:
        """Apply an NDJSON commit on top of main and move main to it."""
        key, err = self._locate(m)
        head = None if err else self._commit_at(key, unquote(m["rev"]))
        if err or head is None or m["rev"] != "main":  # one branch only; pull requests are not modelled
            return err or _error(404, "Invalid rev id (LoopbackHub only commits to main)", "RevisionNotFound")
        files, lfs, message = dict(head.files), set(head.lfs), ""
        for line in filter(None, body.splitlines()):
            op = json.loads(line)
            k, v = op["key"], op["value"]
            if k == "header":
                message = v.get("summary", "")
                if v.get("parentCommit") not in (None, head.sha):
                    return _error(412, "A commit has happened since. Please refresh and try again.")
            elif k == "file":
                raw = v["content"]
                files[v["path"]] = base64.b64decode(raw) if v.get("encoding") == "base64" else raw.encode()
                lfs.discard(v["path"])
            elif k == "lfsFile":
                if v["oid"] not in self._objects or v.get("size", len(self._objects[v["oid"]])) != len(
                        self._objects[v["oid"]]):
                    return _error(400, f"LFS pointer for '{v['path']}' points to a missing object {v['oid']}")
                files[v["path"]] = self._objects[v["oid"]]
                lfs.add(v["path"])
            elif k in ("deletedFile", "deletedFolder"):
                gone = [p for p in files if p == v["path"] or p.startswith(v["path"].rstrip("/") + "/")]
                if not gone:
                    return _error(404, "A file with this name doesn't exist", "EntryNotFound")
                for p in gone:
                    files.pop(p)
                    lfs.discard(p)
            else:
                return _error(400, f"Unknown commit operation {k!r}")
        commit = self._add_commit(key, message, files, lfs)
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": f"{self._url(key)}/commit/{commit.sha}"})

    def _resolve(self, m: Dict[str, str], body: bytes) -> Response:
        """Serve a file (GET) or its metadata (HEAD) with the headers ``hf_hub_download`` caches by."""
        key, err = self._locate(m)
        commit = None if err else self._commit_at(key, unquote(m["rev"]))
        if err or commit is None:
            return err or _error(404, "Invalid rev id", "RevisionNotFound")
        path = unquote(m["path"])
        if path not in commit.files:  # X-Repo-Commit lets the client cache the miss under .no_exist/<sha>/
            return _error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{commit.oid(path)}"',
                   "Content-Type": "application/octet-stream"}
        if path in commit.lfs:  # the Hub tags LFS files so the client caches the blob under its sha256
            headers.update({"X-Linked-Etag": f'"{commit.oid(path)}"', "X-Linked-Size": str(len(data))})
        return 200, headers, data


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the ``LoopbackHub`` handlers; HTTP/1.1 so the client's keep-alive pool works."""

    protocol_version = "HTTP/1.1"

    def _read_body(self) -> bytes:
        # Always drain the body (even on 401), otherwise leftovers corrupt the next keep-alive request.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # streamed file uploads
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # skip trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        body = self._read_body()
        path = urlsplit(self.path).path
        route = "GET" if method == "HEAD" else method
        with hub._lock:
            hub.requests.append((method, path))
            status, headers, payload = _error(404, f"LoopbackHub does not implement {method} {path}")
            for r_method, regex, name, needs_token in ROUTES:
                match = regex.match(path) if r_method == route else None
                if match is None:
                    continue
                if needs_token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    # The Hub's wording: the client maps it to a plain HfHubHTTPError, not RepoNotFound.
                    status, headers, payload = _error(401, "Invalid credentials in Authorization header")
                else:
                    groups = {k: v for k, v in match.groupdict().items() if v is not None}
                    try:
                        status, headers, payload = getattr(hub, name)(groups, body)
                    except (KeyError, TypeError, ValueError) as exc:  # malformed request; 5xx would make it retry
                        status, headers, payload = _error(400, f"Malformed request: {exc!r}")
                break
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass
