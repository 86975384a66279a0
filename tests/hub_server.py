"""A loopback stand-in for the Hugging Face Hub's HTTP API, for tests (HF_ENDPOINT points at it).

It answers what huggingface_hub calls to create a repo, upload small files in one commit and
download them again: POST /api/repos/create, POST /api/validate-yaml (accepts anything),
POST .../preupload/{rev} (every file "regular", so
contents come inline in the commit), POST .../commit/{rev} (NDJSON), GET /api/models/{repo}
(and .../revision/{rev}), HEAD and GET /{repo}/resolve/{rev}/{path}.

Not covered: large-file transfer (LFS / Xet: everything here is uploaded inline), auth and
permissions (any token or none is accepted), the Hub's metadata and model-card validation,
branches other than main, pull requests, and rate limits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []

    def commit(self, repo: str) -> str:
        digest = hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in self.repos[repo].items())).encode()
        )
        self.commits[repo] = digest.hexdigest()
        return self.commits[repo]


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, data, status: int = 200):
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_POST(self):
            hub.requests.append(f"POST {self.path}")
            body = self._body()
            if self.path.startswith("/api/validate-yaml"):  # accepted unread: the Hub's validation is not modelled
                return self._json({"errors": [], "warnings": []})
            if self.path == "/api/repos/create":
                data = json.loads(body)
                repo = (
                    f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                )
                hub.repos.setdefault(repo, {})
                hub.commits.setdefault(repo, "0" * 40)
                return self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
            match = re.fullmatch(r"/api/models/(.+?/.+?)/(preupload|commit)/([^/?]+)", self.path.split("?")[0])
            if not match or match.group(1) not in hub.repos:
                return self._json({"error": "not found"}, 404)
            repo, action = match.group(1), match.group(2)
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    {
                        "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                        "commitOid": hub.commits[repo],
                    }
                )
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    hub.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] not in ("header",):
                    return self._json({"error": f"unsupported commit operation {item['key']}"}, 400)
            oid = hub.commit(repo)
            return self._json(
                {
                    "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                }
            )

        def do_GET(self, head: bool = False):
            hub.requests.append(f"{'HEAD' if head else 'GET'} {self.path}")
            path = self.path.split("?")[0]
            match = re.fullmatch(r"/api/models/(.+?/[^/]+)(?:/revision/[^/]+)?", path)
            if match:
                repo = match.group(1)
                if repo not in hub.repos:
                    return self._json({"error": "Repository not found"}, 404)
                files = [{"rfilename": name, "size": len(data)} for name, data in hub.repos[repo].items()]
                return self._json(
                    {
                        "id": repo,
                        "modelId": repo,
                        "sha": hub.commits[repo],
                        "siblings": files,
                        "private": False,
                        "tags": [],
                        "library_name": "vqar",
                    }
                )
            match = re.fullmatch(r"/(.+?/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match and match.group(1) in hub.repos and match.group(3) in hub.repos[match.group(1)]:
                repo, _, name = match.groups()
                data = hub.repos[repo][name]
                headers = {
                    "X-Repo-Commit": hub.commits[repo],
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                    "Content-Type": "application/octet-stream",
                }
                return self._send(200, data, headers, head=head)
            headers = {"X-Error-Code": "EntryNotFound" if match and match.group(1) in hub.repos else "RepoNotFound"}
            return self._send(404, b"not found", headers, head=head)

        def do_HEAD(self):
            self.do_GET(head=True)

    return Handler


class LoopbackHub:
    """`with LoopbackHub() as hub:` serves on 127.0.0.1; hub.endpoint is the URL for HF_ENDPOINT."""

    def __enter__(self):
        self.state = Hub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
