"""Relaying an answer's stream to the HTTP client (docs/data-path.md): the
status (with the standard reason phrase), the headers that may go out
(L{passed_on_headers}), C{Content-Security-Policy: sandbox}, and the body with
backpressure (L{Pump}): the stream waits while the client's transport is
paused, and a client that takes nothing for the proxy's C{stall_timeout} is
cut off. A stream that breaks after the headers ends the connection short of
the declared length (or of the last chunk); before them, the client gets a 502.
"""
from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers
from zope.interface import implementer

from magnet import StreamError, Timeout

from ooidx import wire
from ooidx.datapath.hot import HOT_ENTRY_BYTES
from ooidx.datapath.proxy_url import ProxyError, printable

__all__ = ["ClientGone", "HOP_BY_HOP", "MAX_HEADERS", "MAX_HEADER_BYTES", "Pump", "SANDBOX", "STALL_TIMEOUT",
           "passed_on_headers", "relay"]

#: Headers that concern one connection only; never passed on.
HOP_BY_HOP = wire.HOP_BY_HOP_BYTES
#: For a big body, the client's connection buffers up to this much before it
#: pauses the stream (Twisted's default is 64 KiB, less than one stream chunk:
#: every chunk paused the stream and the socket went idle until the next), and
#: hands the kernel up to STREAM_SEND_LIMIT per send (Twisted's: 128 KiB).
STREAM_WRITE_BUFFER = 1024 * 1024
STREAM_SEND_LIMIT = 1024 * 1024
#: Seconds a client may leave its answer unread (its connection's buffers full)
#: before it is cut off (components.proxyng.stall_timeout): a client that never
#: reads must not hold the answer's stream, its listen address and the fetch.
STALL_TIMEOUT = 5.0
#: The most header fields (and bytes of them) an answer may pass on: more is a 502.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
#: Never passed on from an upstream: cookies would be set for the proxy's own origin.
_DROPPED_HEADERS = frozenset((b"set-cookie", b"set-cookie2"))
#: Every proxied answer is sandboxed: upstream HTML served from the proxy's origin
#: runs no script there and reads none of its storage.
SANDBOX = b"sandbox"
#: A header field name (RFC 9110 token).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Control characters other than tab, dropped from passed-on header values.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class ClientGone(Exception):
    """The HTTP client went away while its answer was streaming."""


@implementer(IPushProducer)
class Pump:
    """Between a stream and an HTTP response: the sink returns a Deferred
    while the client's transport is paused, which holds the stream back."""

    def __init__(self, request: server.Request, proxy: Any) -> None:
        self.request = request
        self.proxy = proxy
        self.paused = False
        self.stopped = False
        self._waiting: Optional[Deferred] = None
        self._stall: Any = None
        self.written = 0
        #: why the client was cut off, if it was
        self.cut: Optional[str] = None
        #: the body so far, while it may still be held as a hot response
        self.kept: Optional[List[bytes]] = None

    def pauseProducing(self) -> None:
        self.paused = True
        if self._stall is None and not self.stopped:
            self._stall = self.proxy.clock.callLater(self.proxy.stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self.paused = False
        self._disarm()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self._disarm()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(Failure(ClientGone(self.cut or "the client went away")))

    def _disarm(self) -> None:
        stall, self._stall = self._stall, None
        if stall is not None and stall.active():
            stall.cancel()

    def _stalled(self) -> None:
        """The client has read nothing for stall_timeout seconds: cut it off
        (a reset: its unread bytes would hold a graceful close forever)."""
        self._stall = None
        if self.stopped:
            return
        self.cut = f"the client read nothing for {self.proxy.stall_timeout:g} s"
        self.proxy.stalled += 1
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()
        self.stopProducing()

    def sink(self, data: bytes) -> Optional[Deferred]:
        if self.stopped or self.request.finished or self.request.channel is None:
            raise ClientGone(self.cut or "the client went away")
        self.written += len(data)
        self.proxy.relayed += len(data)
        if self.kept is not None:
            if self.written <= HOT_ENTRY_BYTES:
                self.kept.append(data)
            else:
                self.kept = None
        self.request.write(data)
        if self.paused and not self.stopped:
            self._waiting = Deferred()
            return self._waiting
        return None


@inlineCallbacks
def relay(proxy: Any, request: server.Request, stream: Any, method: str, via: Optional[str], started: float,
          url: Optional[str] = None, dataset: Optional[str] = None, end: Any = None) -> Any:
    meta = stream.metadata if isinstance(stream.metadata, dict) else {}
    status = meta.get("status")
    if not isinstance(status, int) or not 100 <= status <= 599:
        stream.deliver(lambda data: None).addErrback(lambda _: None)
        proxy._send_error(request, ProxyError(502, "BadAnswer", f"the answer has no valid status ({status!r})"))
        return
    try:
        grouped = passed_on_headers(meta.get("headers"))
    except ProxyError as e:
        stream.deliver(lambda data: None).addErrback(lambda _: None)
        proxy._send_error(request, e)
        return
    if request.channel is None or request.finished:
        stream.deliver(lambda data: None).addErrback(lambda _: None)  # the client left meanwhile
        return
    # the standard reason phrase: the upstream's is never passed on (it could carry anything)
    request.setResponseCode(status)
    declared: Optional[int] = None
    for value in grouped.get(b"content-length", ()):
        try:
            declared = int(value)
        except ValueError:
            declared = None
    for name, values in grouped.items():
        request.responseHeaders.setRawHeaders(name, values)
    request.responseHeaders.addRawHeader(b"Content-Security-Policy", SANDBOX)
    if declared is None and isinstance(meta.get("length"), int) and status not in (204, 304) \
            and status >= 200:
        declared = meta["length"]
        request.responseHeaders.setRawHeaders(b"content-length", [str(declared).encode("ascii")])
    if grouped.get(b"content-length") and declared is None:
        request.responseHeaders.removeHeader(b"content-length")  # unusable: let it be chunked
    request.setHeader(b"Via", f"1.1 ooidx-{proxy.node}".encode("ascii", "replace"))
    source = meta.get("source") or via
    if source:
        request.setHeader(b"X-Ooidx-Source", str(source).encode("ascii", "replace"))
    if meta.get(wire.SPLICED):
        job = end.splice if end is not None else None
        if job is None or method != "GET" or declared is None:
            stream.deliver(lambda data: None).addErrback(lambda _: None)
            request.responseHeaders = Headers()
            proxy._send_error(request, ProxyError(502, "BadAnswer", "a spliced answer for a client not offered"))
            return
        yield relay_spliced(proxy, request, stream, end, declared, source, started)
        return
    pump = Pump(request, proxy)
    keep = (proxy.hot is not None and url is not None and status == 200 and meta.get("source") == "cache"
            and (declared is None or declared <= HOT_ENTRY_BYTES or method == "HEAD"))
    if keep:
        pump.kept = []
    if method != "HEAD" and (declared is None or declared > HOT_ENTRY_BYTES):
        widen_writes(request)
    request.registerProducer(pump, True)
    ok = False
    try:
        count = yield stream.deliver(pump.sink)
        ok = True
    except (StreamError, Timeout) as e:
        why = str(e)
    except ClientGone as e:
        why = str(e)
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    if ok and method != "HEAD" and declared is not None and count != declared and status not in (204, 304):
        ok = False
        why = f"the body has {count} bytes, {declared} were declared"
    if request.producer is pump:
        if request.channel is not None:
            request.unregisterProducer()
        else:  # the client left: its channel is gone, and the producer with it
            request.producer = None
    elapsed = time.monotonic() - started
    if ok:
        if keep and pump.kept is not None and (method == "HEAD" or declared is not None):
            proxy._hold(request, method, url, dataset, b"".join(pump.kept))
        if not request.finished and request.channel is not None:
            request.finish()
        proxy.log.info("{component} {method} {uri} -> {status} ({bytes} bytes, {source}, {elapsed:.3f} s)",
                      component=proxy.name, method=method, uri=printable(request.uri), status=status,
                      bytes=pump.written, source=source or "?", elapsed=elapsed)
    elif not request.startedWriting and request.channel is not None and not request.finished:
        # nothing went out yet: the client can still be told properly
        request.responseHeaders = Headers()
        proxy._send_error(request, ProxyError(502, "UpstreamError", f"the answer broke: {why}"))
        proxy.log.warn("{component} {method} {uri} -> 502: the answer broke before its body: {why}",
                      component=proxy.name, method=method, uri=printable(request.uri), why=why)
    else:
        if pump.cut is None:
            abort(request)
        proxy.log.warn("{component} {method} {uri}: transfer failed after {bytes} bytes: {why}",
                      component=proxy.name, method=method, uri=printable(request.uri), bytes=pump.written,
                      why=why)



@inlineCallbacks
def relay_spliced(proxy: Any, request: server.Request, stream: Any, end: Any, declared: int,
                  source: Optional[str], started: float) -> Any:
    """The body goes from the upstream's socket to the client's by the kernel
    (L{ooidx.datapath.splice}); here only the head is written and the outcome
    told. The stream brought the start; its end is the fetch's to send, and
    the outcome is known here already, so what still arrives on it is dropped."""
    job = end.splice
    request.write(b"")  # the head, into the transport's buffer: the splice sends it first
    ok = False
    count = 0
    why = ""
    try:
        count = yield job.attach(end, proxy.stall_timeout)
        ok = True
    except Exception as e:  # noqa: BLE001 - every failure cuts the transfer short
        why = f"{type(e).__name__}: {e}"
    stream.deliver(lambda data: None).addErrback(lambda _: None)
    proxy.relayed += job.sent
    if job.stalled:
        proxy.stalled += 1
    if ok and count != declared:
        ok, why = False, f"the body has {count} bytes, {declared} were declared"
    elapsed = time.monotonic() - started
    if ok:
        if not request.finished and request.channel is not None:
            request.finish()
        proxy.log.info("{component} GET {uri} -> 200 ({bytes} bytes, {source}, spliced, {elapsed:.3f} s)",
                       component=proxy.name, uri=printable(request.uri), bytes=job.sent, source=source or "?",
                       elapsed=elapsed)
        return
    if not job.stalled:
        abort(request)
    proxy.log.warn("{component} GET {uri}: spliced transfer failed after {bytes} bytes: {why}",
                   component=proxy.name, uri=printable(request.uri), bytes=job.sent, why=why)


def widen_writes(request: server.Request) -> None:
    """Fewer, larger writes to the client for a big body (see STREAM_WRITE_BUFFER).
    Best effort: only a plain TCP connection is changed (it keeps the setting for
    the rest of its life; memory per connection stays bounded by it)."""
    transport = getattr(request.channel, "transport", None)
    if isinstance(transport, tcp.Connection):
        if transport.bufferSize < STREAM_WRITE_BUFFER:
            transport.bufferSize = STREAM_WRITE_BUFFER
        if transport.SEND_LIMIT < STREAM_SEND_LIMIT:
            transport.SEND_LIMIT = STREAM_SEND_LIMIT


def abort(request: server.Request) -> None:
    """End a response that went wrong after its headers: the connection
    closes without the rest of the body or the final chunk."""
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if transport is not None:
        # FIN, not RST: what was sent stays readable, and the client sees the
        # connection end short of the declared length (or of the last chunk).
        transport.loseConnection()



def passed_on_headers(pairs: Any) -> Dict[bytes, List[bytes]]:
    """An answer's [name, value] pairs as they may go out to the client, by
    lower-case name: hop-by-hop fields, cookies and fields whose name is not a
    token or whose value holds CR or LF are dropped; other control characters
    are taken out of values. More than MAX_HEADERS fields, or MAX_HEADER_BYTES,
    is a L{ProxyError} 502: the answer is refused, not cut short."""
    grouped: Dict[bytes, List[bytes]] = {}
    if not isinstance(pairs, (list, tuple)):
        return grouped
    if len(pairs) > MAX_HEADERS:
        raise ProxyError(502, "BadAnswer", f"the answer has {len(pairs)} header fields (at most {MAX_HEADERS})")
    size = 0
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            continue
        name, value = (str(pair[0]).encode("latin-1", "replace"), str(pair[1]).encode("latin-1", "replace"))
        size += len(name) + len(value) + 4
        if size > MAX_HEADER_BYTES:
            raise ProxyError(502, "BadAnswer", f"the answer's header fields are over {MAX_HEADER_BYTES} bytes")
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in _DROPPED_HEADERS or not _TOKEN.match(name) \
                or b"\n" in value or b"\r" in value:
            continue
        grouped.setdefault(lowered, []).append(_CONTROL.sub(b"", value))
    return grouped
