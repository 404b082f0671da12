"""A stand-in for the Hugging Face Hub: a small local HTTP server speaking the part of the
Hub protocol that huggingface_hub's create_repo, upload_file and hf_hub_download use.

It is a stand-in, not a Hub: tests point huggingface_hub at it (``endpoint=``) so the real
client code runs end to end without internet. Endpoints and the headers the client reads:

* ``POST /api/repos/create``                       -> ``{"url"}``; 409 when it exists
* ``POST /api/models/<repo>/preupload/<rev>``      -> every file ``uploadMode: "regular"``
  (the Hub's mode for small files: content travels base64 in the commit)
* ``POST /api/models/<repo>/commit/<rev>``         <- NDJSON header + ``file`` lines
* ``HEAD|GET /<repo>/resolve/<rev>/<path>``        -> ``X-Repo-Commit``, ``ETag``, ``Content-Length``
* ``GET /api/models/<repo>``                       -> ``{"id", "sha", "private"}``

Errors follow the Hub's conventions that huggingface_hub maps to exceptions: a missing or
private repo is 401 + ``X-Error-Code: RepoNotFound``, a missing file 404 +
``X-Error-Code: EntryNotFound``, a bad token 401 + ``X-Error-Message: Invalid credentials
in Authorization header``. Nothing here is LFS or Xet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


@dataclass
class Repo:
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40


@dataclass
class HubState:
    tokens: set[str] = field(default_factory=lambda: {"hf_standin_token"})
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def put_file(self, repo_id: str, path: str, data: bytes, private: bool = False) -> None:
        """Place a file directly, as if committed earlier (e.g. a corrupt upload)."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        repo.files[path] = data
        repo.sha = hashlib.sha1(repo.sha.encode() + path.encode() + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made per server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None = None, message: str | None = None) -> None:
        headers = {}
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self._json(status, {"error": message or code or "error"}, headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _auth(self) -> str | None | bool:
        """The token sent, None when none, False when one was sent but is not known."""
        value = self.headers.get("authorization") or ""
        if not value.lower().startswith("bearer "):
            return None
        token = value.split(" ", 1)[1].strip()
        return token if token in self.state.tokens else False

    def _dispatch(self) -> None:
        self.state.requests.append((self.command, self.path))
        path = self.path.split("?", 1)[0]
        for method, pattern, name in ROUTES:
            m = pattern.match(path)
            if m and method == self.command:
                token = self._auth()
                if token is False:
                    return self._error(401, message="Invalid credentials in Authorization header")
                return getattr(self, f"_{name}")(token, **m.groupdict())
        self._error(404, message=f"stand-in has no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = _dispatch

    def _readable(self, repo_id: str, token: str | None) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and token is None):
            self._error(401, code="RepoNotFound", message="Repository not found")
            return None
        return repo

    def _writable(self, repo_id: str, token: str | None) -> bool:
        if token is None:  # the Hub answers writes without a token as if the repo did not exist
            self._error(401, code="RepoNotFound", message="Repository not found")
            return False
        return self._readable(repo_id, token) is not None

    # -- endpoints -----------------------------------------------------------------------
    def _create(self, token: str | None) -> None:
        payload = json.loads(self._body() or b"{}")
        if token is None:
            return self._error(401, message="You must be authenticated to create a repo")
        repo_id = f"{payload.get('organization') or 'standin-user'}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id})

    def _preupload(self, token: str | None, repo: str, rev: str) -> None:
        payload = json.loads(self._body() or b"{}")
        if not self._writable(repo, token):
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        self._json(200, {"files": files, "commitOid": self.state.repos[repo].sha})

    def _commit(self, token: str | None, repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not self._writable(repo, token):
            return
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return self._error(400, message="commit needs a header line with a summary")
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return self._error(400, message=f"stand-in only takes regular base64 files, got {line['key']}")
            value = line["value"]
            self.state.put_file(repo, value["path"], base64.b64decode(value["content"]))
        sha = self.state.repos[repo].sha
        host = f"http://{self.headers['Host']}"
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{host}/{repo}/commit/{sha}"})

    def _info(self, token: str | None, repo: str, rev: str | None = None) -> None:
        found = self._readable(repo, token)
        if found is not None:
            self._json(200, {"id": repo, "sha": found.sha, "private": found.private,
                             "siblings": [{"rfilename": p} for p in found.files]})

    def _resolve(self, token: str | None, repo: str, rev: str, path: str) -> None:
        found = self._readable(repo, token)
        if found is None:
            return
        if path not in found.files:
            return self._error(404, code="EntryNotFound", message="Entry not found")
        data = found.files[path]
        self._reply(200, data, {
            "X-Repo-Commit": found.sha,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }, content_type="application/octet-stream")


class HubStandIn:
    """``with HubStandIn() as hub: hub.endpoint``: a running stand-in on a free localhost port."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.token = next(iter(self.state.tokens))
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- pytest fixtures (import them into a test module to use them) ------------------------------

try:
    import pytest
except ImportError:  # the stand-in itself does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture()
    def online(monkeypatch):
        """Lift the test suite's HF_HUB_OFFLINE=1 for one test (huggingface_hub reads it per request)."""
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    @pytest.fixture()
    def hub(online):
        with HubStandIn() as standin:
            yield standin


def closed_port_endpoint() -> str:
    """An endpoint on localhost where nothing listens: connections are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
