"""What the HTTP edges (the proxy and the web port) share about their sites.

Where an edge listens is a port number or a Twisted endpoint string
(L{ooidx.http.listen}: C{tcp:}, C{tcp6:}, C{ssl:}); L{listen_spec} reads it
from the config and L{listen_on} listens through C{serverFromString}.

A component that listens must be able to stop: stop listening, and close the
connections still open (keep-alive clients, a person's event stream), or a
daemon's stop waits on clients that never hang up.

An edge may stop gracefully instead (L{EdgePort.stop} with a C{drain}
bound; the proxy does, with C{timeouts.shutdown}), as nginx and
twisted.web daemons do on SIGTERM, so that no request is answered by a
silent close:

  1. from then on every request the site reads is answered 503 with
     C{Connection: close} and C{Retry-After} (L{TrackingSite.stopping}),
     whether it came on a keep-alive connection or on a new one;
  2. the port stops listening (a new client is refused, which it sees at
     once), after accepting what the kernel had already accepted for it:
     its backlog of connections is taken in just before the socket closes,
     so none of them gets a reset, and their requests are answered 503;
  3. idle keep-alive connections are closed between requests (a client
     sees its idle connection closed, which HTTP clients retry: nothing it
     sent is swallowed); a connection with a request in progress is marked
     to close once that request is answered (C{Connection: close}); one that
     has not sent its first request yet (just accepted: the request may be in
     the kernel's buffers, unread) is given a moment for it, then answered 503;
  4. requests already read are served while they finish within C{drain}
     seconds; past it, one whose answer has not started is answered 503
     (C{Connection: close}, C{Retry-After}), one whose answer has started is
     cut (the client sees a failed transfer, never a clean short body), and
     every connection still open is closed.

An edge whose URLs may carry a credential in the query (the web port's
stream tickets, C{?ticket=}) logs its requests with
L{masking_log_formatter}, so the access log shows C{ticket=***}.

DNS rebinding: a page on C{evil.example} whose name then resolves to
127.0.0.1 (or to the exchange's private address) makes the browser send the
page's requests to the exchange as if it were C{evil.example}, past the
same-origin rule. Every request to a L{TrackingSite} in origin form (a path,
as every browser request to a server is) must name in C{Host} a name this
edge answers for (L{HostAllowList}: loopback, the address the connection
came in on, and C{http.allowed_hosts}); any other gets 421 with a JSON
error saying so. A forward-proxy request (absolute form, C{GET http://...})
names its upstream in C{Host} and is not a browser's request to this edge:
it is left to the proxy.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, FrozenSet, Iterable, Optional, Tuple
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from ooidx.http.answers import HTTPError, error_answer, prepare
from ooidx.http.listen import LOOPBACK_NAMES, ListenSpec, parse_listen

_log = Logger()

#: Query parameters whose values never reach a log line.
SECRET_QUERY = (b"ticket",)
_QUERY_SEPARATORS = re.compile(rb"([&;])")


def _normal_host(name: str) -> str:
    """A host name or address as compared: lower case, no trailing dot, an IP address in its short form."""
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


def host_of(header: bytes) -> Optional[str]:
    """The host of a C{Host} header (no port), normalised; None if it is not one."""
    try:
        text = header.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not text or any(c.isspace() or c in "/@?#" for c in text):
        return None
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return _normal_host(inside)
    if text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    return _normal_host(text)


class HostAllowList:
    """The names an edge answers for: loopback (C{localhost}, 127.0.0.1,
    ::1), the address a connection came in on (so a port bound to one
    interface answers for it, and one bound to every interface for the
    address the client reached), and the C{names} given (C{http.allowed_hosts}:
    host names, C{*.domain} for its subdomains, addresses)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        exact, suffixes = set(), set()
        for name in names:
            if name.startswith("*."):
                suffixes.add("." + _normal_host(name[2:]))
            else:
                exact.add(_normal_host(name))
        self.exact: FrozenSet[str] = frozenset(exact | {_normal_host(n) for n in LOOPBACK_NAMES})
        self.suffixes: Tuple[str, ...] = tuple(sorted(suffixes))

    def allows(self, host: Optional[str], local: Optional[str] = None) -> bool:
        if not host:
            return False
        if host in self.exact or (local and host == _normal_host(local)):
            return True
        return any(host.endswith(suffix) for suffix in self.suffixes)


class _Misdirected(Resource):
    """The answer to a request for a host this edge does not answer for (421, JSON)."""

    isLeaf = True

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def render(self, request: server.Request) -> bytes:
        return prepare(request, error_answer(HTTPError(
            421, "MisdirectedRequest", f"this server does not answer for the host {self.host!r} (a DNS rebinding "
            "page?); the names it answers for besides its own addresses and localhost are set in "
            "http.allowed_hosts")))


#: Retry-After (seconds) of the 503 a stopping edge answers with.
STOPPING_RETRY_AFTER = 5
#: Seconds a connection with no request yet (accepted just before the stop, or
#: from the port's backlog) is given to send it, when the edge stops; the
#: request is then answered 503; a connection that sends none is closed.
FRESH_GRACE = 1.0
#: Seconds between the looks of a graceful stop at the connections it waits for.
DRAIN_TICK = 0.05


def stopping_error() -> HTTPError:
    """The 503 of a request a stopping edge does not serve."""
    return HTTPError(503, "ShuttingDown", "this node is stopping; retry in a few seconds (another node, or "
                     "this one once restarted, will answer)",
                     {b"Retry-After": str(STOPPING_RETRY_AFTER).encode("ascii"), b"Connection": b"close"})


def _inner(channel: Any) -> Any:
    """The HTTPChannel of a Site's protocol (Site builds a _GenericHTTPChannelProtocol,
    a wrapper whose transport and requests are its wrapped channel's)."""
    return getattr(channel, "_channel", channel)


def _requests(channel: Any) -> list:
    """The requests read (or being read) on C{channel} and not yet answered whole."""
    return list(getattr(_inner(channel), "requests", None) or ())


def _no_keep_alive(request: Any) -> None:
    """The connection of C{request} closes once it is answered, and says so."""
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False
    if not getattr(request, "startedWriting", True):
        request.setHeader(b"Connection", b"close")


class _ShuttingDown(Resource):
    """The answer to a request read after the edge began to stop: 503, Connection: close, Retry-After."""

    isLeaf = True

    def __init__(self, site: "TrackingSite") -> None:
        super().__init__()
        self.site = site

    def render(self, request: server.Request) -> bytes:
        self.site.refused_stopping += 1
        _no_keep_alive(request)
        error = stopping_error()
        if self.site.stopping_answer is not None:
            return self.site.stopping_answer(request, error)
        return prepare(request, error_answer(error))


def _raw_503(request: Any) -> bytes:
    """A whole 503 (Connection: close, Retry-After) in bytes, for a request whose
    answer has not started and whose owner still holds it (L{TrackingSite.end_stop})."""
    error = stopping_error()
    text = f"503 Service Unavailable: {error.kind}: {error.message}\n".encode("ascii")
    length = len(text)
    body = b"" if getattr(request, "method", b"GET") == b"HEAD" else text
    head = [b"HTTP/1.1 503 Service Unavailable", b"Content-Type: text/plain; charset=utf-8",
            b"Cache-Control: no-store", b"X-Ooidx-Error: " + error.kind.encode("ascii")]
    head += [name + b": " + value for name, value in error.headers.items()]
    head.append(b"Content-Length: %d" % length)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class TrackingSite(server.Site):
    """A Site that remembers its open connections, so its owner can close them
    at stop, and that answers only for the hosts of its L{HostAllowList}
    (C{allowed_hosts}: the extra names). Its access log (a line per request)
    is written only when C{access_log} is true (config C{logging.access}):
    the page polls every few seconds, and a request is no event."""

    def __init__(self, *args: Any, allowed_hosts: Iterable[str] = (), access_log: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_channels: set = set()
        self.hosts = HostAllowList(allowed_hosts)
        self.access_log = access_log
        #: true once a graceful stop began (L{begin_stop}): every request read now is answered 503
        self.stopping = False
        #: how the 503 of a stopping edge is written (request, error) -> body; None: a JSON error
        self.stopping_answer: Optional[Callable[[server.Request, HTTPError], bytes]] = None
        #: requests answered 503 because the edge was stopping; requests answered 503 or cut at the drain bound
        self.refused_stopping = 0
        self.cut_at_stop = 0
        self._fresh: dict = {}  # channel -> since when it is given a moment to send its first request
        self._used: set = set()  # the HTTPChannels that have read a request (idle ones are keep-alive)
        self._clock: Any = None

    def log(self, request: server.Request) -> None:
        if self.access_log:
            super().log(request)

    def getResourceFor(self, request: server.Request) -> Any:
        channel = getattr(request, "channel", None)
        if channel is not None:
            self._used.add(channel)
        if self.stopping:
            return _ShuttingDown(self)
        refusal = self.misdirected(request)
        if refusal is not None:
            return refusal
        return super().getResourceFor(request)

    def misdirected(self, request: server.Request) -> Optional[Resource]:
        """The 421 answer for a browser's request (origin form) naming a host
        this edge does not answer for; None if it may go on. A request without
        C{Host} (HTTP/1.0, no browser sends one) goes on."""
        if not (request.uri or b"").startswith(b"/"):
            return None  # absolute form: a forward-proxy request, whose Host is its upstream
        headers = request.requestHeaders.getRawHeaders(b"host")
        if not headers:
            return None
        if len(headers) != 1:
            return _Misdirected("(several Host headers)")
        host = host_of(headers[0])
        try:
            local = request.getHost().host
        except Exception:  # noqa: BLE001 - no transport address (a test's fake request)
            local = None
        if self.hosts.allows(host, local):
            return None
        return _Misdirected(host if host is not None else headers[0].decode("ascii", "replace")[:80])

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            site = self
            lost = channel.connectionLost

            def connectionLost(reason: Failure) -> None:
                site.open_channels.discard(channel)
                site._fresh.pop(channel, None)
                site._used.discard(_inner(channel))
                lost(reason)

            channel.connectionLost = connectionLost
            self.open_channels.add(channel)
            if self.stopping and self._clock is not None:
                self._fresh[channel] = self._clock.seconds()  # from the backlog: given a moment to ask
        return channel

    def close_connections(self) -> None:
        """Close every connection still open."""
        for channel in list(self.open_channels):
            # Site builds a _GenericHTTPChannelProtocol, a wrapper without a
            # transport of its own: the transport is its wrapped channel's.
            transport = getattr(_inner(channel), "transport", None)
            if transport is not None:
                transport.loseConnection()

    # a graceful stop (the module's docstring) ---------------------------------------

    def begin_stop(self, clock: Any) -> None:
        """From now on every request read is answered 503 (Connection: close);
        idle keep-alive connections are closed, those with a request in
        progress close once it is answered. A connection that has not sent a
        request yet is no idle one: its client connected to send one, which
        may be on its way (in the kernel's buffers, not read yet); closing it
        would reset it unanswered. It is given L{FRESH_GRACE} to arrive (then
        answered 503), as the connections taken from the backlog are."""
        self.stopping = True
        self._clock = clock
        now = clock.seconds()
        for channel in list(self.open_channels):
            if not _requests(channel) and _inner(channel) not in self._used:
                self._fresh.setdefault(channel, now)
        self._close_idle()
        for channel in list(self.open_channels):
            for request in _requests(channel):
                _no_keep_alive(request)

    def _close_idle(self) -> None:
        now = self._clock.seconds() if self._clock is not None else 0.0
        for channel in list(self.open_channels):
            if _requests(channel):
                continue
            accepted = self._fresh.get(channel)
            if accepted is not None and now - accepted < FRESH_GRACE:
                continue  # accepted from the backlog while stopping: its request may be on its way
            transport = getattr(_inner(channel), "transport", None)
            if transport is not None and not getattr(transport, "disconnecting", False):
                transport.loseConnection()

    def waiting_on(self) -> int:
        """Connections a graceful stop still waits for: a request in progress, or
        accepted from the backlog a moment ago (its request may be on its way)."""
        now = self._clock.seconds() if self._clock is not None else 0.0
        count = 0
        for channel in list(self.open_channels):
            transport = getattr(_inner(channel), "transport", None)
            if transport is None or getattr(transport, "disconnected", False):
                continue
            if _requests(channel):
                count += 1
            elif channel in self._fresh and now - self._fresh[channel] < FRESH_GRACE:
                count += 1
        return count

    def end_stop(self) -> int:
        """The drain bound is reached: a request whose answer has not started is
        answered 503 here (its owner sees its client gone), one whose answer has
        started is cut; every connection is closed. Returns how many requests
        were answered so or cut."""
        ended = 0
        for channel in list(self.open_channels):
            inner = _inner(channel)
            transport = getattr(inner, "transport", None)
            requests = _requests(channel)
            if transport is None:
                continue
            if not requests:
                transport.loseConnection()
                continue
            ended += 1
            first = requests[0]
            if getattr(first, "startedWriting", False):
                transport.abortConnection()  # a visibly failed transfer, never a clean short body
                continue
            transport.write(_raw_503(first))
            for request in requests:
                # its owner must write nothing more: it sees its client gone (notifyFinish's errback)
                request.connectionLost(Failure(ConnectionDone("the edge stopped before the answer started")))
            transport.loseConnection()
        self.cut_at_stop += ended
        return ended

    def drained(self, deadline: float, clock: Any) -> Deferred:
        """Fires (with the count of requests L{end_stop} had to end) once no
        connection is waited on, or at C{deadline} (C{clock}'s time); then
        every connection is closed."""
        done: Deferred = Deferred()

        def look() -> None:
            self._close_idle()
            if self.waiting_on() and clock.seconds() < deadline:
                return
            loop.stop()
            ended = self.end_stop() if self.waiting_on() else 0
            self.close_connections()
            done.callback(ended)

        loop = LoopingCall(look)
        loop.clock = clock
        loop.start(DRAIN_TICK, now=True).addErrback(lambda f: None if done.called else done.errback(f))
        return done


def listen_spec(port: Any, interface: Optional[str], *, default_port: int) -> ListenSpec:
    """Where an edge listens, as a checked L{ListenSpec}: C{port} (a number or
    an endpoint string, L{ooidx.http.listen}; C{default_port} when None) on
    C{interface} (127.0.0.1 when None). L{BadEndpoint} if it is neither."""
    return parse_listen(default_port if port is None else port, "127.0.0.1" if interface is None else interface)


class Listens:
    """What a component that owns an L{EdgePort} (C{self.edge}) shows of it."""

    edge: EdgePort

    @property
    def port(self) -> int:
        """The port listened on (the real one when configured as 0)."""
        return self.edge.port

    @property
    def url(self) -> str:
        """The edge's own URL (http or https), on an address this machine can use."""
        return self.edge.url


def listen_on(reactor: Any, spec: ListenSpec, site: server.Site) -> Deferred:
    """Listen with C{site} where C{spec} says, through Twisted's endpoints
    (C{serverFromString}: plain TCP or TLS alike), with the spec's backlog
    (L{ooidx.http.listen.DEFAULT_BACKLOG} unless the endpoint names one);
    fires with the listening port (C{getHost()}, C{stopListening()}), fails
    with CannotListenError."""
    return serverFromString(reactor, spec.endpoint).listen(site)


class EdgePort:
    """Where an edge listens and what it listens with: the proxy port and the
    web port both hold one. It listens through Twisted's endpoints
    (L{listen_on}: plain TCP or TLS alike), says its real port and URL once
    listening (a port configured as 0 is the one the system picked), and at
    stop closes the connections still open (keep-alive clients, event
    streams) before it stops listening, so a stop never waits on a client."""

    def __init__(self, spec: ListenSpec) -> None:
        self.spec = spec
        self.listening: Any = None
        self.site: Optional[TrackingSite] = None

    def listen(self, reactor: Any, site: TrackingSite) -> Deferred:
        """Listen with C{site}; fires with the listening port."""
        self.site = site

        def listening(port: Any) -> Any:
            self.listening = port
            return port

        return listen_on(reactor, self.spec, site).addCallback(listening)

    @property
    def port(self) -> int:
        """The port listened on (the real one when configured as 0)."""
        if self.listening is None:
            return self.spec.port
        return self.listening.getHost().port

    @property
    def url(self) -> str:
        """The edge's own URL, on an address a client of this machine can use."""
        host = self.listening.getHost() if self.listening is not None else None
        address = host.host if host is not None else self.spec.interface
        if address in ("", "0.0.0.0", "::"):
            address = "127.0.0.1" if address != "::" else "::1"
        if ":" in address:
            address = f"[{address}]"
        return f"{self.spec.scheme}://{address}:{self.port}"

    def stop(self, drain: float = 0.0, clock: Any = None) -> Optional[Deferred]:
        """Stop. With no C{drain} (the web port, whose event streams never end):
        close the open connections, then stop listening. With C{drain} seconds
        and a C{clock}: the graceful stop of the module's docstring (503 for
        every request read from now on, the backlog taken in before the port
        closes, idle connections closed, requests in progress served for at
        most C{drain} seconds); fires once the port is closed and every
        connection closed or closing."""
        listening, self.listening = self.listening, None
        site, self.site = self.site, None
        if drain <= 0 or clock is None or site is None:
            if site is not None:
                site.close_connections()
            if listening is not None:
                return listening.stopListening()
            return None
        deadline = clock.seconds() + drain
        site.begin_stop(clock)
        closed = _stop_listening_after_backlog(listening) if listening is not None else succeed(None)
        # the drain counts the connections taken from the backlog too: it starts once the port is closed
        closed.addErrback(lambda f: _log.failure("stopping listening on {spec}", f, spec=self.spec.description))
        return closed.addCallback(lambda _: site.drained(deadline, clock))


def _stop_listening_after_backlog(listening: Any) -> Deferred:
    """Stop listening; the connections the kernel completed for the port and
    the node had not accepted yet (its backlog) are accepted just before the
    socket closes, so that they are answered (503) instead of reset.

    A Twisted port stops reading at once and closes its socket in its
    C{connectionLost}, a reactor turn later: the backlog is taken there,
    right before the close, so a client that connected meanwhile is answered
    too. (A port without C{doRead}, a test's fake, just stops.)"""
    accept = getattr(listening, "doRead", None)
    lost = getattr(listening, "connectionLost", None)
    if callable(accept) and callable(lost):
        def connectionLost(reason: Any) -> Any:
            try:
                # accept() until the kernel has no more (EAGAIN ends the loop first)
                listening.numberAccepts = 1_000_000  # tcp.Port's accept() calls per doRead
                accept()
            except Exception:  # noqa: BLE001 - the socket closes all the same
                _log.failure("accepting the backlog of a port that stops")
            return lost(reason)

        listening.connectionLost = connectionLost
    return maybeDeferred(listening.stopListening)


def mask_query(uri: bytes, names: Iterable[bytes] = SECRET_QUERY) -> bytes:
    """C{uri} with the value of every query parameter named in C{names}
    replaced by C{***}. Names are compared as the request's C{args} sees them
    (split at C{&} and C{;}, C{+} and C{%XX} decoded), so C{?%74icket=} is
    masked too."""
    path, question, query = uri.partition(b"?")
    if not question:
        return uri
    names = {n.lower() for n in names}
    pieces = _QUERY_SEPARATORS.split(query)
    for i in range(0, len(pieces), 2):
        key, equals, _ = pieces[i].partition(b"=")
        if equals and unquote_to_bytes(key.replace(b"+", b" ")).strip().lower() in names:
            pieces[i] = key + b"=***"
    return path + question + b"".join(pieces)


class _Masked:
    """A request as the access log sees it: its URI and Referer masked."""

    def __init__(self, request: Any, names: Tuple[bytes, ...]) -> None:
        self._request = request
        self._names = names
        self.uri = mask_query(request.uri or b"", names)

    def getHeader(self, name: bytes) -> Any:
        value = self._request.getHeader(name)
        if value and name.lower() == b"referer":
            value = mask_query(value, self._names)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def masking_log_formatter(names: Iterable[bytes] = SECRET_QUERY) -> Callable[[str, Any], str]:
    """An access log formatter (Site's C{logFormatter}): the combined log
    format, with the values of the C{names} query parameters masked in the
    request's URI and Referer."""
    names = tuple(names)

    def formatter(timestamp: str, request: Any) -> str:
        return http.combinedLogFormatter(timestamp, _Masked(request, names))

    return formatter
