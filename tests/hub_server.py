"""A small Hugging Face Hub look-alike for tests, spoken to by the unmodified client.

No installable open-source server accepts ``upload_folder``, so this one serves, on loopback
only and from memory, the endpoints huggingface_hub (read from 2.4.0) uses to create a repo,
commit a folder and download it again:

* ``POST /api/repos/create``: ``create_repo``; 409 with the repo url when it exists.
* ``POST /api/validate-yaml``: the README front-matter check ``upload_folder`` runs first.
* ``GET /api/models/{id}[/revision/{rev}]``: ``model_info`` / ``repo_info`` (sha, siblings).
* ``GET /api/models/{id}/tree/{rev}[/{path}]``: ``list_repo_tree`` (``snapshot_download``).
* ``POST /api/models/{id}/preupload/{rev}``: always ``uploadMode: regular`` plus the remote
  oid, so files travel base64 inside the commit and unchanged ones are skipped.
* ``POST /api/models/{id}/commit/{rev}``: the NDJSON commit (header, file, deleted*).
* ``HEAD|GET /{id}/resolve/{rev}/{path}``: ``hf_hub_download`` (ETag, X-Repo-Commit).

Errors carry the ``X-Error-Code`` the client maps to exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). Only model repos ``org/name`` and branch ``main``
exist; any commit sha is a valid revision. A private repo answers ``RepoNotFound`` to a request
without an ``Authorization`` header, as the Hub does; token values are not checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "Commit", "git_blob_oid"]

_OPS = "revision|tree|preupload|commit"
_API = re.compile(
    rf"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/(?P<op>{_OPS})/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CREATED = "2026-01-01T00:00:00.000Z"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # what a new Hub repo holds


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file: the Hub's oid and ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)  # oldest first; the last one is main


class HubServer:
    """In-memory repositories served on ``127.0.0.1:<ephemeral port>`` by a daemon thread.

    Use as a context manager or call :meth:`start` / :meth:`stop`; give :attr:`endpoint` to
    ``HfApi(endpoint=...)`` or, in a subprocess, to ``HF_ENDPOINT``.
    """

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.lock = threading.Lock()
        self.log: list[str] = []  # "METHOD /path" of every request, for assertions
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running: call start() first")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def commits(self, repo_id: str) -> list[Commit]:
        """Every commit of a repo, oldest first (the first is the repo's creation)."""
        return list(self.repos[repo_id].commits)

    def resolve(self, repo_id: str, revision: str = "main") -> Commit | None:
        """The commit ``main`` or a sha names; None for an unknown repo or revision."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        if revision == "main":
            return repo.commits[-1]
        return next((c for c in repo.commits if c.sha == revision), None)

    def _commit(self, repo_id: str, message: str, files: dict[str, bytes]) -> Commit:
        """Append a commit holding exactly ``files``; its sha hashes parent, message and content."""
        commits = self.repos[repo_id].commits
        parent = commits[-1].sha if commits else ""
        listing = "".join(f"{p}\0{git_blob_oid(d)}\0" for p, d in sorted(files.items()))
        sha = hashlib.sha1(f"{len(commits)}\0{parent}\0{message}\0{listing}".encode()).hexdigest()
        commits.append(Commit(sha, message, dict(files)))
        return commits[-1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries a Content-Length
    hub: HubServer
    body: bytes = b""

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    # --- plumbing ---------------------------------------------------------------------
    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, commit: Commit | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit is not None:  # lets the client cache that the file does not exist at this commit
            headers["X-Repo-Commit"] = commit.sha
        self._json(status, {"error": message}, headers)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.log.append(f"{self.command} {url.path}")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # such a body cannot be skipped reliably
            return self._error(411, None, "send a Content-Length")
        # read the body before routing so a keep-alive connection stays in step on every path
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self.command == "POST" and url.path == "/api/repos/create":
            return self._create(json.loads(self.body or b"{}"))
        if self.command == "POST" and url.path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(self.body or b"{}").get("content", ""))
        for pattern, route in ((_API, self._api), (_RESOLVE, self._resolve)):
            if match := pattern.match(url.path):
                groups = {k: None if v is None else unquote(v) for k, v in match.groupdict().items()}
                return route(query=query, **groups)
        self._error(404, None, f"no such endpoint: {self.command} {url.path}")

    do_GET = do_HEAD = do_POST = _dispatch

    def _lookup(self, repo_id: str, rev: str | None) -> Commit | None:
        """The commit to serve, or None once the Hub's 404 (hidden repo, bad revision) is sent."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.headers.get("Authorization") is None):
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = self.hub.resolve(repo_id, rev or "main")
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # --- endpoints ----------------------------------------------------------------------
    def _create(self, payload: dict) -> None:
        org, name = payload.get("organization"), payload.get("name")
        if not org or not name or payload.get("type", "model") != "model":
            return self._error(400, None, "this test server holds model repos named org/name only")
        repo_id = f"{org}/{name}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:  # create_repo(exist_ok=True) reads "url" even from the 409
                return self._json(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = _Repo(private=payload.get("visibility") == "private")
            self.hub._commit(repo_id, "initial commit", {".gitattributes": _GITATTRIBUTES})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, content: str) -> None:
        import yaml  # a dependency of huggingface_hub

        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if meta is not None and not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "the metadata must be a YAML mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _api(self, *, repo: str, op: str | None, rev: str | None, path: str | None, query: dict) -> None:
        if op == "commit" and self.command == "POST":
            return self._commit(repo, rev or "main")
        commit = self._lookup(repo, rev)
        if commit is None:
            return
        if op in (None, "revision") and self.command == "GET":
            siblings = [
                {"rfilename": p, "size": len(d), "blobId": git_blob_oid(d)} for p, d in commit.files.items()
            ]
            info = dict(id=repo, modelId=repo, author=repo.split("/")[0], sha=commit.sha, tags=[], likes=0)
            info.update(private=self.hub.repos[repo].private, createdAt=_CREATED, lastModified=_CREATED)
            return self._json(200, {**info, "siblings": sorted(siblings, key=lambda s: s["rfilename"])})
        if op == "tree" and self.command == "GET":
            recursive = query.get("recursive", "").lower() in ("1", "true")
            return self._tree(commit, (path or "").strip("/"), recursive)
        if op == "preupload" and self.command == "POST":
            modes = []
            for f in json.loads(self.body).get("files", []):
                old = commit.files.get(f["path"])
                oid = None if old is None else git_blob_oid(old)
                modes.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
            return self._json(200, {"files": modes, "commitOid": commit.sha})
        self._error(405, None, f"{self.command} is not supported on /api/models/{repo}/{op}")

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> None:
        base = f"{prefix}/" if prefix else ""
        files, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parents = path[len(base) :].split("/")[:-1]
            if parents and not recursive:
                folders.add(base + parents[0])
                continue
            folders.update(base + "/".join(parents[: i + 1]) for i in range(len(parents)))
            files.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path})
        if prefix and not files and not folders:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist", commit)
        dirs = [{"type": "directory", "oid": git_blob_oid(f.encode()), "path": f} for f in sorted(folders)]
        self._json(200, dirs + files)

    def _commit(self, repo_id: str, rev: str) -> None:
        with self.hub.lock:
            head = self._lookup(repo_id, rev)
            if head is None:
                return
            if rev != "main":
                return self._error(400, None, "this test server only commits to main")
            files, message = dict(head.files), ""
            for line in filter(None, (raw.strip() for raw in self.body.splitlines())):
                item = json.loads(line)
                key, value = item.get("key"), item.get("value", {})
                if key == "header":
                    message, parent = value.get("summary", ""), value.get("parentCommit")
                    if parent and parent != head.sha:
                        return self._error(412, None, f"parent commit {parent} is not the head of main")
                elif key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:
                    return self._error(400, None, f"commit operation {key!r} is not served here (no LFS)")
            commit = self.hub._commit(repo_id, message, files)
        url = f"{self.hub.endpoint}/{repo_id}/commit/{commit.sha}"
        self._json(200, {"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, *, repo: str, rev: str, path: str, query: dict) -> None:
        if self.command == "POST":
            return self._error(405, None, "resolve is read-only")
        commit = self._lookup(repo, rev)
        if commit is None:
            return
        data = commit.files.get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", commit)
        # the client names the cached blob after the ETag and the snapshot after X-Repo-Commit
        headers = {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": commit.sha}
        self._send(200, data, {"Content-Type": "application/octet-stream", **headers})
