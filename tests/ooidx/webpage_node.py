"""One whole exchange node for the management page's tests: `twistd -n ooidx`
on memory:// with every component, a DAP upstream on loopback allowed by its
port (security.allow_hosts ["127.0.0.1:PORT"]), the web and proxy ports free
ones. Used by test_browser.py and test_openapi.py."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))
from dap_upstream import Upstream, make_files  # noqa: E402
from twistd_helpers import Daemon, free_port, write_config  # noqa: E402

TOKEN = "page-test-token-" + uuid.uuid4().hex


class Node:
    def __init__(self, daemon: Daemon, web: str, proxy: str, token: str) -> None:
        self.daemon = daemon
        self.web = web
        self.proxy = proxy
        self.token = token

    def describe(self) -> str:
        return self.daemon.describe()

    def api(self, method: str, path: str, body: Any = None, token: Optional[str] = None) -> Tuple[int, Any]:
        """(status, decoded JSON) of a request to the web port."""
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.web + path, data=data, headers=headers, method=method)
        try:
            with _opener().open(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 30) -> Tuple[int, Dict[str, str], bytes]:
    try:
        with _opener().open(url, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def upstream_in(directory: Path) -> Upstream:
    make_files(directory)
    return Upstream(directory)


def run_node(tmp: Path, upstream_port: int, name: str = "page", token: str = TOKEN) -> Iterator[Node]:
    """A generator for a fixture: yields the running node, stops it after."""
    proxy_port, web_port = free_port(), free_port()
    config = write_config(tmp / f"{name}.yaml", node=name, broker="memory://",
                          http={"proxy_port": proxy_port, "web_port": web_port},
                          timeouts={"shutdown": 3, "rpc": 10},
                          security={"token": token, "allow_hosts": [f"127.0.0.1:{upstream_port}"]})
    daemon = Daemon(config)
    try:
        daemon.wait_log(f"node {name} started", 60)
        yield Node(daemon, f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{proxy_port}", token)
    finally:
        daemon.terminate()
        try:
            daemon.wait_exit(20)
        finally:
            daemon.kill()
