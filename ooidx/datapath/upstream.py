"""The fetcher's side of HTTP: Twisted's client with a bound on an upstream's
answer head (L{BoundedClientFactory}: at most C{MAX_UPSTREAM_HEADERS} fields and
C{MAX_UPSTREAM_HEADER_BYTES} bytes, then the request fails, a 502 at the proxy),
and what is read from an answer: its end-to-end headers, its declared length,
a failure made into the data path's errors (L{classify})."""

from __future__ import annotations

from typing import Any, List, Optional
from urllib.parse import quote

from twisted.internet import error as net_error, tcp
from twisted.internet.defer import (CancelledError, Deferred, TimeoutError as DeferredTimeout)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import ResponseFailed, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from ooidx import wire
from ooidx.errors import Forbidden, InvalidName, InvalidURL, UpstreamError, UpstreamTimeout


#: Removed from every answer (RFC 9110 section 7.6.1), with what Connection names.
HOP_BY_HOP = wire.HOP_BY_HOP
USER_AGENT = b"ooidx-fetcher/0.1"
REDIRECTS = (301, 302, 303, 307, 308)
#: Bytes asked of the upstream's socket per read while a body streams (Twisted reads
#: 64 KiB at a time; each read costs a trip through the HTTP client's parser).
UPSTREAM_READ_SIZE = 512 * 1024
#: The most header fields, and bytes of the status line and header fields, an
#: upstream's answer may have: more is refused (Twisted's client has no bound).
MAX_UPSTREAM_HEADERS = 100
MAX_UPSTREAM_HEADER_BYTES = 64 * 1024
#: Characters left as they are when a URL is made ASCII for the request line.
URL_SAFE = "!#$%&'()*+,/:;=?@[]~-._\"<>^`{|}\\"


# --------------------------------------------------------------------------- #
# a bounded answer head


class BoundedClientProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client, with a bound on the answer's head: at most
    C{MAX_UPSTREAM_HEADERS} header fields and C{MAX_UPSTREAM_HEADER_BYTES} bytes
    of status line and fields (each line is at most 16 KiB already). An
    upstream past either gets no further: the request fails (ResponseFailed,
    an UpstreamError for the proxy, 502) and the connection is dropped."""

    def request(self, request: Any) -> Deferred:
        d = super().request(request)
        parser = self._parser
        if parser is not None:
            bound_head(parser)
        return d


def bound_head(parser: Any) -> None:
    """Count the lines C{parser} takes until its body starts; raise past the bounds."""
    from twisted.web._newclient import BODY

    line_received = parser.lineReceived
    seen = [0, 0]  # lines, bytes

    def lineReceived(line: bytes) -> None:
        if parser.state != BODY:
            seen[0] += 1
            seen[1] += len(line) + 2
            if seen[0] > MAX_UPSTREAM_HEADERS + 2:  # the status line, the fields, the empty line
                raise UpstreamError(f"the answer has more than {MAX_UPSTREAM_HEADERS} header fields")
            if seen[1] > MAX_UPSTREAM_HEADER_BYTES:
                raise UpstreamError(f"the answer's head is over {MAX_UPSTREAM_HEADER_BYTES} bytes")
        line_received(line)

    parser.lineReceived = lineReceived


class BoundedClientFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: Any) -> BoundedClientProtocol:
        return BoundedClientProtocol(self._quiescentCallback)


# --------------------------------------------------------------------------- #
# helpers


def ascii_url(url: str) -> bytes:
    return quote(url, safe=URL_SAFE).encode("ascii")


def discard(response: Any) -> None:
    """Drop a response's body (redirects, 304, refusals) by closing its connection."""

    class Discard(Protocol):
        def connectionMade(self) -> None:
            self.transport.stopProducing()

        def connectionLost(self, reason: Any = None) -> None:
            pass

    response.deliverBody(Discard())


def widen_reads(transport: Any, size: int = UPSTREAM_READ_SIZE) -> None:
    """Have the TCP connection under a response's body read up to C{size} bytes at a
    time (fewer, larger pieces for the pump). Best effort: Twisted's client wraps the
    connection in a producer proxy (and TLS); if its insides have moved, nothing changes."""
    current = getattr(transport, "_producer", transport)
    for _ in range(3):
        if isinstance(current, tcp.Connection):
            if current.bufferSize < size:
                current.bufferSize = size
            return
        current = getattr(current, "transport", None)
        if current is None:
            return


def last_header(headers: Headers, name: bytes) -> Optional[str]:
    values = headers.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else None


def content_length(headers: Headers) -> Optional[int]:
    value = last_header(headers, b"content-length")
    if value is not None and value.strip().isdigit():
        return int(value.strip())
    return None


def connection_header(response: Any) -> List[bytes]:
    """The response's Connection header values. Twisted's client keeps
    connection headers to itself, off C{response.headers}; the parser has
    them. Best effort: an empty list if Twisted's insides have moved."""
    try:
        protocol = response._transport._producer.protocol
        protocol = getattr(protocol, "_wrappedProtocol", protocol)  # endpoints wrap it
        return list(protocol._parser.connHeaders.getRawHeaders(b"connection") or [])
    except AttributeError:
        return []


def end_to_end(headers: Headers, connection: List[bytes] = ()) -> List[List[str]]:  # type: ignore[assignment]
    """The headers as [name, value] pairs, repeats kept, hop-by-hop ones
    removed, and those the Connection header names."""
    drop = set(HOP_BY_HOP)
    for value in list(headers.getRawHeaders(b"connection") or []) + list(connection):
        drop.update(token.strip().lower() for token in value.decode("latin-1").split(","))
    pairs = []
    for name, values in headers.getAllRawHeaders():
        text = name.decode("latin-1")
        lowered = text.lower()
        if lowered in drop or lowered.startswith("proxy-"):
            continue
        for value in values:
            pairs.append([text, value.decode("latin-1")])
    return pairs


def failure_reason(failure: Failure) -> str:
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        return "; ".join(r.getErrorMessage() or type(r.value).__name__ for r in reasons) or "response failed"
    return failure.getErrorMessage() or failure.type.__name__


def classify(failure: Failure, url: str, timeout: float) -> Exception:
    """The data-path error for a failure before the first byte."""
    if failure.check(Forbidden, InvalidURL, InvalidName, UpstreamError, UpstreamTimeout):
        return failure.value
    if failure.check(DeferredTimeout, net_error.TimeoutError, CancelledError):
        return UpstreamTimeout(f"no answer within {timeout:g} s")
    if failure.check(net_error.ConnectionRefusedError):
        return UpstreamError("connection refused")
    if failure.check(net_error.DNSLookupError):
        return UpstreamError("cannot resolve the host")
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        for r in reasons:
            if r.check(Forbidden, UpstreamError, UpstreamTimeout):
                return r.value
        return UpstreamError(f"no valid answer: {failure_reason(failure)}")
    if failure.check(OSError, net_error.ConnectError, net_error.ConnectionLost):
        return UpstreamError(f"cannot connect: {failure.getErrorMessage() or failure.type.__name__}")
    return UpstreamError(f"{failure.type.__name__}: {failure.getErrorMessage()}"[:300])
