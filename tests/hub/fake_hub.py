"""A stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1.

This is the one stand-in in the test suite, and only because the real Hub cannot be reached from
the test machines. It implements exactly the endpoints ``huggingface_hub`` (the installed version)
calls for ``HfApi.create_repo(exist_ok=True)`` + ``HfApi.upload_folder`` without Xet, read from its
source (hf_api.py, _commit_api.py, lfs.py):

    POST /api/repos/create                               create_repo (409 when it exists)
    GET  /api/models/{repo}                              repo_info (create_repo's 401/403 fallback)
    POST /api/validate-yaml                              README.md metadata check
    POST /api/models/{repo}/preupload/{rev}              which files go through LFS
    POST /{repo}.git/info/lfs/objects/batch              LFS batch: where to PUT each object
    PUT  /_lfs/{oid}  and  POST /_lfs/verify             LFS basic transfer + verify
    POST /api/models/{repo}/commit/{rev}                 the commit (NDJSON: header, file, lfsFile)

and, so ``from_pretrained("USER/NAME")`` can load what was pushed, the download side:

    GET  /api/models/{repo}/revision/{rev}               repo info with file list (snapshot)
    HEAD/GET /{repo}/resolve/{rev}/{path}                file content with ETag / X-Repo-Commit

Like the Hub, it routes binary files (safetensors, png) through LFS and sends text inline. Set
``force_status`` to make every request fail with that status (401/403 error paths).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt")


@dataclass
class Commit:
    summary: str
    description: str
    files: dict[str, bytes]
    oid: str


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)

    def snapshot(self) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for commit in self.commits:
            files.update(commit.files)
        return files

    @property
    def head(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


class FakeHub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.force_status: int | None = None
        self.signature = hashlib.sha256(token.encode()).hexdigest()[:16]
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        # -- plumbing ---------------------------------------------------------------------------
        def _body(self) -> bytes:
            # httpx streams file uploads with chunked transfer encoding; http.server does not decode it.
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
                  head_only: bool = False) -> None:
            payload = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not head_only:
                self.wfile.write(payload)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": message}, {"X-Error-Message": message})

        def _authorized(self) -> bool:
            if hub.force_status is not None:
                messages = {401: "Invalid credentials in Authorization header",
                            403: "You don't have the rights to create a model under this namespace"}
                self._error(hub.force_status, messages.get(hub.force_status, "forced error"))
                return False
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return False
            return True

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((method, path))
            body = self._body() if method in ("POST", "PUT") else b""
            # LFS PUTs go to a presigned storage URL (S3 on the real Hub): no bearer token, a signature.
            presigned = method == "PUT" and path.startswith("/_lfs/") and f"sig={hub.signature}" in self.path
            if not presigned and not self._authorized():
                return
            routes = [
                ("POST", r"/api/repos/create", self._create_repo),
                ("POST", r"/api/validate-yaml", self._validate_yaml),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
                ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
                ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
                ("POST", r"/_lfs/verify", self._lfs_verify),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
                ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
                ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
                ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ]
            for verb, pattern, action in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    action(body=body, head_only=method == "HEAD", **match.groupdict())
                    return
            self._error(404, f"no route for {method} {path}")

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        # -- upload side ------------------------------------------------------------------------
        def _create_repo(self, body: bytes, **_: Any) -> None:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            with hub.lock:
                if repo_id in hub.repos:
                    self._error(409, "You already created this model repo")
                    return
                hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self, body: bytes, **_: Any) -> None:
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if not match or not isinstance(yaml.safe_load(match.group(1)), dict):
                self._send(400, {"errors": [{"message": "no YAML metadata block"}]})
                return
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, body: bytes, repo: str, **_: Any) -> None:
            if repo not in hub.repos:
                self._error(404, "Repository not found")
                return
            files = []
            for item in json.loads(body)["files"]:
                binary = b"\0" in base64.b64decode(item["sample"])
                lfs = item["path"].endswith(LFS_SUFFIXES) or binary or item["size"] > 10_000_000
                files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": None})
            self._send(200, {"files": files})

        def _lfs_batch(self, body: bytes, repo: str, **_: Any) -> None:
            objects = [{"oid": obj["oid"], "size": obj["size"],
                        "actions": {"upload": {"href": f"{hub.url}/_lfs/{obj['oid']}?sig={hub.signature}"},
                                    "verify": {"href": f"{hub.url}/_lfs/verify"}}}
                       for obj in json.loads(body)["objects"]]
            self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, body: bytes, oid: str, **_: Any) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                self._error(400, "content does not match its sha256 oid")
                return
            with hub.lock:
                hub.lfs[oid] = body
            self._send(200, b"")

        def _lfs_verify(self, body: bytes, **_: Any) -> None:
            obj = json.loads(body)
            ok = len(hub.lfs.get(obj["oid"], b"")) == obj["size"]
            self._send(200 if ok else 404, {} if ok else {"error": "object not uploaded"})

        def _commit(self, body: bytes, repo: str, **_: Any) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"]
            files: dict[str, bytes] = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                        return
                    files[value["path"]] = hub.lfs[value["oid"]]
                else:
                    self._error(422, f"unsupported operation {line['key']}")
                    return
            oid = hashlib.sha1(body).hexdigest()
            with hub.lock:
                hub.repos[repo].commits.append(Commit(header["summary"], header.get("description", ""), files, oid))
            self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

        # -- download side (from_pretrained) ------------------------------------------------------
        def _repo_info(self, repo: str, rev: str | None = None, **_: Any) -> None:
            if repo not in hub.repos:
                self._error(404, "Repository not found")
                return
            data = hub.repos[repo]
            self._send(200, {"id": repo, "modelId": repo, "sha": data.head, "private": data.private,
                             "siblings": [{"rfilename": name} for name in sorted(data.snapshot())]})

        def _resolve(self, repo: str, rev: str, file: str, head_only: bool = False, **_: Any) -> None:
            data = hub.repos.get(repo)
            content = data.snapshot().get(file) if data else None
            if content is None:
                self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head_only)
                return
            etag = f'"{hashlib.sha256(content).hexdigest()}"'
            self._send(200, content, {"ETag": etag, "X-Repo-Commit": data.head}, head_only)

    return Handler
