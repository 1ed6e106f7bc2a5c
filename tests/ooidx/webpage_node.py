"""One whole exchange node for the management page's tests: `twistd -n ooidx`
on memory:// with every component, a DAP upstream on loopback allowed by its
port (security.allow_hosts ["127.0.0.1:PORT"]), the web and proxy ports free
ones. Used by test_browser.py and test_openapi.py."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))
from dap_upstream import Upstream, make_files  # noqa: E402
from twistd_helpers import Daemon, free_port, write_config  # noqa: E402

from tests.support.node import DaemonNode, http_get  # noqa: E402,F401 - http_get: for the tests

TOKEN = "page-test-token-" + uuid.uuid4().hex


class Node(DaemonNode):
    """The page's node: the base's ports, log and process."""

    def api(self, method: str, path: str, body: Any = None, token: Optional[str] = None) -> Tuple[int, Any]:
        """(status, decoded JSON) of a request to the web port."""
        return self.request(method, path, body, token)


def upstream_in(directory: Path) -> Upstream:
    make_files(directory)
    return Upstream(directory)


def run_node(tmp: Path, upstream_port: int, name: str = "page", token: str = TOKEN,
             **settings: Any) -> Iterator[Node]:
    """A generator for a fixture: yields the running node, stops it after.
    C{settings}: more of the config (e.g. C{components}) over these."""
    proxy_port, web_port = free_port(), free_port()
    config = write_config(tmp / f"{name}.yaml", **dict(dict(
                          node=name, broker="memory://",
                          http={"proxy_port": proxy_port, "web_port": web_port},
                          timeouts={"shutdown": 3, "rpc": 10},
                          security={"token": token, "allow_hosts": [f"127.0.0.1:{upstream_port}"]}), **settings))
    daemon = Daemon(config)
    try:
        daemon.wait_log(f"node {name} started", 60)
        yield Node(daemon, web_port, proxy_port, token)
    finally:
        daemon.terminate()
        try:
            daemon.wait_exit(20)
        finally:
            daemon.kill()
