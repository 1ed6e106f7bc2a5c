"""magnet: the messaging patterns of the Data Exchange, over RabbitMQ or in-process.

    bus = magnet.connect("amqp://guest:guest@127.0.0.1:5672/", reactor=reactor)
    bus.startService()
    yield bus.declare_worker_queue("fetcher")
    yield bus.serve("fetcher", Fetcher())
    result = yield bus.call("fetcher", "head", url="http://...")

Patterns: worker queues and fanouts (L{Bus.declare_worker_queue},
L{Bus.declare_fanout}, L{Bus.consume}, L{Bus.subscribe}), confirmed sends
(L{Bus.send}), multicast to a set of addresses (L{Bus.multicast}), RPC (L{Bus.serve}, L{Bus.call}), third-party coordination
(L{Bus.tell}), listen addresses (L{Bus.listen}) and streams
(L{Bus.open_stream}, L{Listener.next_stream}).

Unit tests of code built on a bus use L{magnet.testing}: the in-process broker
on a C{task.Clock}, delivering when the test flushes it, no reactor needed.
"""
from __future__ import annotations

from typing import Any, Optional

from magnet.bus import Bus, Listener, Subscription
from magnet.errors import (BadArguments, BadMessage, BadURL, Blocked, ConnectionLost, MagnetError, NotConfirmed,
                           NotConnected, Refusal, RemoteError, StreamError, Timeout, UnknownOperation, Unroutable)
from magnet.message import BINARY, JSON, Message
from magnet.multicast import MulticastError, MulticastResult
from magnet.observer import BusObserver
from magnet.rpc import decode_reply, operation

__all__ = [
    "connect", "transport_for", "Bus", "Listener", "Subscription", "Message", "JSON", "BINARY", "operation",
    "decode_reply", "BusObserver", "MagnetError", "ConnectionLost", "NotConnected", "Unroutable",
    "NotConfirmed", "Refusal", "Timeout", "BadMessage", "BadURL", "RemoteError", "UnknownOperation", "BadArguments",
    "StreamError", "Blocked", "MulticastResult", "MulticastError",
]

#: Options that go to the transport rather than to the bus.
_TRANSPORT_OPTIONS = ("heartbeat", "operation_timeout", "connect_timeout", "backoff", "close_timeout", "tls_options",
                      "nack_retries")


def transport_for(url: Any, reactor: Any, **options: Any) -> Any:
    """The transport a broker URL (or a list of amqp:// URLs, for a cluster) names."""
    first = url[0] if isinstance(url, (list, tuple)) and url else url
    if not isinstance(first, str) or "://" not in first:
        raise BadURL(f"not a broker URL: {first!r} (expected memory://, amqp:// or amqps://)")
    scheme = first.split("://", 1)[0].lower()
    if scheme == "memory":
        from magnet.memory import MemoryTransport, broker_for
        return MemoryTransport(broker_for(first, reactor))
    if scheme in ("amqp", "amqps"):
        from magnet import amqp
        return amqp.from_url(url, reactor, **options)
    raise BadURL(f"unknown broker scheme {scheme!r} (expected memory, amqp or amqps)")


def connect(url: Any, reactor: Optional[Any] = None, **options: Any) -> Bus:
    """A L{Bus} (not yet started) on the broker at C{url}."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    transport_options = {k: options.pop(k) for k in _TRANSPORT_OPTIONS if k in options}
    heartbeat = transport_options.get("heartbeat")
    if "dead_letter_check" not in options and isinstance(heartbeat, (int, float)) and heartbeat > 0:
        options["dead_letter_check"] = heartbeat  # as often as the consumers' liveness check (magnet.amqp.liveness)
    return Bus(transport_for(url, reactor, **transport_options), clock=reactor, **options)
