"""The broker's connection.close (e.g. `rabbitmqctl close_connection`), without a broker.

magnet answers close-ok and closes the socket, and aborts it if it is still
open a second later: a broker that stopped reading (RabbitMQ waits 30 s for
a close-ok stuck behind publishes, heartbeating meanwhile) must not keep a
dead link looking alive, with every consumer idle, for that long.
"""
from __future__ import annotations

import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import AMQPTransport

from tests.support.amqp_link import URL, frame, link


def _connection_close_frame(code: int, text: bytes) -> bytes:
    return frame(0, struct.pack(">HHH", 10, 50, code) + bytes([len(text)]) + text + struct.pack(">HH", 0, 0))


class ConnectionCloseTests(SynchronousTestCase):
    def test_close_ok_is_sent_and_the_socket_dropped_at_once(self) -> None:
        clock = Clock()
        proto, tcp = link(AMQPTransport(URL, reactor=clock), clock)
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
        proto, tcp = link(AMQPTransport(URL, reactor=clock), clock)
        proto.dataReceived(_connection_close_frame(320, b"CONNECTION_FORCED"))
        proto.lost = True
        clock.advance(1.0)
        self.assertFalse(tcp.disconnected)
