"""magnet's AMQP link with no broker and no socket: a protocol of an
L{AMQPTransport} over a C{StringTransport}, for the fast tier's tests of what
the transport does with the frames a broker sends (tests/fast/magnet).

- L{frame}: one AMQP frame (a method frame unless told), as a broker writes it;
- L{link}: the transport's protocol over a C{StringTransport}, its handshake's
  writes cleared, and taken as the transport's link that is up;
- L{linked}: a transport built for the test with that link, publishing on
  channel 1. It is never started: it does not reconnect.
"""
from __future__ import annotations

import struct
from typing import Any, Tuple

from twisted.internet.testing import StringTransport

from magnet.amqp import AMQPTransport, _AMQPProtocol, _PublishChannel

#: a broker nobody listens for (the link is a StringTransport: nothing connects)
URL = "amqp://guest:guest@127.0.0.1:1/"
#: the frame size the protocol would have agreed on with RabbitMQ
FRAME_MAX = 131072


def frame(channel: int, payload: bytes, ftype: int = 1) -> bytes:
    """A frame of type C{ftype} (1: method) on C{channel}, with its end octet."""
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + b"\xce"


def link(transport: AMQPTransport, clock: Any) -> Tuple[_AMQPProtocol, StringTransport]:
    """A protocol of C{transport} over a C{StringTransport} (what it writes),
    made C{transport}'s link that is up: (protocol, wire)."""
    proto = _AMQPProtocol(transport, transport.urls[0], transport.spec, clock, 0)
    wire = StringTransport()
    proto.makeConnection(wire)
    wire.clear()
    proto.frame_max = FRAME_MAX
    transport._protocol = proto
    transport.connected = True
    return proto, wire


def linked(clock: Any, **options: Any) -> Tuple[AMQPTransport, _AMQPProtocol, StringTransport]:
    """A transport (C{options} its own: C{operation_timeout}, C{heartbeat}, ...)
    whose link is up, publishing on channel 1: (transport, protocol, wire)."""
    transport = AMQPTransport(URL, reactor=clock, **options)
    proto, wire = link(transport, clock)
    publisher = _PublishChannel(proto, 1)
    proto.fast[1] = publisher
    proto._next_channel = 1
    transport._publisher = publisher
    return transport, proto, wire
