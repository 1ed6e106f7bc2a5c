"""What the HTTP edges (the proxy and the web port) share about their sites.

Where an edge listens is a port number or a Twisted endpoint string
(L{ooidx.http.listen}: C{tcp:}, C{tcp6:}, C{ssl:}); L{listen_spec} reads it
from the config and L{listen_on} listens through C{serverFromString}.

A component that listens must be able to stop: stop listening, and close the
connections still open (keep-alive clients, a person's event stream), or a
daemon's stop waits on clients that never hang up.

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

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from ooidx.http.answers import HTTPError, error_answer, prepare
from ooidx.http.listen import LOOPBACK_NAMES, ListenSpec, parse_listen

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

    def log(self, request: server.Request) -> None:
        if self.access_log:
            super().log(request)

    def getResourceFor(self, request: server.Request) -> Any:
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
                lost(reason)

            channel.connectionLost = connectionLost
            self.open_channels.add(channel)
        return channel

    def close_connections(self) -> None:
        """Close every connection still open."""
        for channel in list(self.open_channels):
            # Site builds a _GenericHTTPChannelProtocol, a wrapper without a
            # transport of its own: the transport is its wrapped channel's.
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.loseConnection()


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

    def stop(self) -> Optional[Deferred]:
        """Close the open connections, then stop listening."""
        listening, self.listening = self.listening, None
        site, self.site = self.site, None
        if site is not None:
            site.close_connections()
        if listening is not None:
            return listening.stopListening()
        return None


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
