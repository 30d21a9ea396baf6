"""A local stand-in for the Hugging Face Hub's HTTP API: what creating a repo and committing files calls.

Files the Hub would store in Git LFS (weights: `*.safetensors`, `*.bin`, `*.gguf`, and anything over
10 MB) are answered "lfs" at preupload, as the Hub does. The client then asks the LFS batch endpoint
where to put each object, PUTs its bytes there, asks for verification, and commits a pointer
(`lfsFile`: path, sha256, size). The fake keeps every object it received and refuses a commit that
points at an object it never got, as the Hub does. Other files arrive inline (base64) in the
commit's NDJSON body.

huggingface_hub uploads LFS files through Xet storage when the `hf_xet` package is installed; that
protocol needs the Hub's own storage service, so tests that use this fake set HF_HUB_DISABLE_XET,
and the upload takes the LFS path any Git LFS server speaks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
LFS_MIN_BYTES = 10 * 1024 * 1024


class FakeHub:
    """Records every request; `refuse_with` answers every request with that status (a bad token)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.refuse_with: int | None = None
        self.objects: dict[str, bytes] = {}
        """LFS objects received, by sha256."""
        self.repos: dict[str, dict[str, bytes]] = {}
        """Each repository's files as of its last commit: path -> bytes."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def created(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests if r["path"] == "/api/repos/create"]

    @property
    def commits(self) -> list[list[dict]]:
        return [
            [json.loads(line) for line in r["body"].splitlines()]
            for r in self.requests
            if "/commit/" in r["path"]
        ]

    @property
    def lfs_uploads(self) -> list[str]:
        """The sha256 of each object whose bytes were PUT, in order."""
        return [r["path"].rsplit("/", 1)[-1] for r in self.requests if r["method"] == "PUT"]

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if self.refuse_with:
            return self.refuse_with, {"error": "Invalid credentials in Authorization header"}
        if path == "/api/repos/create":
            repo = json.loads(body)
            self.repos.setdefault(f"{repo['organization']}/{repo['name']}", {})
            return 200, {"url": f"{self.url}/{repo['organization']}/{repo['name']}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return 200, {
                "files": [
                    {"path": f["path"], "uploadMode": self._mode(f["path"], f["size"]), "shouldIgnore": False}
                    for f in files
                ]
            }
        if match := re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            return 200, self._batch(match["repo"], json.loads(body))
        if match := re.fullmatch(r"/lfs-storage/(?P<oid>[0-9a-f]{64})", path):
            if hashlib.sha256(body).hexdigest() != match["oid"]:
                return 400, {"error": "the uploaded bytes do not hash to the object's oid"}
            self.objects[match["oid"]] = body
            return 200, {}
        if re.fullmatch(r"/[^/]+/[^/]+\.git/info/lfs/objects/verify", path):
            claim = json.loads(body)
            stored = self.objects.get(claim["oid"])
            if stored is None or len(stored) != claim["size"]:
                return 404, {"error": f"object {claim['oid']} was not uploaded"}
            return 200, {}
        if match := re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/[^/]+", path):
            return self._commit(match["repo"], body)
        return 404, {"error": f"{method} {path} is not part of the fake hub"}

    def _mode(self, path: str, size: int) -> str:
        return "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES else "regular"

    def _batch(self, repo: str, request: dict) -> dict:
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.objects:  # an object the hub already has needs no upload
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{item['oid']}"},
                    "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _commit(self, repo: str, body: bytes) -> tuple[int, dict]:
        files = dict(self.repos.get(repo, {}))
        for line in body.splitlines():
            entry = json.loads(line)
            value = entry["value"]
            if entry["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif entry["key"] == "lfsFile":
                stored = self.objects.get(value["oid"])
                if stored is None or len(stored) != value["size"]:
                    return 422, {"error": f"{value['path']}: LFS object {value['oid']} not found"}
                files[value["path"]] = stored
        self.repos[repo] = files
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": path,
                        "authorization": self.headers["Authorization"],
                        "body": body,
                    }
                )
                status, payload = hub.answer(self.command, path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0)))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def log_message(self, format, *args) -> None:  # keep pytest's output to the test's own
                pass

        return Handler

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
