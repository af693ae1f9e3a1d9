"""A Hugging Face environment for tests: an empty cache under tmp_path, a fake token, and a fake Hub served
on 127.0.0.1, so download and offline code runs for real without leaving the machine.

Fixtures (import them into a test module): ``hf_env`` (offline, empty cache), ``fake_hub`` (online
against a local server; ``fake_hub.point_at(port)`` alone points at a port with nothing behind it) and
``silent_hub`` (a Hub on a dead network: it accepts connections, never answers, and says what was asked).
:func:`network_attempts` records every connection and name lookup the test process starts.

What these observe are events, not durations: a test of "fails fast" asserts which requests were made (one,
or none) and that the error names the timeout that ended the wait.
"""

import contextlib
import hashlib
import http.server
import json
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from huggingface_hub.utils import close_session

REPO = "t2ance/APE-data"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAKE_TOKEN = "hf_FAKEtokenThatMustNeverBePrinted0123"


@pytest.fixture
def hf_env(tmp_path, monkeypatch) -> Path:
    """An empty HF cache under tmp_path, offline, a fake token. huggingface_hub reads its environment
    once at import, so the constants it uses are patched as well as the variables."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    return cache


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The few Hub routes snapshot_download uses (repo info, tree listing, resolve), serving ``files``;
    or, with ``refuse`` = (status, X-Error-Code), that refusal for every request."""

    files: dict[str, bytes] = {}
    refuse: tuple[int, str] | None = None
    requests: list[tuple[str, str]] = []  # (path, Authorization header)

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path = urllib.parse.urlparse(self.path).path
        self.requests.append((path, self.headers.get("Authorization", "")))
        api, resolve = f"/api/datasets/{REPO}", f"/datasets/{REPO}/resolve/"
        if self.refuse:
            status, code = self.refuse
            return self._send(status, b'{"error": "restricted"}', {"X-Error-Code": code})
        if path == api or path.startswith(f"{api}/revision/"):
            info = {"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self.files]}
            return self._send(200, json.dumps(info).encode())
        if path.startswith(f"{api}/tree/"):
            tree = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                     "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 130}}
                    for f, d in self.files.items()]
            return self._send(200, json.dumps(tree).encode())
        if path.startswith(resolve):
            data = self.files.get(urllib.parse.unquote(path[len(resolve):].partition("/")[2]))
            if data is not None:
                return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'},
                                  content_type="application/octet-stream")
        return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

    def _send(self, status, body, headers=None, content_type="application/json"):
        self.send_response(status)
        for key, value in {"Content-Type": content_type, **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(hf_env, monkeypatch):
    """Online mode against a local fake Hub: ``fake_hub(files=..., refuse=...)`` starts one and points
    huggingface_hub at it. The shared HTTP client is reset so it sees NO_PROXY; telemetry is off, as
    huggingface_hub would otherwise also fetch its agent registry from the endpoint."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    close_session()
    servers = []

    def point_at(port: int) -> None:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")

    def start(files=None, refuse=None):
        handler = type("Hub", (_FakeHub,), {"files": files or {}, "refuse": refuse, "requests": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        point_at(server.server_address[1])
        return handler

    start.point_at = point_at
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    close_session()


class SilentHub:
    """A port on 127.0.0.1 that accepts connections and never answers: the Hub behind a dead network.
    :meth:`requests` reads what each connection asked for (the client sends its request before it waits)."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._requests: list[str] = []

    def requests(self) -> list[str]:
        """``"GET /path"`` (query dropped) for every connection made so far, in order; ``""`` for a connection
        that sent nothing."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return list(self._requests)
            conn.setblocking(False)
            try:
                head = conn.recv(65536).decode("latin-1")
            except BlockingIOError:
                head = ""
            method, _, target = head.partition("\r\n")[0].partition(" ")
            self._requests.append(f"{method} {target.partition(' ')[0].partition('?')[0]}".strip())
            self._connections.append(conn)  # held open, unanswered, until close()

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._listener.close()


@pytest.fixture
def silent_hub() -> Iterator[SilentHub]:
    """A :class:`SilentHub`; point huggingface_hub at it with ``fake_hub.point_at(silent_hub.port)`` or, in a
    child process, ``HF_ENDPOINT=http://127.0.0.1:<port>``."""
    hub = SilentHub()
    yield hub
    hub.close()


_RECORDERS: list[list[tuple[str, tuple]]] = []
_HOOKED = False  # an audit hook cannot be removed: it is added once, and records only inside the block


def _record_network(event: str, args: tuple) -> None:
    if _RECORDERS and event in ("socket.connect", "socket.getaddrinfo"):
        address = tuple(args[1]) if event == "socket.connect" else tuple(args[:2])
        for recorder in _RECORDERS:
            recorder.append((event, address))


@contextlib.contextmanager
def network_attempts() -> Iterator[list[tuple[str, tuple]]]:
    """Every name lookup (``("socket.getaddrinfo", (host, port))``) and connection attempt
    (``("socket.connect", (host, port))``) this process starts inside the block, from Python's audit events:
    whichever HTTP client makes them, and whether they succeed, are refused or time out."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_record_network)
        _HOOKED = True
    recorder: list[tuple[str, tuple]] = []
    _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDERS.remove(recorder)
