"""The broker's connection.close (e.g. `rabbitmqctl close_connection`), without a broker.

magnet answers close-ok and closes the socket, and aborts it if it is still
open a second later: a broker that stopped reading (RabbitMQ waits 30 s for
a close-ok stuck behind publishes, heartbeating meanwhile) must not keep a
dead link looking alive, with every consumer idle, for that long.
"""
from __future__ import annotations

import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import AMQPTransport, _AMQPProtocol


def _connection_close_frame(code: int, text: bytes) -> bytes:
    payload = struct.pack(">HHH", 10, 50, code) + bytes([len(text)]) + text + struct.pack(">HH", 0, 0)
    return struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce"


class ConnectionCloseTests(SynchronousTestCase):
    def test_close_ok_is_sent_and_the_socket_dropped_at_once(self) -> None:
        clock = Clock()
        transport = AMQPTransport("amqp://guest:guest@127.0.0.1:1/", reactor=clock)
        proto = _AMQPProtocol(transport, transport.urls[0], transport.spec, clock, 0)
        tcp = StringTransport()
        proto.makeConnection(tcp)
        proto.frame_max = 131072
        tcp.clear()
        proto.dataReceived(_connection_close_frame(320, b"CONNECTION_FORCED - closed by an operator"))
        self.assertEqual(proto.close_reason, "320 CONNECTION_FORCED - closed by an operator")
        self.assertIn(struct.pack(">HH", 10, 51), tcp.value())  # connection.close-ok written
        self.assertTrue(tcp.disconnecting)  # loseConnection: waits for the buffer to be written
        self.assertFalse(tcp.disconnected)
        clock.advance(1.0)  # the broker stopped reading: the socket is aborted
        self.assertTrue(tcp.disconnected)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_socket_already_gone_is_left_alone(self) -> None:
        clock = Clock()
        transport = AMQPTransport("amqp://guest:guest@127.0.0.1:1/", reactor=clock)
        proto = _AMQPProtocol(transport, transport.urls[0], transport.spec, clock, 0)
        tcp = StringTransport()
        proto.makeConnection(tcp)
        proto.dataReceived(_connection_close_frame(320, b"CONNECTION_FORCED"))
        proto.lost = True
        clock.advance(1.0)
        self.assertFalse(tcp.disconnected)
