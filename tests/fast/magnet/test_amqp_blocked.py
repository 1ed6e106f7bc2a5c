"""connection.blocked / connection.unblocked (RabbitMQ's resource alarms), without a broker.

A broker low on memory or disk blocks publishers: a publish written then would
make it stop reading the whole connection (the consumers' acks too) and its
confirm would hang. magnet advertises the capability, holds publishes while
blocked, sends them in order when the block lifts, and fails a publish held
longer than C{operation_timeout} (or given up by its caller) with L{Blocked},
naming the alarm.
"""
from __future__ import annotations

import struct

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from magnet import Blocked, Message, NotConfirmed, NotConnected
from magnet.amqp import CLIENT_PROPERTIES
from magnet.errors import BadFrame

from tests.support.amqp_link import frame, linked

BLOCKED = frame(0, struct.pack(">HHB", 10, 60, 13) + b"low on memory")
UNBLOCKED = frame(0, struct.pack(">HH", 10, 61))


def _ack(tag: int) -> bytes:
    return frame(1, struct.pack(">HHQB", 60, 80, tag, 0))


class BlockedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport, self.proto, self.wire = linked(self.clock, operation_timeout=5.0)

    def test_the_capability_is_advertised(self) -> None:
        self.assertIs(CLIENT_PROPERTIES["capabilities"]["connection.blocked"], True)

    def test_blocked_and_unblocked_are_read_on_channel_zero(self) -> None:
        self.proto.dataReceived(BLOCKED)
        self.assertEqual(self.proto.blocked, "low on memory")
        self.proto.dataReceived(UNBLOCKED)
        self.assertIsNone(self.proto.blocked)
        self.assertFalse(self.wire.disconnecting)

    def test_a_blocked_frame_whose_reason_runs_past_its_end_drops_the_link(self) -> None:
        self.proto.dataReceived(frame(0, struct.pack(">HHB", 10, 60, 40) + b"low") + b"\x00" * 40)
        self.assertTrue(self.wire.disconnecting)
        self.assertIsNone(self.proto.blocked)
        self.assertEqual(len(self.flushLoggedErrors(BadFrame)), 1)  # logged: "bad data from broker"

    def test_a_publish_while_blocked_is_held_then_sent_when_the_block_lifts(self) -> None:
        self.proto.dataReceived(BLOCKED)
        first = self.transport.publish("", "q", Message(body=b"one"))
        second = self.transport.publish("", "q", Message(body=b"two"))
        self.assertEqual(self.wire.value(), b"")  # nothing written to a blocked connection
        self.assertNoResult(first)
        self.clock.advance(4.9)
        self.assertNoResult(first)
        self.proto.dataReceived(UNBLOCKED)
        written = self.wire.value()
        self.assertLess(written.index(b"one"), written.index(b"two"))  # in order
        self.proto.dataReceived(_ack(1) + _ack(2))
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.clock.advance(10)  # the hold's timeout is gone with it
        self.assertEqual(self.transport._held, [])

    def test_a_publish_held_too_long_fails_naming_the_alarm(self) -> None:
        self.proto.dataReceived(BLOCKED)
        d = self.transport.publish("ex", "rk", Message(body=b"x"))
        self.clock.advance(5.0)
        failure = self.failureResultOf(d, Blocked)
        self.assertIsInstance(failure.value, NotConfirmed)  # not sent: safe to send again
        self.assertIn("low on memory", str(failure.value))
        self.assertIn("connection.blocked", str(failure.value))
        self.assertIn("'ex'", str(failure.value))
        self.assertEqual(self.wire.value(), b"")
        self.assertEqual(self.transport._held, [])
        self.proto.dataReceived(UNBLOCKED)  # the block lifting later sends nothing
        self.assertEqual(self.wire.value(), b"")

    def test_a_caller_giving_up_on_a_held_publish_gets_blocked_not_a_bare_cancel(self) -> None:
        self.proto.dataReceived(BLOCKED)
        d = self.transport.publish("", "q", Message(body=b"x"))
        self.clock.advance(1.0)
        d.cancel()  # as the bus's send timeout does
        self.assertIn("within 1.0 s", str(self.failureResultOf(d, Blocked).value))
        self.proto.dataReceived(UNBLOCKED)
        self.assertEqual(self.wire.value(), b"")

    def test_held_publishes_wait_for_the_next_link_when_this_one_goes(self) -> None:
        self.transport._running = False  # no reconnect attempt on the fake reactor
        self.proto.dataReceived(BLOCKED)
        d = self.transport.publish("", "q", Message(body=b"x"))
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.transport._held, [])
        self.assertNoResult(d)
        self.clock.pump([0.05] * 120)
        self.failureResultOf(d, NotConnected)


class BlockListenerTests(SynchronousTestCase):
    """add_block_listener: told the alarm when the block starts, None when it lifts or the link goes
    (an HTTP edge answers at once instead of waiting for its publishes to fail)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport, self.proto, self.wire = linked(self.clock, operation_timeout=5.0)
        self.told: list = []
        self.transport.add_block_listener(self.told.append)

    def test_told_when_the_block_starts_and_ends(self) -> None:
        self.proto.dataReceived(BLOCKED)
        self.assertEqual(self.told, ["low on memory"])
        self.assertEqual(self.transport.blocked, "low on memory")
        self.proto.dataReceived(UNBLOCKED)
        self.assertEqual(self.told, ["low on memory", None])

    def test_told_none_when_a_blocked_link_goes(self) -> None:
        self.transport._running = False
        self.proto.dataReceived(BLOCKED)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.told, ["low on memory", None])
        self.assertIsNone(self.transport.blocked)

    def test_a_failing_listener_is_logged_and_the_others_told(self) -> None:
        def broken(reason: object) -> None:
            raise RuntimeError("boom")

        later: list = []
        self.transport._block_listeners.insert(0, broken)
        self.transport.add_block_listener(later.append)
        self.proto.dataReceived(BLOCKED)
        self.assertEqual((self.told, later), (["low on memory"], ["low on memory"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MemoryBlockedTests(SynchronousTestCase):
    """The memory broker simulates the alarm (magnet.memory.MemoryBroker.block): publishes held until
    the block lifts, a sender that gives up gets Blocked naming the alarm, the bus's listeners told."""

    def setUp(self) -> None:
        from magnet.testing import MemoryBroker
        self.broker = MemoryBroker()
        self.addCleanup(self.broker.stop)
        self.bus = self.broker.bus(send_timeout=5)
        self.bus.declare_worker_queue("work")
        self.broker.flush()
        self.told: list = []
        self.bus.add_block_listener(self.told.append)

    def test_a_send_is_held_then_sent_when_the_block_lifts(self) -> None:
        self.broker.block("low on disk")
        self.assertEqual((self.bus.blocked, self.told), ("low on disk", ["low on disk"]))
        d = self.bus.send("work", Message(body=b"x"))
        self.broker.advance(4)
        self.assertNoResult(d)
        self.broker.unblock()
        self.broker.flush()
        self.successResultOf(d)
        self.assertEqual(self.told, ["low on disk", None])
        self.assertIsNone(self.bus.blocked)

    def test_a_send_held_past_the_send_timeout_fails_naming_the_alarm(self) -> None:
        self.broker.block("low on memory")
        d = self.bus.send("work", Message(body=b"x"))
        self.broker.advance(5)
        failure = self.failureResultOf(d, Blocked)
        self.assertIn("low on memory", str(failure.value))
        self.broker.unblock()
        self.broker.flush()  # nothing is sent late

    def test_a_stopped_transport_fails_what_it_held(self) -> None:
        self.broker.block("low on memory")
        d = self.bus.transport.publish("", "work", Message(body=b"x"))
        self.bus.transport.stop()
        self.failureResultOf(d, NotConnected)
