"""The web port without a socket: the Web component's own site, spoken to in HTTP/1.1 bytes.

L{EdgeReactor} is the fast tier's threadless clock (tests.fast.core.support)
that is also a L{MemoryReactor}: C{Web.setUp} "listens" through
C{serverFromString} as in production, and the site it built is taken from
C{reactor.tcpServers}. L{Edge.request} opens an in-memory connection to that
site (a L{StringTransport}), writes a request's bytes and moves the clock
until a whole response is back, so every layer the real port has
(TrackingSite's host check, the body-limiting request, HTTPChannel's parsing,
chunked encoding) is in the test; nothing listens, nothing sleeps.

The attribute store's and pub_sub's operations in memory (C{FakeStore},
C{FakePubSub}) are in tests/support/doubles.py.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import magnet

from ooidx.node.bootstrap import declare_topology
from ooidx.web.app import Web

from tests.fast.core.support import _threadless_clock_class, drive, settle, threadless

TOKEN = "operator-token-" + "z" * 24


def edge_reactor(case: SynchronousTestCase) -> Any:
    """A threadless clock (thread pools patched, see L{threadless}) that is also a MemoryReactor."""
    threadless(case)  # patches every ThreadPool to run work at once
    base = _threadless_clock_class()

    class EdgeReactor(base, MemoryReactor):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            MemoryReactor.__init__(self)
            base.__init__(self)

    return EdgeReactor()


class Response:
    """A parsed HTTP response: C{status}, C{headers} (lower-case str -> [str]), C{body}."""

    def __init__(self, status: int, headers: Dict[str, List[str]], body: bytes, complete: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> Tuple[str, str]:
        """C{(type, message)} of a JSON error body, checking its shape."""
        answer = self.json()
        assert set(answer) == {"error"}, answer
        assert set(answer["error"]) == {"type", "message"}, answer
        return answer["error"]["type"], answer["error"]["message"]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def parse_response(data: bytes, head: bool = False) -> Optional[Response]:
    """The response in C{data} so far (C{complete} once all of it is in); None before its headers."""
    if b"\r\n\r\n" not in data:
        return None
    top, rest = data.split(b"\r\n\r\n", 1)
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: Dict[str, List[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if head or status in (204, 304):
        return Response(status, headers, b"", True)
    if "chunked" in ",".join(headers.get("transfer-encoding", [])):
        body, complete = b"", False
        while True:
            size_line, sep, after = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                complete = True
                break
            if len(after) < size + 2:
                body += after[:size]
                break
            body += after[:size]
            rest = after[size + 2:]
        return Response(status, headers, body, complete)
    length = int(headers.get("content-length", ["0"])[0])
    return Response(status, headers, rest[:length], len(rest) >= length)


class Connection:
    """One in-memory client connection to a site."""

    def __init__(self, site: Any, host: str = "127.0.0.1", peer: str = "127.0.0.1") -> None:
        self.transport = StringTransport(hostAddress=IPv4Address("TCP", host, 8080),
                                         peerAddress=IPv4Address("TCP", peer, 40000))
        self.protocol = site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.closed = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def response(self, head: bool = False) -> Optional[Response]:
        return parse_response(self.transport.value(), head)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone("the client hung up")))


def request_bytes(method: str, path: str, body: Optional[bytes], headers: Dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class Edge:
    """A Web component on a memory:// bus (the topology declared) on an
    L{edge_reactor}, and a client that speaks HTTP/1.1 to its site."""

    def __init__(self, case: SynchronousTestCase, *, token: Optional[str] = TOKEN, interface: str = "127.0.0.1",
                 config: Any = None, declare: bool = True, **web_options: Any) -> None:
        self.case = case
        self.clock = edge_reactor(case)
        self.bus = magnet.connect(f"memory://edge-{uuid.uuid4().hex}", self.clock, node="n", rpc_timeout=5)
        self.token = token
        self.declare = declare
        given = dict(node="n", port=0, interface=interface, token=token, clock=self.clock, **web_options)
        self.web = Web.from_config("web", self.bus, config, **given) if config is not None else Web("web", self.bus,
                                                                                                  **given)
        self.site: Any = None
        self.connections: List[Connection] = []

    def wait(self, d: Any, seconds: float = 60.0) -> Any:
        return drive(self.case, self.clock, d, seconds=seconds)

    def start(self, *components: Any, served: Optional[Dict[str, Any]] = None) -> "Edge":
        """Start the bus, serve C{served} (name -> object), start C{components} and the web edge."""

        @defer.inlineCallbacks
        def go() -> Any:
            self.bus.startService()
            yield self.bus.when_connected()
            if self.declare:
                yield declare_topology(self.bus)
            for name, service in (served or {}).items():
                yield self.bus.serve(name, service)
            for component in components:
                yield component.start()
            yield self.web.start()

        self.wait(go())
        self.site = self.clock.tcpServers[-1][1]
        self.case.addCleanup(self.stop, *components)
        return self

    def stop(self, *components: Any) -> None:
        for connection in self.connections:
            connection.close()

        @defer.inlineCallbacks
        def go() -> Any:
            if self.web.running:
                yield self.web.stopService()
            for component in reversed(components):
                if component.running:
                    yield component.stopService()
            yield self.bus.stopService()

        self.wait(go())

    def connect(self, host: str = "127.0.0.1") -> Connection:
        connection = Connection(self.site, host=host)
        self.connections.append(connection)
        return connection

    def open(self, method: str, path: str, body: Any = None, *, token: Optional[str] = "operator",
             headers: Optional[Dict[str, str]] = None, host: str = "127.0.0.1") -> Connection:
        """Send a request on a new connection; the connection (read its response as it comes)."""
        h = {"Host": "127.0.0.1:8080", "Connection": "close"}
        if token == "operator":
            token = self.token
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        h = {k: v for k, v in h.items() if v is not None}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        connection = self.connect(host)
        connection.send(request_bytes(method, path, body, h))
        return connection

    def request(self, method: str, path: str, body: Any = None, *, seconds: float = 30.0, **options: Any) -> Response:
        """The whole response to one request, moving the clock until it is in."""
        connection = self.open(method, path, body, **options)
        head = method == "HEAD"
        settle(self.clock)
        waited = 0.0
        while True:
            response = connection.response(head)
            if response is not None and response.complete:
                connection.close()
                return response
            if waited >= seconds:
                self.case.fail(f"no whole response to {method} {path} in {seconds} s of clock time: "
                               f"{connection.transport.value()[:300]!r}")
            self.clock.advance(0.05)
            settle(self.clock)
            waited += 0.05

    def until(self, predicate: Callable[[], Any], seconds: float = 10.0) -> Any:
        """Move the clock until C{predicate()} is true."""
        settle(self.clock)
        waited = 0.0
        while not predicate():
            if waited >= seconds:
                self.case.fail(f"condition not met within {seconds} s of clock time")
            self.clock.advance(0.01)
            settle(self.clock)
            waited += 0.01
        return predicate()


def sse_events(body: bytes) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The events (C{{"id"?, "data"}}) and comments of a text/event-stream body so far."""
    events: List[Dict[str, Any]] = []
    comments: List[str] = []
    for block in body.split(b"\n\n")[:-1]:
        event: Dict[str, Any] = {}
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("id: "):
                event["id"] = line[4:]
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
        if "data" in event:
            events.append(event)
    return events, comments
