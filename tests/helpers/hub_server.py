"""A Hub-compatible HTTP server on 127.0.0.1, so tests can run the real `huggingface_hub` client offline.

It implements the slice of the Hub API that `create_repo`, `create_branch`, `upload_folder`,
`hf_hub_download` and `from_pretrained` use, with the same status codes and error headers as the
Hub, so the client raises its normal exceptions (`RepositoryNotFoundError`,
`RevisionNotFoundError`, `RemoteEntryNotFoundError`, `HfHubHTTPError` on 401):

    POST /api/repos/create                          create a repo (409 if it exists)
    GET  /api/whoami-v2                             who the token belongs to
    GET  /api/agent-harnesses                       an empty registry (the client asks for it at start)
    POST /api/validate-yaml                         README.md front matter must be a YAML mapping
    GET  /api/models/{repo}[/revision/{rev}]        repo info (sha, siblings, private)
    GET  /api/models/{repo}/refs                    branches
    GET  /api/models/{repo}/commits/{rev}           history, newest first
    POST /api/models/{repo}/branch/{branch}         create a branch (409 if it exists)
    POST /api/models/{repo}/preupload/{rev}         every file is "regular"; `oid` is the remote blob
    POST /api/models/{repo}/commit/{branch}         NDJSON commit with base64 file contents
    GET  /api/models/{repo}/tree/{rev}[/{path}]     folder listing (`?recursive=true`)
    POST /api/models/{repo}/paths-info/{rev}        info on given paths
    HEAD|GET /{repo}/resolve/{rev}/{path}           file download with X-Repo-Commit, ETag, Content-Length

Why "regular" for every file: the client then sends contents inline in the commit, so no LFS or
Xet transfer service is needed. Why the preupload `oid`: the client compares it with the git
blob hash of the local file and leaves unchanged files out of the commit; when nothing changed it
makes no commit at all. That is how the Hub avoids empty commits, and what lets a test check that
a second push of an unchanged folder uploads nothing.

Storage is git-like: blobs are content-addressed files in a temporary folder (named by their git
blob hash), a commit maps paths to blobs and has a sha1 id and a parent, a branch points at a
commit. Only model repos exist. Every request is recorded in `HubServer.requests` so tests can
assert what the client sent.

    with HubServer(token="hf_test") as hub:      # binds an ephemeral port, serves in a thread
        os.environ["HF_ENDPOINT"] = hub.url      # before huggingface_hub is imported
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_BRANCH = "main"
USER = "test-user"
# What the Hub puts in the first commit of every new repo.
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
# The Hub answers this message for a token it does not know; the client then does NOT treat
# the 401 as "repo not found".
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(content: bytes) -> str:
    """The git blob hash of `content`: what the client computes for a regular file's `_local_oid`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    """An HTTP error answered the way the Hub does: status, `X-Error-Code` and a JSON `error`."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, commit: str | None = None, **extra: object
    ):
        super().__init__(message)
        self.status, self.message, self.error_code, self.commit = status, message, error_code, commit
        self.extra = extra  # more JSON fields of the error body


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, str]  # path in repo -> blob oid
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit sha -> the commit; 404 RevisionNotFound otherwise."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        commit: Commit | None = self.resolve(revision)
        out = []
        while commit is not None:
            out.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return out


class HubStore:
    """Repos, commits and content-addressed blobs; all mutation happens under one lock."""

    def __init__(self, root: Path):
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        path = self.blob_dir / oid
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
        return oid

    def read_blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def blob_size(self, oid: str) -> int:
        return (self.blob_dir / oid).stat().st_size

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def create_repo(self, repo_id: str, private: bool, url: str) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                # The client reads `url` from this 409 too, when called with exist_ok=True.
                raise HubError(409, "You already created this model repo", url=url)
            repo = Repo(repo_id=repo_id, private=private)
            self.repos[repo_id] = repo
            files = {".gitattributes": self.put_blob(INITIAL_GITATTRIBUTES)}
            self._add_commit(repo, DEFAULT_BRANCH, parent=None, title="initial commit", message="", files=files)
            return repo

    def commit(self, repo: Repo, branch: str, title: str, message: str, ops: list[dict]) -> Commit:
        """Apply NDJSON commit operations on top of `branch` and move the branch to the new commit."""
        with self.lock:
            if branch not in repo.branches:
                # The Hub only commits to branches: a commit sha or unknown name is an invalid target.
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            files = dict(head.files)
            for op in ops:
                key, value = op["key"], op["value"]
                path = value["path"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                    files[path] = self.put_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: oid for p, oid in files.items() if not p.startswith(prefix)}
                else:
                    # "lfsFile" would mean the client uploaded to LFS storage, which this server never offers.
                    raise HubError(400, f"Unsupported commit operation {key!r} for {path}")
            return self._add_commit(repo, branch, parent=head.oid, title=title, message=message, files=files)

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(starting_point or DEFAULT_BRANCH).oid

    def _add_commit(
        self, repo: Repo, branch: str, parent: str | None, title: str, message: str, files: dict[str, str]
    ) -> Commit:
        # A commit id hashes its content, its parent and its message, like git's.
        payload = json.dumps([parent, title, message, sorted(files.items()), _now()]).encode()
        commit = Commit(hashlib.sha1(payload).hexdigest(), parent, title, message, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


@dataclass
class RecordedRequest:
    method: str
    path: str
    body_bytes: int


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to a `_route_*` method by regex; any `HubError` becomes a Hub-style error."""

    server: _HubHTTPServer
    protocol_version = "HTTP/1.1"
    REPO = r"(?P<repo>[^/]+/[^/]+)"
    REV = r"(?P<rev>[^/]+)"  # the client URL-quotes revisions into one path segment
    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "repo_info"),
        ("GET", rf"/api/models/{REPO}/refs", "refs"),
        ("GET", rf"/api/models/{REPO}/commits/{REV}", "commits"),
        ("POST", rf"/api/models/{REPO}/branch/{REV}", "create_branch"),
        ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
        ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/models/{REPO}/paths-info/{REV}", "paths_info"),
        ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, format: str, *args) -> None:
        """Silent: the test output should show the client's messages, not an access log."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- plumbing ----------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.hub.requests.append(RecordedRequest(method, url.path, len(self.body)))
        try:
            self._check_credentials()
            for route_method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    getattr(self, f"_route_{name}")(**params)
                    return
            raise HubError(404, f"No such endpoint: {method} {url.path}")
        except HubError as e:
            self._send_error(e)
        except Exception as e:  # a server bug: answer it, or the client would retry a dropped connection
            self._send_error(HubError(500, f"{type(e).__name__}: {e}"))

    def _send_json(self, payload: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    def _send(self, body: bytes, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send_json({"error": error.message, **error.extra}, error.status, headers)

    # -- auth ----------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

    def _check_credentials(self) -> None:
        """A token is optional on reads of public repos, but a token the server does not know is always refused."""
        token = self._token()
        if token is not None and self.server.hub.token is not None and token != self.server.hub.token:
            raise HubError(401, INVALID_CREDENTIALS)

    def _authenticated(self) -> bool:
        return self.server.hub.token is None or self._token() == self.server.hub.token

    def _require_write(self) -> None:
        if not self._authenticated():
            raise HubError(401, "You must be authenticated to write to the Hub")

    def _readable_repo(self, repo_id: str) -> Repo:
        repo = self.server.hub.store.repo(repo_id)
        if repo.private and not self._authenticated():
            # The Hub hides private repos from strangers: they look missing.
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    # -- endpoints -----------------------------------------------------------------------------

    def _route_create_repo(self) -> None:
        self._require_write()
        payload = json.loads(self.body)
        if payload.get("type", "model") != "model":
            raise HubError(400, f"This test server only hosts model repos, not {payload['type']!r}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.hub.url}/{repo_id}"
        self.server.hub.store.create_repo(repo_id, private=payload.get("visibility") == "private", url=url)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _route_whoami(self) -> None:
        if self._token() is None:
            raise HubError(401, INVALID_CREDENTIALS)
        self._send_json({"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})

    def _route_agent_harnesses(self) -> None:
        """The client fetches this registry for its user agent; an empty one means "no agent"."""
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _route_validate_yaml(self) -> None:
        content = json.loads(self.body)["content"]
        match = re.match(r"---\n(.*?)\n---", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            self._send_json({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, 400)
            return
        if not isinstance(metadata, dict):
            self._send_json({"errors": [{"message": "Metadata must be a YAML mapping"}], "warnings": []}, 400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _route_repo_info(self, repo: str, rev: str = DEFAULT_BRANCH) -> None:
        hub_repo = self._readable_repo(repo)
        commit = hub_repo.resolve(rev)
        self._send_json(
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "private": hub_repo.private,
                "createdAt": hub_repo.created_at,
                "lastModified": commit.date,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _route_refs(self, repo: str) -> None:
        hub_repo = self._readable_repo(repo)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in hub_repo.branches.items()
        ]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _route_commits(self, repo: str, rev: str) -> None:
        history = self._readable_repo(repo).history(rev)
        self._send_json(
            [
                {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": USER}], "date": c.date}
                for c in history
            ]
        )

    def _route_create_branch(self, repo: str, rev: str) -> None:
        self._require_write()
        payload = json.loads(self.body or b"{}")
        self.server.hub.store.create_branch(self._readable_repo(repo), rev, payload.get("startingPoint"))
        self._send_json({})

    def _route_preupload(self, repo: str, rev: str) -> None:
        self._require_write()
        files = self._readable_repo(repo).resolve(rev).files
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in json.loads(self.body)["files"]
        ]
        self._send_json({"files": answer})

    def _route_commit(self, repo: str, rev: str) -> None:
        self._require_write()
        hub_repo = self._readable_repo(repo)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and hub_repo.branches.get(rev) != parent:
            raise HubError(412, f"A commit has happened since {parent}: parentCommit is not the head of {rev}")
        description = header.get("description", "")
        commit = self.server.hub.store.commit(hub_repo, rev, header["summary"], description, lines[1:])
        self._send_json(
            {"commitUrl": f"{self.server.hub.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}
        )

    def _route_tree(self, repo: str, rev: str, path: str = "") -> None:
        commit = self._readable_repo(repo).resolve(rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", commit.oid)
        entries: dict[str, dict] = {}
        for file_path, oid in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            # Every folder on the way down is an entry of its own, as on the Hub.
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                folder = prefix + "/".join(parts[:i])
                entries.setdefault(folder, self._folder_entry(folder))
            if recursive or len(parts) == 1:
                entries[file_path] = self._file_entry(file_path, oid)
        self._send_json(list(entries.values()))

    def _route_paths_info(self, repo: str, rev: str) -> None:
        commit = self._readable_repo(repo).resolve(rev)
        form = parse_qs(self.body.decode())
        answer = []
        for path in form.get("paths", []):
            if path in commit.files:
                answer.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                answer.append(self._folder_entry(path))
        self._send_json(answer)

    def _route_resolve(self, repo: str, rev: str, path: str) -> None:
        commit = self._readable_repo(repo).resolve(rev)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        oid = commit.files[path]
        content = self.server.hub.store.read_blob(oid)
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid, "ETag": f'"{oid}"'}
        # Downloads resume with a `Range: bytes=N-` request; honour it like the Hub's CDN does.
        range_match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if range_match and self.command == "GET":
            start = int(range_match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            self._send(content[start:], HTTPStatus.PARTIAL_CONTENT, headers)
            return
        self._send(content, 200, headers)

    def _file_entry(self, path: str, oid: str) -> dict:
        return {"type": "file", "oid": oid, "size": self.server.hub.store.blob_size(oid), "path": path}

    @staticmethod
    def _folder_entry(path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """A Hub-compatible server on 127.0.0.1 (ephemeral port) that serves while the context is open.

    `token`: when set, writes and private reads need `Authorization: Bearer <token>`, and any other
    token is refused with 401 like the Hub refuses a revoked one. `requests` records every request.
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[RecordedRequest] = []
        self._root = Path(tempfile.mkdtemp(prefix="hub_server_"))
        self.store = HubStore(self._root)
        self._httpd = _HubHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        shutil.rmtree(self._root, ignore_errors=True)

    def commit_requests(self) -> list[RecordedRequest]:
        """The commit POSTs received so far: one per commit the client tried to make."""
        return [r for r in self.requests if r.method == "POST" and fnmatch.fnmatch(r.path, "/api/models/*/commit/*")]
