"""L{AMQPTransport}'s contract against a scripted broker (L{FakeBroker}) on a
fake endpoint and a Clock: what the transport sends, and what it does with
what the broker answers (declare-ok, consume-ok, deliveries, confirms,
basic.return, channel.close, basic.cancel, a lost link).

L{Harness} is shared with the connection, channels and publishing contract
tests: the transport's C{_endpoint} is replaced by one that, per attempt,
fails, hangs, or builds the protocol over a StringTransport with a
L{FakeBroker} on the other side.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import AMQPConsumer, AMQPDelivery, AMQPTransport, ChannelError, from_url
from magnet.amqp.wire import BrokerURL, _content_frames, decode_properties, publish_seq
from magnet.errors import ConnectionLost, NotConfirmed, NotConnected, Timeout, Unroutable
from magnet.message import Message
from tests.fast.magnet.test_amqp_protocol_contract import FakeBroker, ack, deliver, method


class _Endpoint:
    def __init__(self, harness: "Harness", url: BrokerURL) -> None:
        self.harness = harness
        self.url = url

    def connect(self, factory: Any) -> Deferred:
        h = self.harness
        h.attempts.append(self.url.host)
        outcome = h.script.pop(0) if h.script else "ok"
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        if outcome == "hang":
            d: Deferred = Deferred()
            h.hanging.append(d)
            return d
        proto = factory.buildProtocol(None)
        broker = FakeBroker(proto, **(outcome if isinstance(outcome, dict) else h.broker_options))
        h.brokers.append(broker)
        return defer.succeed(proto)


class Harness:
    """An L{AMQPTransport} on a Clock whose every connection attempt goes to L{_Endpoint}."""

    def __init__(self, urls: Union[str, Sequence[str]] = "amqp://guest:guest@broker/", *,
                 script: Optional[List[Any]] = None, **options: Any) -> None:
        self.clock = Clock()
        options.setdefault("heartbeat", 0)
        options.setdefault("operation_timeout", 5.0)
        options.setdefault("backoff", lambda n: float(n))
        self.transport = AMQPTransport(urls, reactor=self.clock, **options)
        self.script: List[Any] = list(script or [])
        self.attempts: List[str] = []
        self.hanging: List[Deferred] = []
        self.brokers: List[FakeBroker] = []
        self.broker_options: Dict[str, Any] = {}
        self.links: List[bool] = []
        self.transport.add_link_listener(self.links.append)
        self.transport._endpoint = lambda url: _Endpoint(self, url)  # type: ignore[method-assign]

    @property
    def broker(self) -> FakeBroker:
        return self.brokers[-1]

    def pump(self) -> None:
        self.broker.pump()

    def up(self) -> FakeBroker:
        """Start (if not yet) and let the attempt in progress through the handshake and setup."""
        self.transport.start()
        self.pump()
        assert self.transport.connected, self.broker.received
        return self.broker

    def sent(self, name: str, broker: Optional[FakeBroker] = None) -> List[Dict[str, Any]]:
        return [f for _, n, f in (broker or self.broker).received if n == name]


class LinkSetupTests(SynchronousTestCase):
    def test_the_link_counts_as_up_once_the_publishing_channel_confirms(self) -> None:
        h = Harness()
        h.transport.start()
        self.assertFalse(h.transport.connected)
        broker = h.up()
        self.assertEqual(broker.names(1), ["channel.open", "confirm.select"])
        self.assertEqual(h.links, [True])
        self.assertIsNotNone(h.transport._publisher)
        self.assertEqual(h.transport._publisher.id, 1)
        self.successResultOf(h.transport.when_connected())
        self.assertIn("connected=True", repr(h.transport))

    def test_from_url_builds_one(self) -> None:
        transport = from_url(["amqp://a/", "amqp://b/"], Clock(), heartbeat=3)
        self.assertEqual([u.host for u in transport.urls], ["a", "b"])
        self.assertEqual(transport.heartbeat, 3)
        self.assertFalse(transport.connected)


class DeclarationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.broker = self.h.up()

    def test_declarations_go_out_on_one_control_channel(self) -> None:
        t = self.h.transport
        d1 = t.declare_queue("q", durable=False, exclusive=True, auto_delete=True, arguments={"x-max-length": 5})
        d2 = t.declare_exchange("ex", "topic", durable=False)
        d3 = t.bind_queue("q", "ex", "a.#")
        self.h.pump()
        for d in (d1, d2, d3):
            self.assertIsNone(self.successResultOf(d))
        [queue] = self.h.sent("queue.declare")
        self.assertEqual((queue["queue"], queue["durable"], queue["exclusive"], queue["auto_delete"],
                          queue["arguments"]), ("q", False, True, True, {"x-max-length": 5}))
        [exchange] = self.h.sent("exchange.declare")
        self.assertEqual((exchange["exchange"], exchange["type"], exchange["durable"]), ("ex", "topic", False))
        [bind] = self.h.sent("queue.bind")
        self.assertEqual((bind["queue"], bind["exchange"], bind["routing_key"]), ("q", "ex", "a.#"))
        self.assertEqual(self.broker.names(2), ["channel.open", "queue.declare", "exchange.declare", "queue.bind"])
        self.assertEqual(list(t._topology), [("queue", "q"), ("exchange", "ex"), ("bind", "q", "ex", "a.#")])

    def test_a_refusal_is_a_channel_error_and_the_next_declaration_opens_a_fresh_channel(self) -> None:
        t = self.h.transport
        self.broker.refuse["queue.declare"] = (406, "PRECONDITION_FAILED - inequivalent arg 'durable'")
        d = t.declare_queue("q")
        self.h.pump()
        error = self.failureResultOf(d, ChannelError).value
        self.assertEqual(error.reply_code, 406)
        self.assertNotIn(("queue", "q"), t._topology)
        del self.broker.refuse["queue.declare"]
        d = t.declare_queue("q")
        self.h.pump()
        self.successResultOf(d)
        self.assertEqual(self.broker.names(3), ["channel.open", "queue.declare"])

    def test_an_unknown_exchange_kind_is_refused_at_once(self) -> None:
        self.failureResultOf(self.h.transport.declare_exchange("e", "bogus"), ValueError)

    def test_a_declaration_the_broker_does_not_answer_times_out_and_drops_the_link(self) -> None:
        self.broker.hold.add("queue.declare")
        d = self.h.transport.declare_queue("q")
        self.h.pump()
        self.h.clock.advance(5)
        self.h.pump()
        self.assertTrue(self.broker.protocol.lost)
        self.failureResultOf(d, Timeout)

    def test_delete_queue_and_exchange_forget_them(self) -> None:
        t = self.h.transport
        for d in (t.declare_queue("q"), t.declare_exchange("e"), t.bind_queue("q", "e"), t.declare_queue("r"),
                  t.bind_queue("r", "e", "k")):
            self.h.pump()
            self.successResultOf(d)
        d = t.delete_queue("q")
        self.h.pump()
        self.successResultOf(d)
        self.assertEqual(list(t._topology), [("exchange", "e"), ("queue", "r"), ("bind", "r", "e", "k")])
        d = t.delete_exchange("e")
        self.h.pump()
        self.successResultOf(d)
        self.assertEqual(list(t._topology), [("queue", "r")])
        self.assertEqual([f["queue"] for f in self.h.sent("queue.delete")], ["q"])
        self.assertEqual([f["exchange"] for f in self.h.sent("exchange.delete")], ["e"])

    def test_the_topology_is_declared_again_in_order_after_a_reconnect(self) -> None:
        t = self.h.transport
        for d in (t.declare_exchange("e", "direct"), t.declare_queue("q"), t.bind_queue("q", "e", "k")):
            self.h.pump()
            self.successResultOf(d)
        self.broker.drop()
        self.assertFalse(t.connected)
        self.assertEqual(self.h.links, [True, False])
        self.h.clock.advance(0)  # reconnects at once after a loss
        self.h.pump()
        self.assertTrue(t.connected)
        second = self.h.broker
        self.assertIsNot(second, self.broker)
        self.assertEqual([n for n in second.names() if n.split(".")[0] in ("queue", "exchange")],
                         ["exchange.declare", "queue.declare", "queue.bind"])
        self.assertEqual(self.h.links, [True, False, True])

    def test_a_refused_replay_step_is_logged_and_the_link_stays(self) -> None:
        t = self.h.transport
        d = t.declare_queue("q")
        self.h.pump()
        self.successResultOf(d)
        self.broker.drop()
        self.h.script.append({})
        self.h.clock.advance(0)
        self.h.broker.refuse["queue.declare"] = (403, "ACCESS_REFUSED")
        self.h.pump()
        self.assertTrue(t.connected)

    def test_a_locked_exclusive_queue_is_declared_again_until_the_broker_lets_go(self) -> None:
        t = self.h.transport
        d = t.declare_queue("q", exclusive=True)
        self.h.pump()
        self.successResultOf(d)
        self.broker.drop()
        self.h.clock.advance(0)
        second = self.h.broker
        second.refuse["queue.declare"] = (405, "RESOURCE_LOCKED")
        second.pump()
        self.assertFalse(t.connected)
        del second.refuse["queue.declare"]
        self.h.clock.advance(0.2)
        second.pump()
        self.assertTrue(t.connected)
        self.assertEqual(len(self.h.sent("queue.declare", second)), 2)

    def test_an_operation_interrupted_by_a_link_loss_runs_again_on_the_next_link(self) -> None:
        t = self.h.transport
        self.broker.hold.add("queue.declare")
        d = t.declare_queue("q")
        self.h.pump()
        self.broker.drop()
        self.h.clock.advance(0)
        self.h.pump()
        # it waits a moment (never spinning while the old link goes), then runs on the new one
        self.h.clock.advance(0.05)
        self.h.pump()
        self.successResultOf(d)
        self.assertEqual(len(self.h.sent("queue.declare")), 1)


class ConsumerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.broker = self.h.up()
        self.got: List[AMQPDelivery] = []

    def consume(self, on_delivery: Any = None, prefetch: int = 3) -> AMQPConsumer:
        d = self.h.transport.consume("q", on_delivery or self.got.append, prefetch=prefetch)
        self.h.pump()
        return self.successResultOf(d)

    def test_consume_sets_qos_then_consumes_on_a_channel_of_its_own(self) -> None:
        consumer = self.consume(prefetch=7)
        self.assertTrue(consumer.active)
        self.assertEqual(self.broker.names(2), ["channel.open", "basic.qos", "basic.consume"])
        self.assertEqual(self.h.sent("basic.qos")[0]["prefetch_count"], 7)
        sent = self.h.sent("basic.consume")[0]
        self.assertEqual((sent["queue"], sent["no_ack"]), ("q", False))
        self.assertIn("prefetch=7 active=True", repr(consumer))

    def test_a_prefetch_out_of_range_is_refused(self) -> None:
        self.failureResultOf(self.h.transport.consume("q", self.got.append, prefetch=70000), ValueError)

    def test_deliveries_reach_the_consumer_and_are_acked_or_nacked_once(self) -> None:
        self.consume()
        message = Message(body=b"hello", headers={"h": "v"}, content_type="text/plain", correlation_id="c")
        self.broker.feed(deliver(2, 1, message, exchange="e", routing_key="k", redelivered=True)
                         + deliver(2, 2, Message(body=b"")))
        first, second = self.got
        self.assertEqual(first.message, message)
        self.assertEqual((first.queue, first.exchange, first.routing_key, first.redelivered), ("q", "e", "k", True))
        self.assertIn("tag=1", repr(first))
        self.assertEqual(second.message.body, b"")
        first.ack()
        first.ack()
        second.nack(requeue=False)
        second.nack()
        self.h.pump()
        settled = [(n, f["delivery_tag"]) for c, n, f in self.broker.received
                   if c == 2 and n in ("basic.ack", "basic.nack")]
        self.assertEqual(settled, [("basic.ack", 1), ("basic.nack", 2)])

    def acks(self) -> List[Any]:
        return [(f["delivery_tag"], f["multiple"]) for c, n, f in self.broker.received
                if c == 2 and n == "basic.ack"]

    def test_the_deliveries_of_one_read_acked_at_once_go_out_as_one_multiple_ack(self) -> None:
        self.consume(lambda d: d.ack())
        self.broker.feed(deliver(2, 1, Message(body=b"a")) + deliver(2, 2, Message(body=b"b"))
                         + deliver(2, 3, Message(body=b"c")))
        self.h.pump()
        self.assertEqual(self.acks(), [(3, True)])
        self.broker.feed(deliver(2, 4, Message(body=b"d")))  # one delivery: a plain ack
        self.h.pump()
        self.assertEqual(self.acks(), [(3, True), (4, False)])

    def test_acks_are_one_by_one_while_a_delivery_of_the_channel_is_unsettled(self) -> None:
        held: List[AMQPDelivery] = []

        def on_delivery(delivery: AMQPDelivery) -> None:
            if delivery.message.body == b"hold":
                held.append(delivery)
            else:
                delivery.ack()

        self.consume(on_delivery)
        self.broker.feed(deliver(2, 1, Message(body=b"hold")) + deliver(2, 2, Message(body=b"a"))
                         + deliver(2, 3, Message(body=b"b")))
        self.h.pump()
        self.assertEqual(self.acks(), [(2, False), (3, False)])  # a multiple ack of 3 would ack 1 too
        held[0].ack()  # outside a read: at once
        self.h.pump()
        self.assertEqual(self.acks(), [(2, False), (3, False), (1, False)])

    def test_a_nack_in_the_same_read_goes_out_before_the_multiple_ack(self) -> None:
        def on_delivery(delivery: AMQPDelivery) -> None:
            if delivery.message.body == b"bad":
                delivery.nack(requeue=False)
            else:
                delivery.ack()

        self.consume(on_delivery)
        self.broker.feed(deliver(2, 1, Message(body=b"a")) + deliver(2, 2, Message(body=b"bad"))
                         + deliver(2, 3, Message(body=b"c")))
        self.h.pump()
        settled = [(n, f["delivery_tag"], f.get("multiple")) for c, n, f in self.broker.received
                   if c == 2 and n in ("basic.ack", "basic.nack")]
        self.assertEqual(settled, [("basic.nack", 2, False), ("basic.ack", 3, True)])

    def test_acks_of_a_read_go_out_before_the_channel_closes(self) -> None:
        consumer = self.consume()
        self.broker.feed(deliver(2, 1, Message(body=b"x")))
        cancelled = consumer.cancel()
        self.h.pump()
        self.successResultOf(cancelled)
        # acked once its reply is confirmed (as an RPC server does): during the read of the confirm
        d = self.h.transport.publish("", "reply", Message(body=b"r"))
        d.addCallback(lambda _: self.got[0].ack())
        self.h.pump()
        self.broker.feed(ack(1, 1))
        self.h.pump()
        self.assertEqual(self.broker.names(2)[-2:], ["basic.ack", "channel.close"])

    def test_a_body_in_several_frames(self) -> None:
        self.consume()
        self.broker.feed(method(2, "basic.deliver", delivery_tag=1, exchange="", routing_key="q")
                         + b"".join(_content_frames(
                             2, Message(body=b"x" * 10000), None, 4096)))
        self.assertEqual(self.got[0].message.body, b"x" * 10000)

    def test_a_consumer_that_raises_gets_the_message_again(self) -> None:
        def boom(delivery: AMQPDelivery) -> None:
            raise RuntimeError("consumer bug")

        self.consume(boom)
        self.broker.feed(deliver(2, 5, Message(body=b"x")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [nacked] = self.h.sent("basic.nack")
        self.assertEqual((nacked["delivery_tag"], nacked["requeue"]), (5, True))

    def test_cancel_closes_the_channel_once_what_it_holds_is_settled(self) -> None:
        consumer = self.consume()
        self.broker.feed(deliver(2, 1, Message(body=b"x")))
        d = consumer.cancel()
        self.h.pump()
        self.successResultOf(d)
        self.assertFalse(consumer.active)
        self.assertEqual(self.h.sent("basic.cancel")[0]["consumer_tag"], self.broker.consumer_tags[2])
        self.assertNotIn("channel.close", self.broker.names(2))
        # a delivery already on its way goes straight back
        self.broker.feed(deliver(2, 2, Message(body=b"late")))
        self.assertEqual(len(self.got), 1)
        self.got[0].ack()
        self.h.pump()
        self.assertEqual(self.broker.names(2)[-3:], ["basic.nack", "basic.ack", "channel.close"])
        self.successResultOf(consumer.cancel())  # twice is fine

    def test_the_consumer_resumes_on_the_next_link(self) -> None:
        consumer = self.consume()
        self.broker.drop()
        self.assertFalse(consumer.active)
        self.h.clock.advance(0)
        self.h.pump()
        self.assertTrue(consumer.active)
        self.assertEqual(len(self.h.sent("basic.consume")), 1)
        self.h.broker.feed(deliver(2, 1, Message(body=b"again")))
        self.assertEqual(self.got[0].message.body, b"again")

    def test_an_ack_after_the_link_is_gone_is_dropped(self) -> None:
        self.consume()
        self.broker.feed(deliver(2, 1, Message(body=b"x")))
        self.broker.drop()
        self.got[0].ack()
        self.assertEqual(self.h.sent("basic.ack"), [])

    def test_a_consumer_cancelled_while_the_link_is_down(self) -> None:
        consumer = self.consume()
        self.broker.drop()
        self.successResultOf(consumer.cancel())
        self.h.clock.advance(0)
        self.h.pump()
        self.assertEqual(self.h.sent("basic.consume"), [])

    def test_a_consumer_channel_closed_by_the_broker_resumes_after_a_moment(self) -> None:
        consumer = self.consume()
        self.broker.feed(method(2, "channel.close", reply_code=406, reply_text="PRECONDITION_FAILED - unknown tag"))
        self.assertFalse(consumer.active)
        self.h.clock.advance(0.1)
        self.h.pump()
        self.assertTrue(consumer.active)
        self.assertEqual(len(self.h.sent("basic.consume")), 2)

    def test_a_refused_consume_fails_and_its_channel_is_closed(self) -> None:
        self.broker.refuse["basic.consume"] = (404, "NOT_FOUND - no queue 'q'")
        d = self.h.transport.consume("q", self.got.append)
        self.h.pump()
        self.assertEqual(self.failureResultOf(d, ChannelError).value.reply_code, 404)
        self.assertEqual(self.h.transport._consumers, {})

    def test_the_brokers_cancel_of_a_queue_declared_here_declares_it_again(self) -> None:
        t = self.h.transport
        d = t.declare_queue("q")
        self.h.pump()
        self.successResultOf(d)
        consumer = self.consume()
        channel = consumer._channel.id
        self.broker.feed(method(channel, "basic.cancel", consumer_tag=self.broker.consumer_tags[channel]))
        self.assertFalse(consumer.active)
        self.h.clock.advance(AMQPTransport.REDECLARE_DELAY)
        self.h.pump()
        self.assertTrue(consumer.active)
        self.assertEqual(len(self.h.sent("queue.declare")), 2)
        self.assertEqual(len(self.h.sent("basic.consume")), 2)

    def test_the_brokers_cancel_of_a_queue_declared_elsewhere_waits_for_its_declaration(self) -> None:
        consumer = self.consume()
        channel = consumer._channel.id
        self.broker.feed(method(channel, "basic.cancel", consumer_tag="x"))
        self.h.clock.advance(AMQPTransport.REDECLARE_DELAY)
        self.h.pump()
        self.assertFalse(consumer.active)
        d = self.h.transport.declare_queue("q")
        self.h.pump()
        self.successResultOf(d)
        self.assertTrue(consumer.active)

    def test_stop_cancels_a_pending_redeclare(self) -> None:
        t = self.h.transport
        d = t.declare_queue("q")
        self.h.pump()
        consumer = self.consume()
        self.broker.feed(method(consumer._channel.id, "basic.cancel", consumer_tag="x"))
        stopped = t.stop()
        self.h.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])
        self.successResultOf(d)


class PublishTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(nack_retries=2)
        self.broker = self.h.up()

    def publish(self, body: bytes = b"x", mandatory: bool = True, exchange: str = "ex") -> Deferred:
        d = self.h.transport.publish(exchange, "rk", Message(body=body), mandatory=mandatory)
        self.h.pump()
        return d

    def test_a_publish_fires_on_its_confirm(self) -> None:
        d = self.publish(b"hello", mandatory=False)
        [(channel, fields)] = self.broker.publishes
        self.assertEqual((channel, fields["exchange"], fields["routing_key"], fields["mandatory"]),
                         (1, "ex", "rk", False))
        self.assertNoResult(d)
        self.broker.feed(ack(1, 1))
        self.assertIsNone(self.successResultOf(d))

    def test_a_mandatory_publish_no_queue_took_is_unroutable(self) -> None:
        d = self.publish()
        header = [f for c, n, f in self.broker.received if n == "header"][-1]
        self.assertEqual(publish_seq(header["raw"], 12, len(header["raw"])), 1)
        self.assertEqual(decode_properties(header["raw"], 12, b"")[0].headers, {})  # not in a header
        self.broker.feed(method(1, "basic.return", reply_code=312, reply_text="NO_ROUTE", exchange="ex",
                                routing_key="rk")
                         + b"".join(_content_frames(
                             1, Message(body=b"x"), 1, 4096))
                         + ack(1, 1))
        failure = self.failureResultOf(d, Unroutable)
        self.assertIn("312 NO_ROUTE", str(failure.value))

    def test_a_publish_to_a_missing_exchange_is_unroutable_and_the_channel_reopens(self) -> None:
        d = self.publish(exchange="nope")
        self.broker.feed(method(1, "channel.close", reply_code=404, reply_text="NOT_FOUND - no exchange 'nope'"))
        self.failureResultOf(d, Unroutable)
        self.h.pump()
        publisher = self.h.transport._publisher
        self.assertIsNotNone(publisher)
        self.assertNotEqual(publisher.id, 1)
        d = self.publish()
        self.broker.feed(ack(publisher.id, 1))
        self.successResultOf(d)

    def test_a_refused_publish_is_sent_again_on_a_fresh_channel(self) -> None:
        d = self.publish()
        self.broker.feed(method(1, "basic.nack", delivery_tag=1))
        self.h.pump()
        fresh = self.h.transport._publisher
        self.assertNotEqual(fresh.id, 1)
        self.assertEqual(self.h.transport.publishers_replaced, 1)
        self.h.clock.advance(0.05)
        self.h.pump()
        self.assertEqual([c for c, _ in self.broker.publishes], [1, fresh.id])
        self.broker.feed(ack(fresh.id, 1))
        self.successResultOf(d)
        self.assertEqual(self.h.transport.nacked, 1)
        self.assertIn("channel.close", self.broker.names(1))  # the refusing channel is retired

    def test_a_publish_refused_every_time_fails_after_the_retries(self) -> None:
        d = self.publish()
        channels = []
        for _ in range(3):  # nack_retries=2: the first refusal and two more
            channel = self.broker.publishes[-1][0]
            channels.append(channel)
            self.broker.feed(method(channel, "basic.nack", delivery_tag=1))  # each fresh channel counts from 1
            self.h.clock.advance(1)
            self.h.pump()
        self.assertEqual(len(set(channels)), 3)  # each time on a fresh channel
        self.assertIn("basic.nack, 3 times", str(self.failureResultOf(d, NotConfirmed).value))
        self.assertEqual(self.h.transport.nacked, 3)

    def test_confirms_of_several_publishes_at_once(self) -> None:
        ds = [self.publish(mandatory=False) for _ in range(3)]
        self.broker.feed(ack(1, 2, multiple=True))
        self.successResultOf(ds[0])
        self.successResultOf(ds[1])
        self.assertNoResult(ds[2])
        self.broker.feed(ack(1, 0, multiple=True))  # 0 with multiple: everything so far
        self.successResultOf(ds[2])
        self.broker.feed(ack(1, 99))  # an unknown tag is ignored

    def test_publishes_awaiting_a_confirm_fail_when_the_link_goes(self) -> None:
        d = self.publish()
        self.broker.drop()
        failure = self.failureResultOf(d, ConnectionLost)
        self.assertIn("before the confirm", str(failure.value))

    def test_a_publish_while_the_link_is_down_waits_for_it(self) -> None:
        self.broker.drop()
        self.h.script.append("hang")
        d = self.h.transport.publish("ex", "rk", Message(body=b"x"))
        self.h.clock.advance(0)
        self.assertNoResult(d)
        self.h.hanging.pop().errback(ConnectionRefusedError())
        self.h.clock.advance(1)  # backoff(1)
        self.h.pump()
        self.assertEqual(len(self.h.broker.publishes), 1)
        self.h.broker.feed(ack(1, 1))
        self.successResultOf(d)

    def test_a_publish_with_no_link_in_time_is_notconnected(self) -> None:
        self.broker.drop()
        self.h.script.extend(["hang"])
        d = self.h.transport.publish("ex", "rk", Message(body=b"x"))
        self.h.clock.advance(5)
        failure = self.failureResultOf(d, NotConnected)
        self.assertIn("within 5.0 s", str(failure.value))

    def test_headers_too_large_for_a_frame_fail_that_publish_only(self) -> None:
        d = self.h.transport.publish("ex", "rk", Message(body=b"", headers={"k": "v" * 200000}))
        self.failureResultOf(d, ValueError)
        self.assertTrue(self.h.transport.connected)


class StopTests(SynchronousTestCase):
    def test_stop_closes_the_connection_cleanly(self) -> None:
        h = Harness()
        broker = h.up()
        d = h.transport.stop()
        h.pump()
        self.successResultOf(d)
        self.assertEqual(broker.names(0)[-1], "connection.close")
        self.assertTrue(broker.protocol.lost)
        self.assertFalse(h.transport.connected)
        self.successResultOf(h.transport.stop())  # again: fires too
        self.failureResultOf(h.transport.when_connected(), NotConnected)

    def test_stop_is_bounded_when_the_broker_does_not_answer(self) -> None:
        h = Harness(close_timeout=3.0)
        broker = h.up()
        broker.hold.add("connection.close")
        d = h.transport.stop()
        broker.pump()
        self.assertNoResult(d)
        h.clock.advance(3)  # no close-ok: the socket is closed
        self.assertTrue(broker.wire.disconnecting)
        h.clock.advance(2)  # and not gone: aborted
        self.successResultOf(d)

    def test_stop_fails_waiters_and_drops_an_attempt_in_progress(self) -> None:
        h = Harness(script=["hang"])
        h.transport.start()
        waiter = h.transport.when_connected(timeout=10)
        d = h.transport.stop()
        self.successResultOf(d)
        self.failureResultOf(waiter, NotConnected)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_while_the_handshake_is_under_way(self) -> None:
        h = Harness(script=[{"handshake": False}])
        h.transport.start()
        h.pump()
        d = h.transport.stop()
        h.pump()
        self.successResultOf(d)
        self.assertTrue(h.broker.protocol.lost)
        h.clock.advance(60)
        self.assertEqual(h.attempts, ["broker"])
