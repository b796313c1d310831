"""A Hugging Face Hub look-alike on 127.0.0.1, for driving the real ``huggingface_hub`` client in tests.

It implements the endpoints the installed client (huggingface_hub 2.x) calls for what
et_transformers does, with the headers and error codes the client reads:

* ``GET  /api/models/{repo}[/revision/{rev}]``   model info: ``sha`` and ``siblings``
* ``GET  /api/models/{repo}/tree/{rev}``          file listing (``snapshot_download``)
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``       file metadata (``X-Repo-Commit``, ``ETag``) and bytes
* ``POST /api/repos/create``                      create a repository (409 when it exists)
* ``POST /api/models/{repo}/branch/{branch}``     create a branch
* ``POST /api/validate-yaml``                     the README front matter must parse as YAML
* ``POST /api/models/{repo}/preupload/{rev}``     upload modes: every file "regular" (inline base64)
* ``POST /api/models/{repo}/commit/{rev}``        ndjson commit, optionally as a pull request

Repositories live in a folder: blobs by sha256 under ``blobs/``, commits in memory. Writes need
``Authorization: Bearer <token>``; private repositories are invisible without it (404, like the Hub).
:attr:`FakeHub.fail_commit` makes commits fail with HTTP 500, and :attr:`FakeHub.echo_auth_in_errors`
puts the request's Authorization header in error bodies (a leaky server) so tests can check that
tokens are scrubbed from what et_transformers raises. Every request is recorded in
:attr:`FakeHub.requests`; requests to endpoints not listed above land in :attr:`FakeHub.unhandled`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    """One repository: branches -> commit sha, commits -> {path: blob sha256}."""

    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, str]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    prs: int = 0


class FakeHub:
    """The server. Use as a context manager; :attr:`url` goes in ``HF_ENDPOINT``.

    Args:
        root: folder for blobs.
        token: the token writes must carry (and that unlocks private repositories).
    """

    def __init__(self, root: Path, token: str):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.fail_commit: bool = False
        self.echo_auth_in_errors: bool = False
        self.lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- repository state --------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store ``data``; return its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / digest
        if not path.exists():
            path.write_bytes(data)
        return digest

    def blob(self, digest: str) -> bytes:
        """The bytes of a stored blob."""
        return (self.root / "blobs" / digest).read_bytes()

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "seed",
               private: bool = False, deletions: tuple[str, ...] = ()) -> str:
        """Commit ``files`` on top of ``branch`` (creating the repo and branch); return the sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent]) if parent else {}
            for path in deletions:
                tree.pop(path, None)
            tree.update({path: self.put_blob(data) for path, data in files.items()})
            sha = hashlib.sha1(f"{repo_id}|{parent}|{message}|{sorted(tree.items())}|{time.time_ns()}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.messages[sha] = message
            repo.branches[branch] = sha
            return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """``{path: bytes}`` of a repository at a branch or commit."""
        repo = self.repos[repo_id]
        sha = repo.branches.get(revision, revision)
        return {p: self.blob(d) for p, d in repo.commits[sha].items()}

    def downloads(self, repo_id: str) -> list[str]:
        """Paths fetched with GET from ``repo_id`` so far, in order."""
        prefix = f"/{repo_id}/resolve/"
        return [unquote(p.split("?")[0][len(prefix):]).split("/", 1)[1] for m, p in self.requests
                if m == "GET" and p.startswith(prefix)]

    def _resolve(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        return None


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- plumbing ------------------------------------------------------------------------

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {hub.token}"

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool = False, headers=None) -> None:
            headers = {**({"X-Error-Code": code} if code else {}), "X-Error-Message": message[:200], **(headers or {})}
            if hub.echo_auth_in_errors:  # in the body only: HTTP libraries log headers at DEBUG level
                message += f" (request had Authorization: {self.headers.get('Authorization')})"
            self._send(status, {"error": message}, headers, head=head)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                return None
            return repo

        def _record(self) -> tuple[str, dict]:
            hub.requests.append((self.command, self.path))
            parts = urlsplit(self.path)
            return parts.path, parse_qs(parts.query)

        # -- routes ----------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            path, query = self._record()
            with hub.lock:
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return self._model_info(m[1], unquote(m[2] or "main"))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                    return self._tree(m[1], unquote(m[2]), unquote(m[3] or ""))
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve_file(m[1], unquote(m[2]), unquote(m[3]), head)
            hub.unhandled.append((self.command, self.path))
            self._error(404, None, f"fake hub: no route for {self.command} {path}", head=head)

        def do_POST(self) -> None:
            path, query = self._record()
            body = self._body()
            with hub.lock:
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if not self._authorized():
                    return self._error(401, None, "Invalid credentials in Authorization header")
                if path == "/api/repos/create":
                    return self._create_repo(json.loads(body))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
                    return self._create_branch(m[1], unquote(m[2]), json.loads(body or b"{}"))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    return self._preupload(m[1], json.loads(body))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    return self._commit(m[1], unquote(m[2]), body, "1" in query.get("create_pr", []))
            hub.unhandled.append((self.command, self.path))
            self._error(404, None, f"fake hub: no route for POST {path}")

        # -- reads -------------------------------------------------------------------------------

        def _revision(self, repo_id: str, rev: str, head: bool = False):
            """``(repo, commit sha)``, or ``(None, None)`` after answering 404 for either."""
            repo = self._repo(repo_id, head=head)
            if repo is None:
                return None, None
            sha = hub._resolve(repo, rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
                return None, None
            return repo, sha

        def _model_info(self, repo_id: str, rev: str) -> None:
            repo, sha = self._revision(repo_id, rev)
            if repo is None:
                return
            tree = repo.commits[sha]
            siblings = [{"rfilename": p, "size": len(hub.blob(d))} for p, d in sorted(tree.items())]
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": siblings, "tags": [], "lastModified": "2025-01-01T00:00:00.000Z"})

        def _tree(self, repo_id: str, rev: str, under: str) -> None:
            repo, sha = self._revision(repo_id, rev)
            if repo is None:
                return
            prefix = f"{under.rstrip('/')}/" if under else ""
            entries = [
                {"type": "file", "path": p, "size": len(hub.blob(d)), "oid": _git_oid(hub.blob(d))}
                for p, d in sorted(repo.commits[sha].items()) if p.startswith(prefix)
            ]
            self._send(200, entries)

        def _resolve_file(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            repo, sha = self._revision(repo_id, rev, head=head)
            if repo is None:
                return
            digest = repo.commits[sha].get(path)
            if digest is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}", head=head,
                                   headers={"X-Repo-Commit": sha})
            data = hub.blob(digest)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(data)}"', "Content-Type": "application/octet-stream"}
            self._send(200, data, headers, head=head)

        # -- writes ------------------------------------------------------------------------------

        def _validate_yaml(self, payload: dict) -> None:
            import yaml

            content = payload.get("content", "")
            if content.startswith("---"):
                front = content.split("---", 2)[1]
                try:
                    data = yaml.safe_load(front)
                    if not isinstance(data, dict):
                        raise ValueError("front matter is not a mapping")
                except (yaml.YAMLError, ValueError) as e:
                    return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            self._send(200, {"errors": [], "warnings": []})

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in hub.repos:  # the Hub still says where it is (the client reads "url")
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            hub.commit(repo_id, {".gitattributes": b"*.pte filter=lfs diff=lfs merge=lfs -text\n"},
                       message="initial commit")
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, None, f"Reference refs/heads/{branch} already exists")
            start = hub._resolve(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start
            self._send(200, {})

        def _preupload(self, repo_id: str, payload: dict) -> None:
            if self._repo(repo_id) is None:
                return
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in payload["files"]]
            self._send(200, {"files": files})

        def _commit(self, repo_id: str, rev: str, body: bytes, create_pr: bool) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if hub.fail_commit:
                return self._error(500, None, "Internal Error - the commit could not be written")
            if rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            header, files, deletions = {}, {}, []
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    deletions.append(item["value"]["path"])
                else:
                    return self._error(400, None, f"fake hub: unsupported commit operation {item['key']}")
            branch = rev
            pr_url = None
            if create_pr:
                repo.prs += 1
                branch = f"refs/pr/{repo.prs}"
                repo.branches[branch] = repo.branches[rev]
                pr_url = f"{hub.url}/{repo_id}/discussions/{repo.prs}"
            sha = hub.commit(repo_id, files, branch=branch, message=header.get("summary", ""),
                             deletions=tuple(deletions))
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": pr_url})

    return Handler


def _git_oid(data: bytes) -> str:
    """Git's blob id (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
