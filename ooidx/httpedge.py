"""What the HTTP edges (the proxy and the web port) share about their sites.

A component that listens must be able to stop: stop listening, and close the
connections still open (keep-alive clients, a person's event stream), or a
daemon's stop waits on clients that never hang up.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from twisted.python.failure import Failure
from twisted.web import server


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
