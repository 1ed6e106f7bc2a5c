"""What the HTTP edges (the proxy and the web port) share about their sites.

A component that listens must be able to stop: stop listening, and close the
connections still open (keep-alive clients, a person's event stream), or a
daemon's stop waits on clients that never hang up.

An edge whose URLs may carry a credential in the query (the web port's
stream tickets, C{?ticket=}) logs its requests with
L{masking_log_formatter}, so the access log shows C{ticket=***}.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional, Tuple
from urllib.parse import unquote_to_bytes

from twisted.python.failure import Failure
from twisted.web import http, server

#: Query parameters whose values never reach a log line.
SECRET_QUERY = (b"ticket",)
_QUERY_SEPARATORS = re.compile(rb"([&;])")


class TrackingSite(server.Site):
    """A Site that remembers its open connections, so its owner can close them at stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_channels: set = set()

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


def listen_address(config: Any, component: str, port: Optional[int], interface: Optional[str], *,
                   http_port: str, default_port: int) -> Tuple[int, str]:
    """Where an edge listens: the arguments if given, else the component's own
    options (C{components.NAME.port} / C{interface}), else the C{http} section
    (C{http_port} names its key), else the defaults."""
    http = getattr(config, "http", None)
    options = None
    components = getattr(config, "components", None)
    if components is not None and component in components:
        options = components[component].options
    if port is None:
        port = getattr(options, "port", None)
    if port is None:
        port = getattr(http, http_port, default_port)
    if interface is None:
        interface = getattr(options, "interface", None)
    if interface is None:
        interface = getattr(http, "interface", "127.0.0.1")
    return int(port), interface


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
