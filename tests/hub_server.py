"""A small stand-in for the Hugging Face Hub HTTP API, served on 127.0.0.1 for the tests.

The real Hub cannot be reached here, so this server answers the calls that the real `huggingface_hub`
client makes to create a repository, commit files (regular uploads, base64 in the NDJSON commit payload)
and download them (`/resolve/` with the ETag and commit headers the client checks). Repositories live in
memory. Run standalone (`python tests/hub_server.py`) it prints its address and serves until killed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[str]] = {}
        self.private: dict[str, bool] = {}
        self.tokens_seen: list[str] = []
        self.requests: list[str] = []  # "METHOD path" of every request, to check when the network was used
        self.lock = threading.Lock()

    def head(self, repo_id: str) -> str:
        return self.commits[repo_id][-1]


def make_handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet in tests
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head_only: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str, head_only: bool = False) -> None:
            body = b"" if head_only else json.dumps({"error": message}).encode()
            self._send(
                status,
                body,
                {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                head_only,
            )

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _record_token(self) -> None:
            state.requests.append(f"{self.command} {urlparse(self.path).path}")
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                state.tokens_seen.append(auth[7:])

        def do_POST(self) -> None:
            self._record_token()
            path = urlparse(self.path).path
            body = self._body()  # read it whole first: unread bytes would corrupt the next keep-alive request
            if path == "/api/repos/create":
                body = json.loads(body)
                repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                with state.lock:
                    if repo_id in state.repos:
                        return self._error(409, "RepoExists", "You already created this model repo")
                    state.repos[repo_id] = {}
                    state.commits[repo_id] = [hashlib.sha1(repo_id.encode()).hexdigest()]
                    state.private[repo_id] = body.get("visibility") == "private" or bool(body.get("private"))
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":  # the Hub checks a README's metadata before a commit
                content = json.loads(body)["content"]
                front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    metadata = yaml.safe_load(front[1]) if front else None
                except yaml.YAMLError as err:
                    return self._json(400, {"error": f"Invalid YAML: {err}"})
                warnings = [] if isinstance(metadata, dict) else [{"message": "empty or missing yaml metadata"}]
                return self._json(200, {"errors": [], "warnings": warnings})
            match = re.fullmatch(r"/api/models/(.+)/branch/([^/]+)", path)
            if match:  # branches are not modelled: every revision reads and writes the one history
                if unquote(match[1]) not in state.repos:
                    return self._error(404, "RepoNotFound", f"Repository {match[1]} not found")
                return (
                    self._error(409, "BranchExists", "Reference already exists")
                    if unquote(match[2]) == "main"
                    else self._json(200, {})
                )
            match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
            if not match:
                return self._error(404, "NotFound", f"no route {path}")
            repo_id, action = unquote(match[1]), match[2]  # one history: the revision is not modelled
            if repo_id not in state.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            with state.lock:
                files = state.repos[repo_id]
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                commit = hashlib.sha1(body + state.head(repo_id).encode()).hexdigest()
                state.commits[repo_id].append(commit)
            return self._json(
                200,
                {
                    "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{commit}",
                    "commitOid": commit,
                    "success": True,
                },
            )

        def _resolve(self, head_only: bool) -> None:
            self._record_token()
            path = urlparse(self.path).path
            match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            if match:
                repo_id, filename = unquote(match[1]), unquote(match[3])
                if repo_id not in state.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head_only)
                data = state.repos[repo_id].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist", head_only)
                headers = {
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "X-Repo-Commit": state.head(repo_id),
                    "Content-Type": "application/octet-stream",
                }
                return self._send(200, data, headers, head_only)
            match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
            if match and unquote(match[1]) in state.repos:
                repo_id = unquote(match[1])
                siblings = [
                    {"rfilename": name, "size": len(data)} for name, data in sorted(state.repos[repo_id].items())
                ]
                return self._json(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": state.head(repo_id),
                        "siblings": siblings,
                        "private": state.private[repo_id],
                        "tags": [],
                    },
                )
            return self._error(404, "RepoNotFound", f"no route {path}", head_only)

        def do_GET(self) -> None:
            self._resolve(head_only=False)

        def do_HEAD(self) -> None:
            self._resolve(head_only=True)

    return Handler


class HubServer:
    """`with HubServer() as hub:` serves on `hub.endpoint` until the block ends."""

    def __init__(self) -> None:
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    with HubServer() as hub:
        print(hub.endpoint, flush=True)
        hub.thread.join()
