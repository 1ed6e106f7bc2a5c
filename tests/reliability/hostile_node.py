"""Helpers of the hostile-input and load scenarios (tests/reliability/test_hostile_*.py,
test_load.py): a whole `twistd -n ooidx` node with a real pydap upstream, a
virtual host of its own on the test broker, a recording TCP socket (to show
that no request reaches a forbidden address), raw HTTP over sockets, and a
snapshot of a directory tree (to show that no file is written outside the
data directory).

Everything listens on loopback only, and every wait is bounded.
"""
from __future__ import annotations

import http.client
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ooidx"))
from dap_upstream import Upstream, make_files  # noqa: E402
from twistd_helpers import Daemon, environment, free_port, write_config  # noqa: E402

from tests.support import vhost as support_vhost  # noqa: E402
from tests.support.node import DaemonNode, http_request  # noqa: E402,F401 - http_request: for the tests

TOKEN = "hostile-token-" + uuid.uuid4().hex


# --------------------------------------------------------------------------- #
# a node


class Node(DaemonNode):
    """A hostile-input test's node: the base's ports, log and process, calls
    to its web port with the node's token by default, the proxy port raw."""

    def __init__(self, daemon: Daemon, web_port: int, proxy_port: int, token: str, data_dir: Path,
                 upstream: Optional[Upstream] = None) -> None:
        super().__init__(daemon, web_port, proxy_port, token)
        self.data_dir = data_dir
        self.upstream = upstream

    def api(self, method: str, path: str, body: Any = None, token: Optional[str] = "default",
            timeout: float = 30, raw: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
        """(status, JSON or bytes) of a request to the web port (token "default": the node's)."""
        return self.request(method, path, body, self.token if token == "default" else token, timeout, raw, headers)

    def call(self, service: str, op: str, timeout: float = 30, **kwargs: Any) -> Tuple[int, Any]:
        return self.api("POST", f"/api/call/{service}/{op}", kwargs, timeout=timeout)

    def ping_all(self, services: List[str], timeout: float = 20) -> Dict[str, Any]:
        """service -> the ping answer's status (200 expected)."""
        return {s: self.call(s, "ping", timeout=timeout)[0] for s in services}

    def proxy_get(self, path: str, timeout: float = 30, method: str = "GET") -> Tuple[int, Dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=timeout)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def register(self, name: str, url: str, check: bool = True) -> Tuple[int, Any]:
        """POST /api/datasets; C{check=False}: no upstream check (an upstream that is not a DAP dataset)."""
        return self.api("POST", "/api/datasets", {"name": name, "url": url, **({} if check else {"check": False})})


def start_node(tmp: Path, name: str, *, broker: str = "memory://", upstream_port: Optional[int] = None,
               components: Any = None, token: str = TOKEN, extra_security: Optional[Dict[str, Any]] = None,
               prelude: Optional[str] = None, **settings: Any) -> Node:
    """C{prelude}: Python statements run in the daemon before twistd starts
    (twistd_helpers.LAUNCHER), e.g. to start tracemalloc (scripts/soak --tracemalloc)."""
    proxy_port, web_port = free_port(), free_port()
    security: Dict[str, Any] = {"token": token,
                                "allow_hosts": [f"127.0.0.1:{upstream_port}"] if upstream_port else []}
    security.update(extra_security or {})
    env = None
    if broker.startswith("amqp"):
        env = environment(OOIDX_BROKER=broker)
        broker = "amqp://guest@127.0.0.1:5672/"
    if prelude is not None:
        env = env or environment()
        env["OOIDX_TEST_PRELUDE"] = prelude
    settings.setdefault("timeouts", {"shutdown": 3, "rpc": 10})
    data_dir = tmp / f"{name}-data"
    if components is not None:
        settings["components"] = components
    config = write_config(tmp / f"{name}.yaml", node=name, broker=broker, data_dir=str(data_dir),
                          http={"proxy_port": proxy_port, "web_port": web_port}, security=security, **settings)
    daemon = Daemon(config, env=env, launcher=prelude is not None)
    try:
        daemon.wait_log(f"node {name} started", 90)
    except BaseException:
        daemon.kill()
        raise
    return Node(daemon, web_port, proxy_port, token, data_dir)


def stop_node(node: Node) -> Optional[int]:
    node.daemon.terminate()
    try:
        return node.daemon.wait_exit(30)
    finally:
        node.daemon.kill()


def node_fixture(tmp: Path, name: str, **kwargs: Any) -> Iterator[Node]:
    node = start_node(tmp, name, **kwargs)
    try:
        yield node
    finally:
        stop_node(node)


def upstream_in(directory: Path) -> Upstream:
    make_files(directory)
    return Upstream(directory)


# --------------------------------------------------------------------------- #
# a virtual host of one's own on the test broker


def own_vhost(url: str, label: str) -> Tuple[str, Any]:
    """A fresh virtual host on the (local) broker of C{url}; (url, delete).
    Where rabbitmqctl cannot manage the broker: the URL as it is."""
    made = support_vhost.own_vhost(url, label)
    return made if made is not None else (url, lambda: None)


# --------------------------------------------------------------------------- #
# a recording socket


class RecordingSocket:
    """A TCP listener on a loopback address that records every connection
    (and the first bytes sent), answering nothing. Runs in a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, family: int = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.connections: List[Tuple[Any, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(0.3)
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            self.connections.append((addr, data))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> "RecordingSocket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# raw HTTP


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """Send C{data} on a fresh connection; return what comes back: until the
    server closes, or a second of silence after the first bytes (a kept-alive
    connection), or C{timeout}."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, min(deadline - time.monotonic(), 1.0 if out else timeout)))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                if out:  # an answer, then a second of silence: a kept-alive connection
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def status_of(answer: bytes) -> Optional[int]:
    line = answer.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


# --------------------------------------------------------------------------- #
# filesystem snapshot


def snapshot(root: Path, skip: Tuple[Path, ...] = ()) -> Dict[str, Tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under C{root}, leaving out C{skip} trees."""
    out: Dict[str, Tuple[int, int]] = {}
    skip_s = tuple(str(p) for p in skip)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.startswith(skip_s):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not os.path.join(dirpath, d).startswith(skip_s)]
        for f in filenames:
            p = os.path.join(dirpath, f)
            if p.startswith(skip_s):
                continue
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def changed(before: Dict[str, Tuple[int, int]], after: Dict[str, Tuple[int, int]]) -> List[str]:
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
