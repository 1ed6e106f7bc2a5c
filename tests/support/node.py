"""A running C{twistd -n ooidx} seen from outside: its HTTP ports, its log,
its process.

One base for the suite's daemon harnesses (tests/reliability/faultlib.py,
tests/reliability/hostile_node.py, tests/ooidx/webpage_node.py): they start
nodes their own way and add what their tests ask of one. The daemon is a
C{twistd_helpers.Daemon} (duck-typed here: C{proc}, C{pid}, C{log()},
C{stderr()}, C{describe()}). HTTP goes straight to 127.0.0.1, never through a
proxy from the environment, and every request has a timeout.
"""
from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple


class DaemonNode:
    """A node process and the addresses of its web and proxy ports."""

    def __init__(self, daemon: Any, web_port: Optional[int], proxy_port: Optional[int],
                 token: Optional[str] = None) -> None:
        self.daemon = daemon
        self.web_port = web_port
        self.proxy_port = proxy_port
        self.token = token

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def alive(self) -> bool:
        return self.daemon.proc.poll() is None

    def log(self) -> str:
        return self.daemon.log()

    def describe(self) -> str:
        return self.daemon.describe()

    def tracebacks(self) -> List[str]:
        """Lines of the log and stderr that show an unhandled error."""
        text = self.daemon.log() + self.daemon.stderr()
        return [line for line in text.splitlines()
                if "Traceback (most recent call last)" in line or "Unhandled error" in line
                or "Unhandled Error" in line]

    def request(self, method: str, path: str, body: Any = None, token: Optional[str] = None,
                timeout: float = 30, raw: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
        """(status, JSON or bytes) of a request to the web port, with C{token}
        as its bearer token if given, C{body} as JSON or C{raw} as it is."""
        h = {"Accept": "application/json", **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        return http_request("127.0.0.1", self.web_port, method, path, data, h, timeout)


def http_request(host: str, port: Optional[int], method: str, path: str, data: Optional[bytes] = None,
                 headers: Optional[Dict[str, str]] = None, timeout: float = 30) -> Tuple[int, Any]:
    """(status, the body decoded as JSON, or bytes when it is not JSON)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body
    finally:
        conn.close()


def _opener(proxy: Optional[str] = None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy} if proxy else {}))


def http_get(url: str, timeout: float = 30, *, proxy: Optional[str] = None,
             method: str = "GET") -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers, body) of a GET (or C{method}), straight or through the
    forward proxy C{proxy}; an HTTP error status is an answer, not an exception."""
    try:
        with _opener(proxy).open(urllib.request.Request(url, method=method), timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def api_call(web: str, token: str, service: str, op: str, **kwargs: Any) -> Any:
    """The result of C{POST WEB/api/call/SERVICE/OP} with C{kwargs} as its JSON
    body and C{token} as the bearer token; an HTTP error raises."""
    request = urllib.request.Request(f"{web}/api/call/{service}/{op}", data=json.dumps(kwargs).encode(),
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"}, method="POST")
    with _opener().open(request, timeout=30) as r:
        return json.loads(r.read())["result"]
