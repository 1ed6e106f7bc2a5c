"""magnet.amqp.publishing's contract against the scripted broker: a publish
waits for the link (and for a publishing channel being reopened) within
C{operation_timeout}; a refused message (basic.nack) is published again on a
fresh channel, or fails when that cannot be done in time, when its sender
gave up, or when the transport stops; a broker block met while waiting
holds the publish; a confirm its sender gave up waiting for moves the next
publishes to a fresh channel.
"""
from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from magnet.bus import Bus
from magnet.errors import NotConfirmed, NotConnected, Timeout
from magnet.message import Message
from tests.fast.magnet.test_amqp_protocol_contract import UNBLOCKED, ack, blocked, method, nack
from tests.fast.magnet.test_amqp_transport_contract import Harness


class PublishingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(nack_retries=3, operation_timeout=5.0)
        self.broker = self.h.up()
        self.t = self.h.transport

    def publish(self, body: bytes = b"x") -> Deferred:
        d = self.t.publish("ex", "rk", Message(body=body))
        self.h.pump()
        return d

    def test_a_publish_waits_while_the_publishing_channel_is_reopened(self) -> None:
        self.broker.hold.add("channel.open")
        self.broker.feed(method(1, "channel.close", reply_code=406, reply_text="PRECONDITION_FAILED"))
        self.assertIsNone(self.t._publisher)
        d = self.publish()
        self.h.clock.advance(0.05)
        self.assertNoResult(d)
        [(channel, name, fields)] = self.broker.held
        self.broker.feed(self.broker.answer(channel, name, fields))
        self.h.clock.advance(0.05)
        self.h.pump()
        publisher = self.t._publisher
        self.assertEqual([c for c, _ in self.broker.publishes], [publisher.id])
        self.broker.feed(ack(publisher.id, 1))
        self.successResultOf(d)

    def test_a_publish_with_no_publishing_channel_in_time_is_notconnected(self) -> None:
        self.broker.hold.add("channel.open")
        self.broker.feed(method(1, "channel.close", reply_code=406, reply_text="PRECONDITION_FAILED"))
        d = self.publish()
        for _ in range(101):
            self.h.clock.advance(0.05)
        self.assertIn("no broker link within 5.0 s", str(self.failureResultOf(d, NotConnected).value))

    def test_a_publishing_channel_that_cannot_be_reopened_drops_the_link(self) -> None:
        self.broker.refuse["channel.open"] = (504, "CHANNEL_ERROR")
        self.broker.feed(method(1, "channel.close", reply_code=406, reply_text="PRECONDITION_FAILED"))
        self.assertTrue(self.broker.protocol.lost)

    def test_a_refused_publish_its_sender_gave_up_on_is_not_sent_again(self) -> None:
        d = self.publish()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.broker.feed(nack(1, 1))
        self.h.clock.advance(1)
        self.h.pump()
        self.assertEqual(len(self.broker.publishes), 1)

    def test_a_refused_publish_fails_when_the_transport_stops_before_it_is_sent_again(self) -> None:
        d = self.publish()
        self.broker.feed(nack(1, 1))
        stopped = self.t.stop()
        self.h.pump()
        self.successResultOf(stopped)
        self.h.clock.advance(0.05)
        failure = self.failureResultOf(d, NotConnected)
        self.assertIn("transport was stopped", str(failure.value))

    def test_a_refused_publish_with_no_fresh_channel_in_time_is_notconfirmed(self) -> None:
        self.broker.hold.add("channel.open")
        d = self.publish()
        self.broker.feed(nack(1, 1))
        for _ in range(101):
            self.h.clock.advance(0.05)
        self.assertIn("basic.nack, 1 times", str(self.failureResultOf(d, NotConfirmed).value))

    def test_a_refused_publish_with_the_link_gone_meanwhile_is_notconnected(self) -> None:
        self.broker.hold.add("channel.open")
        d = self.publish()
        self.broker.feed(nack(1, 1))
        self.h.script.extend(["hang"])
        self.broker.drop()  # the publish is no longer awaiting a confirm: it waits to be sent again
        for _ in range(101):
            self.h.clock.advance(0.05)
        self.assertIn("no broker link to publish it again", str(self.failureResultOf(d, NotConnected).value))

    def test_a_fresh_channel_that_cannot_be_put_in_confirm_mode_drops_the_link(self) -> None:
        self.broker.refuse["confirm.select"] = (540, "NOT_IMPLEMENTED")
        d = self.publish()
        self.broker.feed(nack(1, 1))
        self.assertTrue(self.broker.protocol.lost)
        self.h.clock.advance(0)
        self.h.pump()  # the next link (confirm.select refused there too: set per broker)
        self.assertTrue(self.t.connected)
        self.h.clock.advance(0.05)
        self.h.pump()
        self.h.broker.feed(ack(1, 1))
        self.successResultOf(d)

    def test_the_retired_channel_closes_once_its_last_publish_is_confirmed(self) -> None:
        first, second = self.publish(b"1"), self.publish(b"2")
        self.broker.feed(nack(1, 1))
        self.assertNotIn("channel.close", self.broker.names(1))  # it still awaits the confirm of 2
        self.broker.feed(ack(1, 2))
        self.successResultOf(second)
        self.assertIn("channel.close", self.broker.names(1))
        self.h.clock.advance(0.05)
        self.h.pump()
        self.broker.feed(ack(self.t._publisher.id, 1))
        self.successResultOf(first)

    def test_a_publish_waiting_for_the_link_is_held_if_the_new_link_is_blocked(self) -> None:
        self.h.script.append({})
        self.broker.drop()
        d = self.t.publish("ex", "rk", Message(body=b"x"))
        self.h.clock.advance(0)
        second = self.h.broker
        second.hold.add("confirm.select")
        second.pump()
        [(channel, name, fields)] = second.held
        second.protocol.dataReceived(blocked("low on disk"))
        second.feed(second.answer(channel, name, fields))
        self.assertTrue(self.t.connected)
        self.assertEqual(second.publishes, [])
        second.feed(UNBLOCKED)
        self.assertEqual(len(second.publishes), 1)
        second.feed(ack(1, 1))
        self.successResultOf(d)

    def test_a_confirm_given_up_on_while_blocked_says_why(self) -> None:
        d = self.publish()
        self.broker.feed(blocked("memory alarm"))
        d.cancel()
        failure = self.failureResultOf(d, Timeout)
        self.assertIn("memory alarm", str(failure.value))
        self.broker.feed(ack(1, 1))  # a late confirm is ignored


class ConfirmGivenUpTests(SynchronousTestCase):
    """A sender that gives up waiting for a confirm (the bus's send timeout)
    on a link that is up and not blocked: the publishing channel is replaced.

    The cluster partition scenario (RabbitMQ 3.10.8, pause_minority): the
    test's producer bus, back on a majority node within a second of the
    paused node's close, sent on for 40 s without one confirm, every send
    timing out, while links made a few seconds later published there fine.
    Its channel's publishes to the quorum queue had gone to the old leader.
    """

    def setUp(self) -> None:
        self.h = Harness(operation_timeout=30.0)
        self.broker = self.h.up()
        self.t = self.h.transport
        self.bus = Bus(self.t, clock=self.h.clock, send_timeout=5.0)

    def send(self, body: bytes = b"x") -> Deferred:
        d = self.bus.send("q", Message(body=body))
        self.h.pump()
        return d

    def test_the_bus_send_timeout_moves_the_next_sends_to_a_fresh_channel(self) -> None:
        stuck = self.send(b"1")
        self.h.clock.advance(5.0)
        self.h.pump()
        self.failureResultOf(stuck, Timeout)
        self.assertEqual(self.broker.names(2), ["channel.open", "confirm.select"])
        self.assertEqual(self.t._publisher.id, 2)
        self.assertIn("channel.close", self.broker.names(1))  # nobody waits on it any more
        self.assertEqual((self.t.confirms_given_up, self.t.publishers_replaced), (1, 1))
        d = self.send(b"2")
        self.assertEqual([c for c, _ in self.broker.publishes], [1, 2])
        self.broker.feed(ack(2, 1))
        self.successResultOf(d)

    def test_the_old_channel_stays_open_while_a_sender_waits_there(self) -> None:
        first = self.send(b"1")
        self.h.clock.advance(2.0)
        second = self.send(b"2")
        self.h.clock.advance(3.0)
        self.h.pump()
        self.failureResultOf(first, Timeout)
        self.assertEqual(self.t._publisher.id, 2)
        self.assertNotIn("channel.close", self.broker.names(1))
        self.broker.feed(ack(1, 2))  # a late confirm there still counts
        self.successResultOf(second)
        self.assertIn("channel.close", self.broker.names(1))

    def test_one_replacement_at_a_time(self) -> None:
        self.broker.hold.add("channel.open")
        sends = [self.send(b"1"), self.send(b"2")]
        self.h.clock.advance(5.0)
        self.h.pump()
        for d in sends:
            self.failureResultOf(d, Timeout)
        self.assertEqual(len(self.broker.held), 1)
        self.assertEqual(self.t.confirms_given_up, 1)

    def test_a_fresh_channel_the_broker_never_opens_drops_the_link(self) -> None:
        self.broker.hold.add("channel.open")
        d = self.send()
        self.h.clock.advance(5.0)
        self.failureResultOf(d, Timeout)
        self.h.clock.advance(30.0)
        self.h.pump()
        self.assertTrue(self.broker.protocol.lost)

    def test_not_while_the_broker_blocks_publishers(self) -> None:
        d = self.send()
        self.broker.feed(blocked("memory alarm"))
        self.h.clock.advance(5.0)
        self.h.pump()
        self.failureResultOf(d, Timeout)
        self.assertEqual(self.broker.names(2), [])
        self.assertEqual(self.t.confirms_given_up, 0)

    def test_not_when_the_transport_stops(self) -> None:
        d = self.t.publish("ex", "rk", Message(body=b"x"))
        self.h.pump()
        self.t._stopping = True
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.broker.names(2), [])
