"""HTTP peers for the fetcher and URL policy tests, in-process on loopback ports.

- L{make_site}: a twisted.web upstream with the resources the fetcher tests
  need (small body with validators, large generated body, redirects,
  truncated and unterminated bodies, stalls, statuses, repeated headers).
- L{Recorder}: a TCP port that records every connection made to it (and
  answers nothing), to show that no request reaches a forbidden address.
- L{CloseDelimited}: an HTTP/1.0 server whose body ends with the connection.
"""
from __future__ import annotations

from typing import Any, List
from urllib.parse import unquote

from twisted.internet import defer, protocol
from twisted.web import resource, server
from twisted.web.client import ResponseDone

SMALL_BODY = b"hello from upstream\n" * 10
ETAG = b'"v1"'
LAST_MODIFIED = b"Mon, 01 Jan 2024 00:00:00 GMT"
BLOCK = bytes(range(256)) * 256  # 64 KiB, a known pattern


def pattern(size: int) -> bytes:
    """The first C{size} bytes of what /big and /chunked send."""
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


class _Leaf(resource.Resource):
    isLeaf = True


class Small(_Leaf):
    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"etag", ETAG)
        request.setHeader(b"last-modified", LAST_MODIFIED)
        if request.getHeader(b"if-none-match") == ETAG:
            request.setResponseCode(304)
            return b""
        return SMALL_BODY


class _Blocks:
    """A pull producer writing C{size} bytes of the pattern, then finishing."""

    def __init__(self, request: server.Request, size: int) -> None:
        self.request = request
        self.left = size
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.left <= 0:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        block = BLOCK[: min(self.left, len(BLOCK))]
        self.left -= len(block)
        self.request.write(block)

    def stopProducing(self) -> None:
        self.stopped = True


class Big(_Leaf):
    """GET /big?size=N: N bytes with a Content-Length."""

    def render_GET(self, request: server.Request) -> Any:
        size = int(request.args.get(b"size", [b"0"])[0])
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode())
        request.registerProducer(_Blocks(request, size), False)
        return server.NOT_DONE_YET


class Chunked(_Leaf):
    """GET /chunked?size=N: N bytes, chunked (no Content-Length)."""

    def render_GET(self, request: server.Request) -> Any:
        size = int(request.args.get(b"size", [b"0"])[0])
        request.registerProducer(_Blocks(request, size), False)
        return server.NOT_DONE_YET


class Chain(_Leaf):
    """GET /chain/N: a relative redirect to /chain/N-1; /chain/0 is the end."""

    def render_GET(self, request: server.Request) -> bytes:
        n = int(request.postpath[0]) if request.postpath and request.postpath[0] else 0
        if n > 0:
            request.setResponseCode(302)
            request.setHeader(b"location", b"%d" % (n - 1))
            return b"moved"
        return b"end of chain"


class Goto(_Leaf):
    """GET /goto?u=URL[&code=N]: a redirect to URL."""

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(int(request.args.get(b"code", [b"302"])[0]))
        request.setHeader(b"location", unquote(request.args[b"u"][0].decode()).encode())
        return b"moved"


class Truncated(_Leaf):
    """Declares 1000 bytes, sends 100, closes."""

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-length", b"1000")
        request.write(b"t" * 100)
        from twisted.internet import reactor
        reactor.callLater(0.05, request.channel.transport.loseConnection)
        return server.NOT_DONE_YET


class ChunkedCut(_Leaf):
    """Chunked, sends 5000 bytes, closes without the last chunk."""

    def render_GET(self, request: server.Request) -> Any:
        request.write(b"c" * 5000)
        from twisted.internet import reactor
        reactor.callLater(0.05, request.channel.transport.loseConnection)
        return server.NOT_DONE_YET


class Slow(_Leaf):
    """Never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: List[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:
        self.waiting.append(request)
        return server.NOT_DONE_YET


class Stall(_Leaf):
    """Declares 100 bytes, sends 10, then nothing."""

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-length", b"100")
        request.write(b"s" * 10)
        return server.NOT_DONE_YET


class Status(_Leaf):
    """GET /status/N: status N with a small body."""

    def render_GET(self, request: server.Request) -> bytes:
        code = int(request.postpath[0])
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        return b"status %d body" % code


class Repeats(_Leaf):
    """Repeated end-to-end headers, and hop-by-hop ones that must go."""

    def render_GET(self, request: server.Request) -> bytes:
        h = request.responseHeaders
        h.addRawHeader(b"Set-Cookie", b"a=1")
        h.addRawHeader(b"Set-Cookie", b"b=2")
        h.addRawHeader(b"X-Multi", b"one")
        h.addRawHeader(b"X-Multi", b"two")
        h.addRawHeader(b"Keep-Alive", b"timeout=5")
        h.addRawHeader(b"Trailer", b"X-Checksum")
        h.addRawHeader(b"Upgrade", b"h2c")
        h.addRawHeader(b"Proxy-Authenticate", b"Basic")
        h.addRawHeader(b"Proxy-Foo", b"bar")
        h.addRawHeader(b"X-Named-Hop", b"drop me")
        h.addRawHeader(b"Connection", b"X-Named-Hop")
        return b"headers"


class ManyHeaders(_Leaf):
    """?n=N header fields of ?size=S bytes each (an upstream with an unbounded head)."""

    def render_GET(self, request: server.Request) -> bytes:
        n = int(request.args.get(b"n", [b"10"])[0])
        size = int(request.args.get(b"size", [b"8"])[0])
        h = request.responseHeaders
        for i in range(n):
            h.addRawHeader(b"X-H-%d" % i, b"v" * size)
        return b"many"


class EchoHost(_Leaf):
    """The Host header the request came with."""

    def render_GET(self, request: server.Request) -> bytes:
        return request.getHeader(b"host") or b""


def make_site() -> server.Site:
    root = resource.Resource()
    for name, child in [(b"small", Small()), (b"big", Big()), (b"chunked", Chunked()), (b"chain", Chain()),
                        (b"goto", Goto()), (b"truncated", Truncated()), (b"chunked-cut", ChunkedCut()),
                        (b"slow", Slow()), (b"stall", Stall()), (b"status", Status()), (b"repeats", Repeats()),
                        (b"host", EchoHost()), (b"headers", ManyHeaders())]:
        root.putChild(name, child)
    site = server.Site(root)
    site.noisy = False
    site.log = lambda *a, **k: None  # type: ignore[assignment]
    return site


class Recorder(protocol.Factory):
    """Records each connection (and closes it at once)."""

    noisy = False

    def __init__(self) -> None:
        self.connections: List[Any] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.connections.append(addr)
        p = protocol.Protocol()
        p.connectionMade = lambda: p.transport.loseConnection()  # type: ignore[method-assign]
        return p


class _CloseDelimitedProtocol(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not getattr(self, "answered", False):
            self.answered = True
            self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close")
            self.transport.loseConnection()


class CloseDelimited(protocol.Factory):
    noisy = False
    protocol = _CloseDelimitedProtocol


class _Collect(protocol.Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.parts: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response: Any) -> defer.Deferred:
    """A client response's whole body (test sizes only)."""
    d: defer.Deferred = defer.Deferred()
    response.deliverBody(_Collect(d))
    return d
