"""What the HTTP edges (the proxy and the web port) share about their sites.

A component that listens must be able to stop: stop listening, and close the
connections still open (keep-alive clients, a person's event stream), or a
daemon's stop waits on clients that never hang up.
"""
from __future__ import annotations

from typing import Any

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
