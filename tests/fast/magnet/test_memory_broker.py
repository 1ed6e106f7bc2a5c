"""The in-process broker as a transport: RabbitMQ's semantics that the bus
relies on (requeue order, redelivery, exclusive and auto-delete queues,
x-max-length, single active consumer, flow control, channel errors)."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import magnet
from magnet import Message
from magnet.memory import HIGH_WATER_BYTES, MemoryTransport, broker_for, reset_brokers
from magnet.testing import MemoryBroker


class TransportCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = MemoryBroker()
        self.a = self.connect()
        self.b = self.connect()

    def connect(self) -> MemoryTransport:
        t = MemoryTransport(self.broker)
        t.start()
        return t

    def publish(self, queue: str, *bodies: bytes) -> None:
        for body in bodies:
            self.successResultOf(self.a.publish("", queue, Message(body)))


class QueueTests(TransportCase):
    def test_requeued_messages_keep_their_order_and_are_flagged(self) -> None:
        self.a.declare_queue("q")
        self.publish("q", b"0", b"1", b"2")
        held: List[Any] = []
        consumer = self.successResultOf(self.a.consume("q", held.append, prefetch=3))
        self.broker.flush()
        self.assertEqual([d.message.body for d in held], [b"0", b"1", b"2"])
        self.assertFalse(any(d.redelivered for d in held))
        for d in reversed(held):
            d.nack(requeue=True)
        consumer.cancel()
        again: List[Any] = []
        self.a.consume("q", again.append, prefetch=10)
        self.broker.flush()
        self.assertEqual([d.message.body for d in again], [b"0", b"1", b"2"])
        self.assertTrue(all(d.redelivered for d in again))

    def test_closing_a_connection_gives_back_what_it_held(self) -> None:
        self.a.declare_queue("jobs")
        self.publish("jobs", b"job")
        got_a: List[Any] = []
        self.a.consume("jobs", got_a.append)
        self.broker.flush()
        got_b: List[Any] = []
        self.b.consume("jobs", got_b.append)
        self.a.stop()
        self.broker.flush()
        self.assertEqual([d.message.body for d in got_b], [b"job"])
        self.assertTrue(got_b[0].redelivered)

    def test_a_cancelled_consumer_may_still_ack_what_it_holds(self) -> None:
        self.a.declare_queue("q")
        self.publish("q", b"x")
        held: List[Any] = []
        consumer = self.successResultOf(self.a.consume("q", held.append))
        self.broker.flush()
        self.successResultOf(consumer.cancel())
        held[0].ack()
        self.broker.flush()
        self.assertEqual(self.broker.ready("q"), [])

    def test_an_ack_after_the_connection_closed_is_ignored(self) -> None:
        self.a.declare_queue("q")
        self.publish("q", b"x")
        held: List[Any] = []
        self.a.consume("q", held.append)
        self.broker.flush()
        self.a.stop()
        held[0].ack()
        self.assertEqual([m.body for m in self.broker.ready("q")], [b"x"])

    def test_an_exclusive_queue_is_private_and_goes_with_its_connection(self) -> None:
        self.a.declare_queue("mine", exclusive=True, durable=False)
        f = self.failureResultOf(self.b.consume("mine", lambda d: None), magnet.MagnetError)
        self.assertIn("RESOURCE_LOCKED", str(f.value))
        self.failureResultOf(self.b.declare_queue("mine"), magnet.MagnetError)
        self.a.stop()
        self.assertNotIn("mine", self.broker.queues)

    def test_an_auto_delete_queue_goes_with_its_last_consumer(self) -> None:
        self.a.declare_queue("temp", auto_delete=True)
        self.assertIn("temp", self.broker.queues)  # never consumed: it stays
        c1 = self.successResultOf(self.a.consume("temp", lambda d: None))
        c2 = self.successResultOf(self.b.consume("temp", lambda d: None))
        c1.cancel()
        self.assertIn("temp", self.broker.queues)
        c2.cancel()
        self.assertNotIn("temp", self.broker.queues)

    def test_max_length_drops_the_oldest(self) -> None:
        self.a.declare_queue("bounded", arguments={"x-max-length": 2})
        self.publish("bounded", b"1", b"2", b"3")
        self.assertEqual([m.body for m in self.broker.ready("bounded")], [b"2", b"3"])

    def test_max_length_with_another_overflow_is_not_imitated(self) -> None:
        self.a.declare_queue("bounded", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        self.publish("bounded", b"1", b"2")
        self.assertEqual(len(self.broker.ready("bounded")), 2)

    def test_single_active_consumer_takes_everything_until_it_goes(self) -> None:
        self.a.declare_queue("sac", arguments={"x-single-active-consumer": True})
        got: List[tuple] = []
        first = self.successResultOf(self.a.consume("sac", lambda d: got.append(("a", d)) or d.ack()))
        self.b.consume("sac", lambda d: got.append(("b", d)) or d.ack())
        self.publish("sac", b"1", b"2", b"3")
        self.broker.flush()
        self.assertEqual([w for w, _ in got], ["a", "a", "a"])
        first.cancel()
        self.publish("sac", b"4")
        self.broker.flush()
        self.assertEqual(got[-1][0], "b")

    def test_a_full_single_active_consumer_is_not_bypassed(self) -> None:
        self.a.declare_queue("sac", arguments={"x-single-active-consumer": True})
        got: List[str] = []
        self.a.consume("sac", lambda d: got.append("a"), prefetch=1)
        self.b.consume("sac", lambda d: got.append("b"), prefetch=1)
        self.publish("sac", b"1", b"2")
        self.broker.flush()
        self.assertEqual(got, ["a"])

    def test_prefetch_zero_is_unbounded(self) -> None:
        self.a.declare_queue("q")
        self.publish("q", *[b"x"] * 50)
        held: List[Any] = []
        self.a.consume("q", held.append, prefetch=0)
        self.broker.flush()
        self.assertEqual(len(held), 50)

    def test_deleting_a_queue_drops_its_messages_and_consumers(self) -> None:
        self.a.declare_queue("q")
        self.publish("q", b"x")
        self.a.consume("q", lambda d: None)
        self.successResultOf(self.a.delete_queue("q"))
        self.assertNotIn("q", self.broker.queues)
        self.failureResultOf(self.a.publish("", "q", Message(b"y")), magnet.Unroutable)

    def test_deleting_a_queue_removes_its_bindings(self) -> None:
        self.a.declare_exchange("f")
        self.a.declare_queue("q")
        self.a.bind_queue("q", "f")
        self.a.delete_queue("q")
        self.assertEqual(self.broker.exchanges["f"][1], set())

    def test_a_consumer_that_raises_is_logged_and_the_broker_goes_on(self) -> None:
        self.a.declare_queue("q")
        self.publish("q", b"1", b"2")
        calls: List[int] = []

        def broken(d: Any) -> None:
            calls.append(1)
            raise RuntimeError("consumer broke")

        self.a.consume("q", broken)
        self.broker.flush()
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_a_fanout_copies_to_every_bound_queue(self) -> None:
        self.a.declare_exchange("f", "fanout")
        for q in ("x", "y"):
            self.a.declare_queue(q)
            self.a.bind_queue(q, "f", "ignored-key")
        self.successResultOf(self.a.publish("f", "any", Message(b"m")))
        self.assertEqual((len(self.broker.ready("x")), len(self.broker.ready("y"))), (1, 1))

    def test_one_message_object_reaches_every_consumer(self) -> None:
        self.a.declare_exchange("f", "fanout")
        got: List[Any] = []
        for q in ("x", "y"):
            self.a.declare_queue(q)
            self.a.bind_queue(q, "f")
            self.a.consume(q, got.append)
        message = Message(b"m")
        self.a.publish("f", "", message)
        self.broker.flush()
        self.assertIs(got[0].message, message)
        self.assertIs(got[1].message, message)


class FlowControlTests(TransportCase):
    def test_confirms_are_withheld_above_high_water_and_released_below_low(self) -> None:
        self.a.declare_queue("slow")
        chunk = Message(b"x" * (256 * 1024))
        confirms = [self.a.publish("", "slow", chunk) for _ in range(40)]
        confirmed = sum(1 for d in confirms if d.called)
        self.assertLessEqual(confirmed, HIGH_WATER_BYTES // len(chunk.body) + 1)
        self.assertLess(confirmed, 40)
        taken: List[Any] = []
        self.a.consume("slow", lambda d: taken.append(d) or d.ack(), prefetch=0)
        self.broker.flush()
        self.assertEqual(len(taken), 40)
        self.assertTrue(all(d.called for d in confirms))

    def test_deleting_a_queue_releases_withheld_confirms(self) -> None:
        self.a.declare_queue("slow")
        d = self.a.publish("", "slow", Message(b"x" * (HIGH_WATER_BYTES + 1)))
        self.assertNoResult(d)
        self.a.delete_queue("slow")
        self.successResultOf(d)


class ConnectionTests(TransportCase):
    def test_a_transport_that_is_not_started_refuses_everything(self) -> None:
        t = MemoryTransport(self.broker)
        for d in (t.declare_queue("q"), t.declare_exchange("e"), t.bind_queue("q", "e"), t.delete_queue("q"),
                  t.publish("", "q", Message(b"")), t.consume("q", lambda d: None), t.when_connected()):
            self.failureResultOf(d, magnet.NotConnected)

    def test_link_listeners_hear_up_and_down(self) -> None:
        t = MemoryTransport(self.broker)
        heard: List[bool] = []
        t.add_link_listener(heard.append)
        t.start()
        self.successResultOf(t.when_connected())
        t.stop()
        t.stop()
        self.assertEqual(heard, [True, False])

    def test_a_channel_error_on_declaring_is_a_failure_not_an_exception(self) -> None:
        self.a.declare_exchange("e", "fanout")
        f = self.failureResultOf(self.a.declare_exchange("e", "direct"), magnet.MagnetError)
        self.assertIn("PRECONDITION_FAILED", str(f.value))


class URLTests(SynchronousTestCase):
    def setUp(self) -> None:
        reset_brokers()
        self.addCleanup(reset_brokers)

    def test_one_broker_per_memory_url_name(self) -> None:
        clock = Clock()
        self.assertIs(broker_for("memory://x", clock), broker_for("memory://x/", clock))
        self.assertIsNot(broker_for("memory://x", clock), broker_for("memory://y", clock))

    def test_reset_forgets_every_broker(self) -> None:
        clock = Clock()
        before = broker_for("memory://x", clock)
        reset_brokers()
        self.assertIsNot(broker_for("memory://x", clock), before)

    def test_connect_to_a_memory_url_on_a_clock(self) -> None:
        clock = Clock()
        one = magnet.connect("memory://shared", reactor=clock)
        two = magnet.connect("memory://shared", reactor=clock)
        one.startService()
        two.startService()
        one.declare_worker_queue("q")
        got: List[Any] = []
        two.consume("q", got.append)
        one.send_json("q", 1)
        clock.advance(0)
        self.assertEqual([m.json() for m in got], [1])

    def test_bad_urls_are_refused_clearly(self) -> None:
        for url in ("", "nonsense", "ftp://host/", 42, [], ["nonsense"]):
            self.assertRaises(magnet.BadURL, magnet.transport_for, url, Clock())

    def test_transport_options_do_not_reach_the_bus(self) -> None:
        bus = magnet.connect("memory://opts", reactor=Clock(), rpc_timeout=3)
        self.assertEqual(bus.rpc_timeout, 3)


class NoAckTests(TransportCase):
    def test_a_no_ack_consumer_holds_nothing(self) -> None:
        self.a.declare_queue("replies", durable=False, exclusive=True)
        got: List[Any] = []
        consumer = self.successResultOf(self.a.consume("replies", got.append, prefetch=1, no_ack=True))
        self.publish("replies", b"0", b"1", b"2")
        self.broker.flush()
        self.assertEqual([d.message.body for d in got], [b"0", b"1", b"2"])  # no prefetch: nothing to ack
        self.assertEqual(consumer.unacked, {})
        got[0].nack(requeue=True)  # does nothing: it left the queue settled
        self.successResultOf(consumer.cancel())
        again: List[Any] = []
        self.a.consume("replies", again.append)
        self.broker.flush()
        self.assertEqual(again, [])
