"""Fanouts (every subscriber a copy) and listen addresses (private, shared,
named, durable), with get() waits on the clock."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import CancelledError

import magnet
from magnet import Message
from magnet.bus import DURABLE_ADDRESS_ARGUMENTS, SHARED_DEAD_LETTERS

from tests.fast.magnet.base import BusCase


class FanoutTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.sender = self.bus()
        self.result(self.sender.declare_fanout("news"))

    def subscribe(self, inbox: List[Any], bus: Any = None) -> Any:
        return self.result((bus or self.bus()).subscribe("news", lambda m: inbox.append(m.json())))

    def test_every_subscriber_gets_a_copy(self) -> None:
        inboxes: List[List[Any]] = [[], [], []]
        for inbox in inboxes:
            self.subscribe(inbox)
        for i in range(5):
            self.sender.send_json("news", i)
        self.flush()
        self.assertEqual(inboxes, [[0, 1, 2, 3, 4]] * 3)

    def test_two_subscriptions_on_one_bus_each_get_a_copy(self) -> None:
        a: List[Any] = []
        b: List[Any] = []
        bus = self.bus()
        self.subscribe(a, bus)
        self.subscribe(b, bus)
        self.sender.send_json("news", "x")
        self.flush()
        self.assertEqual((a, b), (["x"], ["x"]))

    def test_a_subscriber_gets_only_what_is_sent_after_it_subscribed(self) -> None:
        early: List[Any] = []
        self.subscribe(early)
        self.sender.send_json("news", "before")
        self.flush()
        late: List[Any] = []
        self.subscribe(late)
        self.sender.send_json("news", "after")
        self.flush()
        self.assertEqual((early, late), (["before", "after"], ["after"]))

    def test_a_fanout_nobody_listens_to_is_unroutable(self) -> None:
        self.failure(self.sender.send_json("news", "nobody listens"), magnet.Unroutable)

    def test_not_mandatory_to_an_empty_fanout_is_fine(self) -> None:
        self.assertIsNone(self.result(self.sender.send("news", Message(b"x"), mandatory=False)))

    def test_cancelled_subscriber_gets_no_more(self) -> None:
        a: List[Any] = []
        b: List[Any] = []
        sub = self.subscribe(a)
        self.subscribe(b)
        self.result(sub.cancel())
        self.sender.send_json("news", 1)
        self.flush()
        self.assertEqual((a, b), ([], [1]))

    def test_a_subscription_queue_is_private_and_goes_with_its_bus(self) -> None:
        subscriber = self.bus(node="sub")
        self.subscribe([], subscriber)
        names = [n for n in self.broker.queues if n.startswith("news.sub.sub.")]
        self.assertEqual(len(names), 1)
        self.result(subscriber.stopService())
        self.assertEqual([n for n in self.broker.queues if n.startswith("news.sub.")], [])
        self.failure(self.sender.send_json("news", 1), magnet.Unroutable)

    def test_one_slow_subscriber_does_not_hold_up_another(self) -> None:
        from twisted.internet.defer import Deferred
        fast: List[Any] = []
        self.result(self.bus().subscribe("news", lambda m: Deferred(), prefetch=1))
        self.subscribe(fast)
        for i in range(5):
            self.sender.send_json("news", i)
        self.flush()
        self.assertEqual(fast, [0, 1, 2, 3, 4])

    def test_a_failing_subscriber_dead_letters_to_the_shared_queue(self) -> None:
        bus = self.bus(retry_limit=1)
        letters: List[Message] = []
        self.result(bus.transport.declare_queue(SHARED_DEAD_LETTERS))
        bus.consume(SHARED_DEAD_LETTERS, letters.append)
        calls: List[int] = []

        def handle(m: Message) -> None:
            calls.append(1)
            raise ValueError("subscriber broke")

        self.result(bus.subscribe("news", handle))
        self.sender.send_json("news", 1)
        self.flush()
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(letters), 1)
        self.assertIn("subscriber broke", letters[0].headers["x-magnet-error"])

    def test_subscribing_declares_the_fanout(self) -> None:
        bus = self.bus()
        got: List[Any] = []
        self.result(bus.subscribe("fresh", lambda m: got.append(m.json())))
        self.assertEqual(bus.kind_of("fresh"), "fanout")
        self.result(bus.send_json("fresh", 1))
        self.flush()
        self.assertEqual(got, [1])

    def test_a_name_cannot_be_a_fanout_and_a_direct_exchange(self) -> None:
        f = self.failure(self.sender.transport.declare_exchange("news", "direct"), magnet.MagnetError)
        self.assertIn("PRECONDITION_FAILED", str(f.value))


class DirectExchangeTests(BusCase):
    """Routing by key (the nearest magnet's brokers come to topic routing:
    pattern matching of topics is ooidx's pub_sub, above the bus)."""

    def setUp(self) -> None:
        super().setUp()
        self.t = self.bus().transport
        self.result(self.t.declare_exchange("events", "direct"))
        for q in ("saved", "fetched"):
            self.result(self.t.declare_queue(q))
            self.result(self.t.bind_queue(q, "events", q))

    def test_a_key_reaches_only_the_queue_bound_with_it(self) -> None:
        self.result(self.t.publish("events", "saved", Message(b"1")))
        self.assertEqual((len(self.broker.ready("saved")), len(self.broker.ready("fetched"))), (1, 0))

    def test_a_key_nothing_is_bound_with_is_unroutable(self) -> None:
        self.failure(self.t.publish("events", "deleted", Message(b"1")), magnet.Unroutable)

    def test_one_queue_bound_with_two_keys(self) -> None:
        self.result(self.t.bind_queue("saved", "events", "also"))
        self.result(self.t.publish("events", "also", Message(b"1")))
        self.assertEqual(len(self.broker.ready("saved")), 1)

    def test_two_queues_bound_with_one_key_both_get_it(self) -> None:
        self.result(self.t.bind_queue("fetched", "events", "saved"))
        self.result(self.t.publish("events", "saved", Message(b"1")))
        self.assertEqual((len(self.broker.ready("saved")), len(self.broker.ready("fetched"))), (1, 1))

    def test_publishing_to_an_unknown_exchange_fails(self) -> None:
        f = self.failure(self.t.publish("nope", "k", Message(b"1")), magnet.MagnetError)
        self.assertIn("NOT_FOUND", str(f.value))

    def test_binding_to_unknown_things_fails(self) -> None:
        self.failure(self.t.bind_queue("missing", "events", "k"), magnet.MagnetError)
        self.failure(self.t.bind_queue("saved", "missing", "k"), magnet.MagnetError)

    def test_an_unknown_exchange_type_is_refused(self) -> None:
        f = self.failure(self.t.declare_exchange("t", "topic"), magnet.MagnetError)
        self.assertIn("topic", str(f.value))

    def test_a_deleted_exchange_routes_nothing(self) -> None:
        self.result(self.t.delete_exchange("events"))
        self.failure(self.t.publish("events", "saved", Message(b"1")), magnet.MagnetError)


class ListenTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.owner, self.sender = self.bus(node="owner", rpc_timeout=3), self.bus()

    def test_messages_wait_to_be_taken_in_order(self) -> None:
        listener = self.result(self.owner.listen())
        for i in range(3):
            self.sender.send_json(listener.address, i)
        self.flush()
        self.assertEqual([self.result(listener.get()).json() for _ in range(3)], [0, 1, 2])

    def test_get_before_the_message_arrives(self) -> None:
        listener = self.result(self.owner.listen())
        d = listener.get()
        self.assertNoResult(d)
        self.sender.send_json(listener.address, "hi")
        self.assertEqual(self.result(d).json(), "hi")

    def test_get_times_out_on_the_bus_rpc_timeout(self) -> None:
        listener = self.result(self.owner.listen())
        d = listener.get()
        self.broker.advance(2.9)
        self.assertNoResult(d)
        self.broker.advance(0.1)
        f = self.failureResultOf(d, magnet.Timeout)
        self.assertIn(listener.address, str(f.value))

    def test_a_timed_out_get_takes_nothing_later(self) -> None:
        listener = self.result(self.owner.listen())
        late = listener.get(timeout=1)
        self.broker.advance(1)
        self.failureResultOf(late, magnet.Timeout)
        self.sender.send_json(listener.address, "kept")
        self.assertEqual(self.result(listener.get()).json(), "kept")

    def test_a_cancelled_get_takes_nothing(self) -> None:
        listener = self.result(self.owner.listen())
        d = listener.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.sender.send_json(listener.address, "kept")
        self.assertEqual(self.result(listener.get()).json(), "kept")

    def test_waiting_messages_are_held_unacknowledged(self) -> None:
        listener = self.result(self.owner.listen(prefetch=2))
        for i in range(5):
            self.sender.send_json(listener.address, i)
        self.flush()
        self.assertEqual((self.broker.unacked(listener.address), len(self.broker.ready(listener.address))), (2, 3))
        self.result(listener.get())
        self.flush()
        self.assertEqual(self.broker.unacked(listener.address), 2)

    def test_a_handler_gets_every_message(self) -> None:
        got: List[Any] = []
        listener = self.result(self.owner.listen(lambda m: got.append(m.json())))
        for i in range(3):
            self.sender.send_json(listener.address, i)
        self.flush()
        self.assertEqual(got, [0, 1, 2])

    def test_addresses_are_unique_and_name_the_node(self) -> None:
        a, b = self.result(self.owner.listen()), self.result(self.owner.listen())
        self.assertNotEqual(a.address, b.address)
        self.assertTrue(a.address.startswith("magnet.listen.owner."))

    def test_a_private_address_is_refused_to_other_consumers(self) -> None:
        listener = self.result(self.owner.listen())
        f = self.failure(self.sender.consume(listener.address, lambda m: None), magnet.MagnetError)
        self.assertIn("RESOURCE_LOCKED", str(f.value))

    def test_a_private_address_goes_with_its_bus(self) -> None:
        listener = self.result(self.owner.listen())
        self.result(self.owner.stopService())
        self.failure(self.sender.send_json(listener.address, 1), magnet.Unroutable)

    def test_close_deletes_the_address(self) -> None:
        listener = self.result(self.owner.listen())
        self.result(listener.close())
        self.failure(self.sender.send_json(listener.address, 1), magnet.Unroutable)
        self.assertNotIn(listener, self.owner._private_listeners)

    def test_a_named_address(self) -> None:
        listener = self.result(self.owner.listen(name="my.inbox"))
        self.assertEqual(listener.address, "my.inbox")
        self.result(self.sender.send_json("my.inbox", 1))

    def test_a_shared_address_has_competing_consumers(self) -> None:
        got: List[tuple] = []
        shared = self.result(self.owner.listen(lambda m: got.append(("owner", m.json())), shared=True))
        self.result(self.sender.consume(shared.address, lambda m: got.append(("other", m.json())), prefetch=1))
        for i in range(20):
            self.sender.send_json(shared.address, i)
        self.flush()
        self.assertEqual(sorted(n for _, n in got), list(range(20)))
        self.assertEqual({who for who, _ in got}, {"owner", "other"})
        self.result(shared.close())
        self.failure(self.sender.send_json(shared.address, "gone"), magnet.Unroutable)

    def test_a_durable_address_keeps_messages_while_nobody_consumes(self) -> None:
        listener = self.result(self.owner.listen(name="durable.inbox", durable=True))
        self.result(listener.subscription.cancel())
        self.result(self.sender.send_json("durable.inbox", "kept"))
        again = self.result(self.bus().listen(name="durable.inbox", durable=True))
        self.assertEqual(self.result(again.get()).json(), "kept")

    def test_a_durable_address_outlives_its_bus(self) -> None:
        self.result(self.owner.listen(name="durable.inbox", durable=True))
        self.result(self.owner.stopService())
        self.result(self.sender.send_json("durable.inbox", "kept"))
        self.assertEqual(len(self.broker.ready("durable.inbox")), 1)

    def test_declare_address_makes_it_single_active_consumer(self) -> None:
        self.result(self.owner.declare_address("named.sub"))
        self.assertEqual(self.broker.queues["named.sub"].arguments, DURABLE_ADDRESS_ARGUMENTS)
        self.assertTrue(self.broker.queues["named.sub"].durable)

    def test_durable_consumers_take_turns_as_one_active(self) -> None:
        got: List[tuple] = []
        first = self.result(self.owner.listen(lambda m: got.append(("first", m.json())), name="d", durable=True))
        self.result(self.bus().listen(lambda m: got.append(("second", m.json())), name="d", durable=True))
        for i in range(4):
            self.sender.send_json("d", i)
        self.flush()
        self.assertEqual({w for w, _ in got}, {"first"})
        self.result(first.subscription.cancel())
        self.sender.send_json("d", 9)
        self.flush()
        self.assertEqual(got[-1], ("second", 9))

    def test_listen_on_a_stopped_bus_fails(self) -> None:
        bus = self.bus(start=False)
        self.failure(bus.listen(), magnet.NotConnected)

    def test_a_listener_handler_that_fails_is_retried_then_dead_lettered(self) -> None:
        bus = self.bus(retry_limit=1)
        letters: List[Message] = []
        self.result(bus.transport.declare_queue(SHARED_DEAD_LETTERS))
        bus.consume(SHARED_DEAD_LETTERS, letters.append)
        calls: List[int] = []
        listener = self.result(bus.listen(lambda m: calls.append(1) or 1 / 0))
        self.sender.send_json(listener.address, 1)
        self.flush()
        self.assertEqual((len(calls), len(letters)), (2, 1))
        self.assertEqual(letters[0].headers["x-magnet-origin"], listener.address)
