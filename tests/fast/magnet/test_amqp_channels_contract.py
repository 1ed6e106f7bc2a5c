"""magnet.amqp.channels' contract, frames in and frames out: basic.return's
content (properties before its headers, a body in several frames, a return
that matches no publish), confirms for publishes given up on, methods the
fast path leaves to txAMQP, and a consumer channel released or cancelled
after its link is gone.
"""
from __future__ import annotations

import struct
from typing import List

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import AMQPDelivery
from magnet.amqp.channels import _PublishChannel
from magnet.amqp.protocol import ACK_HOLD
from magnet.amqp.wire import PUBLISH_SEQ_HEADER, _content_frames, encode_table
from magnet.errors import ConnectionLost, Unroutable
from magnet.message import Message
from tests.fast.magnet.test_amqp_protocol_contract import ack, deliver, method
from tests.fast.magnet.test_amqp_transport_contract import Harness


def _returned(channel: int, message: Message, seq: object, frame_max: int = 4096) -> bytes:
    return (method(channel, "basic.return", reply_code=312, reply_text="NO_ROUTE", exchange="ex", routing_key="rk")
            + b"".join(_content_frames(channel, message, seq, frame_max)))  # type: ignore[arg-type]


class PublishChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.broker = self.h.up()
        self.t = self.h.transport

    def publish(self, mandatory: bool = True) -> object:
        d = self.t.publish("ex", "rk", Message(body=b"x"), mandatory=mandatory)
        self.h.pump()
        return d

    def test_a_return_with_every_property_before_its_headers(self) -> None:
        d = self.publish()
        returned = Message(body=b"x", content_type="text/plain", headers={"h": 1})
        frames = _returned(1, returned, 1)
        self.broker.feed(frames + ack(1, 1))
        self.failureResultOf(d, Unroutable)  # type: ignore[arg-type]

    def test_a_return_whose_header_carries_content_encoding(self) -> None:
        d = self.publish()
        props = (struct.pack(">H", (1 << 15) | (1 << 14) | (1 << 13)) + b"\x04text" + b"\x04gzip"
                 + encode_table({PUBLISH_SEQ_HEADER: 1}))
        header = struct.pack(">HHQ", 60, 0, 0) + props
        frame = struct.pack(">BHI", 2, 1, len(header)) + header + b"\xce"
        self.broker.feed(method(1, "basic.return", reply_code=312, reply_text="NO_ROUTE", exchange="ex",
                                routing_key="rk") + frame + ack(1, 1))
        self.failureResultOf(d, Unroutable)  # type: ignore[arg-type]

    def test_a_returned_body_in_several_frames(self) -> None:
        d = self.publish()
        self.broker.feed(_returned(1, Message(body=b"y" * 10000), 1, frame_max=4096) + ack(1, 1))
        self.failureResultOf(d, Unroutable)  # type: ignore[arg-type]

    def test_a_return_that_matches_no_publish_is_logged_and_the_publish_confirmed(self) -> None:
        d = self.publish()
        self.broker.feed(_returned(1, Message(body=b"x"), None) + ack(1, 1))
        self.successResultOf(d)  # type: ignore[arg-type]
        d = self.publish()
        self.broker.feed(_returned(1, Message(body=b"x"), 99) + ack(1, 2))
        self.successResultOf(d)  # type: ignore[arg-type]

    def test_a_confirm_of_a_publish_given_up_on_is_ignored(self) -> None:
        d = self.publish(mandatory=False)
        d.cancel()  # type: ignore[attr-defined]
        self.failureResultOf(d, CancelledError)  # type: ignore[arg-type]
        self.broker.feed(ack(1, 1))
        self.assertEqual(self.t._publisher.pending, {})

    def test_a_basic_method_the_fast_path_does_not_take_goes_to_txamqp(self) -> None:
        self.broker.feed(deliver(1, 1, Message(body=b"stray")))  # logged and dropped by the delegate
        self.assertTrue(self.t.connected)
        self.assertFalse(self.broker.wire.disconnecting)

    def test_fail_all_skips_publishes_already_settled(self) -> None:
        d = self.publish()
        d.cancel()  # type: ignore[attr-defined]
        self.failureResultOf(d, CancelledError)  # type: ignore[arg-type]
        self.t._publisher.fail_all(lambda p: ConnectionLost("x"))

    def test_release_after_the_link_is_gone_writes_nothing(self) -> None:
        publisher = self.t._publisher
        self.broker.drop()
        publisher.release()
        self.assertFalse(publisher.open)
        self.assertNotIn("channel.close", self.broker.names(1))
        self.assertIsInstance(publisher, _PublishChannel)


class ConsumerChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.broker = self.h.up()
        self.got: List[AMQPDelivery] = []
        d = self.h.transport.consume("q", self.got.append)
        self.h.pump()
        self.consumer = self.successResultOf(d)
        self.state = self.consumer._channel

    def test_release_twice_closes_once(self) -> None:
        self.state.release()
        self.state.release()
        self.h.pump()
        self.assertEqual(self.broker.names(2).count("channel.close"), 1)

    def test_a_delivery_after_the_channel_closed_is_not_answered(self) -> None:
        self.state.delivering = False
        self.state.open = False
        self.broker.feed(deliver(2, 1, Message(body=b"x")))
        self.assertEqual(self.got, [])
        self.assertNotIn("basic.nack", self.broker.names(2))

    def test_a_cancel_when_the_link_is_gone_closes_nothing(self) -> None:
        self.broker.drop()
        d = self.h.transport._cancel_consumer(self.consumer)
        self.successResultOf(d)
        self.assertFalse(self.state.open)

    def test_a_cancel_the_broker_does_not_answer_is_bounded(self) -> None:
        self.broker.hold.add("basic.cancel")
        d = self.consumer.cancel()
        self.h.pump()
        self.assertNoResult(d)
        self.h.clock.advance(self.h.transport.close_timeout)
        self.h.pump()
        self.successResultOf(d)
        self.assertIn("channel.close", self.broker.names(2))


class HeldAckTests(SynchronousTestCase):
    """An ack made in a read that delivered nothing (an RPC server's request,
    acked once the confirm of its reply came) waits for the link's next write,
    bounded in time and by the prefetch; other acks go at the end of their read."""

    def setUp(self) -> None:
        self.h = Harness()
        self.broker = self.h.up()
        self.got: List[AMQPDelivery] = []
        d = self.h.transport.consume("q", self.got.append, prefetch=10)
        self.h.pump()
        self.consumer = self.successResultOf(d)
        self.h.pump()

    def _writes(self) -> List[bytes]:
        """Record every write to the link's transport from now on."""
        writes: List[bytes] = []
        wire = self.broker.wire
        write = wire.write
        wire.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
        return writes

    def _answered(self, tag: int) -> AMQPDelivery:
        """Deliver request C{tag}; the consumer publishes its reply while the
        delivery is read and acks the request once the reply is confirmed (as
        an RPC server on the bus does)."""

        def answer(delivery: AMQPDelivery) -> None:
            self.got.append(delivery)
            d = self.h.transport.publish("", "reply-to", Message(body=b"reply"))
            d.addCallback(lambda _: delivery.ack())

        self.consumer.on_delivery = answer
        self.broker.feed(deliver(2, tag, Message(body=b"request")))
        return self.got[-1]

    def _acked(self) -> List[int]:
        return [f["delivery_tag"] for c, n, f in self.broker.received if c == 2 and n == "basic.ack"]

    def test_an_ack_after_a_confirm_goes_out_with_the_next_write(self) -> None:
        self._answered(1)
        writes = self._writes()
        self.broker.feed(ack(1, 1))  # the reply's confirm: the request is done
        self.assertEqual(writes, [])  # no write of its own
        self.assertEqual(self._acked(), [])
        self._answered(2)  # the next reply's publish takes the ack along, in one write
        self.assertEqual(len(writes), 1)
        self.assertEqual(self._acked(), [1])
        self.assertEqual(self.broker.publishes[-1][0], 1)

    def test_a_held_ack_goes_out_within_ack_hold_when_nothing_else_is_written(self) -> None:
        self._answered(1)
        self.broker.feed(ack(1, 1))
        self.h.clock.advance(ACK_HOLD * 0.9)
        self.h.pump()
        self.assertEqual(self._acked(), [])
        self.h.clock.advance(ACK_HOLD * 0.1)
        self.h.pump()
        self.assertEqual(self._acked(), [1])
        self.assertIsNone(self.h.transport._protocol._ack_timer)  # no timer keeps going while idle

    def test_acks_of_a_read_that_delivered_go_out_at_its_end(self) -> None:
        self.consumer.on_delivery = lambda delivery: delivery.ack()  # a worker-queue consumer, synchronous
        self.broker.feed(deliver(2, 1, Message(body=b"a")) + deliver(2, 2, Message(body=b"b")))
        self.assertEqual([(n, f["delivery_tag"], f["multiple"]) for c, n, f in self.broker.received
                          if c == 2 and n == "basic.ack"], [("basic.ack", 2, True)])

    def test_an_ack_that_would_fill_the_prefetch_is_not_held(self) -> None:
        deliveries = [self._answered(tag) for tag in range(1, 11)]  # 10 unsettled: the prefetch
        self.assertEqual(len(deliveries), 10)
        self.broker.feed(ack(1, 10, multiple=True))  # every reply confirmed
        self.assertEqual([(f["delivery_tag"], f["multiple"]) for c, n, f in self.broker.received
                          if c == 2 and n == "basic.ack"], [(10, True)])  # at the end of the read

    def test_an_ack_while_another_request_is_unsettled_is_not_held(self) -> None:
        self._answered(1)
        self._answered(2)  # its reply not yet confirmed: the channel is busy
        self.broker.feed(ack(1, 1))
        self.assertEqual(self._acked(), [1])  # at the end of the read: it frees a place of the window now

    def test_two_acks_of_one_read_are_not_held(self) -> None:
        self._answered(1)
        self._answered(2)
        self.broker.feed(ack(1, 2, multiple=True))
        self.assertEqual([(f["delivery_tag"], f["multiple"]) for c, n, f in self.broker.received
                          if c == 2 and n == "basic.ack"], [(2, True)])

    def test_a_consumer_with_prefetch_1_never_holds_its_ack(self) -> None:
        self.consumer.prefetch = 1  # one held ack would stop the broker's deliveries to it
        self._answered(1)
        self.broker.feed(ack(1, 1))
        self.assertEqual(self._acked(), [1])

    def test_held_acks_go_before_a_cancel(self) -> None:
        self._answered(1)
        self.broker.feed(ack(1, 1))
        d = self.consumer.cancel()
        self.h.pump()
        self.successResultOf(d)
        names = self.broker.names(2)
        self.assertLess(names.index("basic.ack"), names.index("basic.cancel"))
        self.assertEqual(self._acked(), [1])

    def test_held_acks_die_with_the_link(self) -> None:
        self._answered(1)
        self.broker.feed(ack(1, 1))
        self.broker.drop()
        self.h.clock.advance(ACK_HOLD)
        self.assertEqual(self._acked(), [])  # the broker gives the request back: at least once


class NoAckConsumerTests(SynchronousTestCase):
    """A consumer with no_ack: the broker settles each message as it sends it,
    so nothing is ever acked or nacked on its channel (RabbitMQ would close
    the channel, 406 unknown delivery tag)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.broker = self.h.up()
        self.got: List[AMQPDelivery] = []
        d = self.h.transport.consume("replies", self.got.append, prefetch=0, no_ack=True)
        self.h.pump()
        self.consumer = self.successResultOf(d)

    def test_basic_consume_asks_for_no_ack(self) -> None:
        self.assertEqual([f["no_ack"] for f in self.h.sent("basic.consume")], [True])
        self.assertTrue(self.consumer.no_ack)

    def test_its_deliveries_are_never_acked_or_nacked(self) -> None:
        self.broker.feed(deliver(2, 1, Message(body=b"a")) + deliver(2, 2, Message(body=b"b")))
        self.got[0].ack()
        self.got[1].nack(requeue=True)
        self.h.clock.advance(ACK_HOLD)
        self.h.pump()
        self.assertEqual([d.message.body for d in self.got], [b"a", b"b"])
        self.assertEqual([n for n in self.broker.names(2) if n in ("basic.ack", "basic.nack")], [])
        self.assertEqual(self.consumer._channel.unsettled, 0)

    def test_a_delivery_after_the_cancel_is_dropped_and_the_channel_closes_at_once(self) -> None:
        self.broker.hold.add("basic.cancel")
        state = self.consumer._channel
        d = self.consumer.cancel()
        self.h.pump()
        self.broker.feed(deliver(2, 3, Message(body=b"late")))  # crossed the cancel on the wire
        self.assertEqual(self.got, [])
        self.assertNotIn("basic.nack", self.broker.names(2))
        self.broker.feed(self.broker.answer(*self.broker.held.pop()))
        self.successResultOf(d)
        self.assertFalse(state.open)  # nothing unsettled to wait for
        self.assertIn("channel.close", self.broker.names(2))
