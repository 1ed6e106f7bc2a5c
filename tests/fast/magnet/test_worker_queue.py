"""Worker queues: competing consumers, prefetch, ack after the handler, retry
and dead letters, cancelling, send confirms."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred, fail, succeed

import magnet
from magnet import Message
from magnet.bus import ATTEMPT_HEADER, DEAD_SUFFIX, ERROR_HEADER, ORIGIN_HEADER, SHARED_DEAD_LETTERS
from magnet.observer import BusObserver

from tests.fast.magnet.base import BusCase


class Recorder(BusObserver):
    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def message_in(self, name: str) -> None:
        self.calls.append(("in", name))

    def message_out(self, name: str) -> None:
        self.calls.append(("out", name))

    def handler_error(self, name: str) -> None:
        self.calls.append(("error", name))

    def dead_letter(self, name: str) -> None:
        self.calls.append(("dead", name))

    def inflight(self, name: str, delta: int) -> None:
        self.calls.append(("inflight", name, delta))


class CompetingConsumersTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.producer = self.bus()
        self.result(self.producer.declare_worker_queue("work"))

    def test_each_message_goes_to_exactly_one_consumer(self) -> None:
        got: List[tuple] = []
        for who in ("a", "b", "c"):
            self.bus().consume("work", lambda m, who=who: got.append((who, m.json())))
        for i in range(30):
            self.producer.send_json("work", i)
        self.flush()
        self.assertEqual(sorted(n for _, n in got), list(range(30)))

    def test_consumers_take_turns(self) -> None:
        got: List[str] = []
        for who in ("a", "b"):
            self.bus().consume("work", lambda m, who=who: got.append(who), prefetch=1)
        self.flush()
        for i in range(6):
            self.producer.send_json("work", i)
        self.flush()
        self.assertEqual(got.count("a"), 3)
        self.assertEqual(got.count("b"), 3)

    def test_a_busy_consumer_is_passed_over(self) -> None:
        got: List[tuple] = []
        self.bus().consume("work", lambda m: got.append(("slow", m.json())) or Deferred(), prefetch=1)
        self.bus().consume("work", lambda m: got.append(("fast", m.json())), prefetch=1)
        for i in range(5):
            self.producer.send_json("work", i)
        self.flush()
        self.assertEqual([w for w, _ in got].count("slow"), 1)
        self.assertEqual(sorted(n for _, n in got), list(range(5)))

    def test_messages_arrive_in_order_for_one_consumer(self) -> None:
        got: List[int] = []
        self.bus().consume("work", lambda m: got.append(m.json()))
        for i in range(20):
            self.producer.send_json("work", i)
        self.flush()
        self.assertEqual(got, list(range(20)))

    def test_messages_wait_for_a_consumer(self) -> None:
        for i in range(3):
            self.producer.send_json("work", i)
        self.flush()
        self.assertEqual(len(self.broker.ready("work")), 3)
        got: List[int] = []
        self.bus().consume("work", lambda m: got.append(m.json()))
        self.flush()
        self.assertEqual(got, [0, 1, 2])

    def test_declare_makes_the_dead_letter_queue_too(self) -> None:
        self.assertIn("work", self.broker.queues)
        self.assertIn("work" + DEAD_SUFFIX, self.broker.queues)
        self.assertEqual(self.producer.kind_of("work"), "worker")

    def test_declaring_twice_is_harmless(self) -> None:
        self.producer.send_json("work", 1)
        self.result(self.bus().declare_worker_queue("work"))
        self.assertEqual(len(self.broker.ready("work")), 1)


class AckTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.bus_ = self.bus()
        self.bus_.declare_worker_queue("q")

    def test_ack_only_after_the_handlers_deferred_fires(self) -> None:
        gate: Deferred = Deferred()
        seen: List[int] = []
        self.bus_.consume("q", lambda m: seen.append(m.json()) or (gate if len(seen) == 1 else None), prefetch=1)
        self.bus_.send_json("q", 1)
        self.bus_.send_json("q", 2)
        self.flush()
        self.assertEqual(seen, [1])
        self.assertEqual(self.broker.unacked("q"), 1)
        gate.callback(None)
        self.flush()
        self.assertEqual(seen, [1, 2])
        self.assertEqual(self.broker.unacked("q"), 0)

    def test_a_synchronous_handler_acks_at_once(self) -> None:
        self.bus_.consume("q", lambda m: "done")
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual((self.broker.unacked("q"), self.broker.ready("q")), (0, []))

    def test_prefetch_bounds_what_is_held(self) -> None:
        held: List[Deferred] = []

        def handle(m: Message) -> Deferred:
            held.append(Deferred())
            return held[-1]

        self.bus_.consume("q", handle, prefetch=3)
        for i in range(10):
            self.bus_.send_json("q", i)
        self.flush()
        self.assertEqual(len(held), 3)
        held[0].callback(None)
        self.flush()
        self.assertEqual(len(held), 4)

    def test_the_bus_prefetch_is_the_default(self) -> None:
        bus = self.bus(prefetch=2)
        bus.consume("q", lambda m: Deferred())
        for i in range(5):
            bus.send_json("q", i)
        self.flush()
        self.assertEqual(self.broker.unacked("q"), 2)

    def test_a_coroutine_handler_is_awaited(self) -> None:
        gate: Deferred = Deferred()
        done: List[int] = []

        async def handle(m: Message) -> None:
            await gate
            done.append(m.json())

        self.bus_.consume("q", handle)
        self.bus_.send_json("q", 7)
        self.flush()
        self.assertEqual((done, self.broker.unacked("q")), ([], 1))
        gate.callback(None)
        self.flush()
        self.assertEqual((done, self.broker.unacked("q")), ([7], 0))

    def test_consume_deliveries_leaves_settling_to_the_caller(self) -> None:
        held: List[Any] = []
        self.bus_.consume_deliveries("q", lambda m, d: held.append(d))
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(self.broker.unacked("q"), 1)
        held[0].ack()
        self.flush()
        self.assertEqual(self.broker.unacked("q"), 0)

    def test_consume_deliveries_nack_requeues_flagged(self) -> None:
        seen: List[Any] = []

        def handle(m: Message, d: Any) -> None:
            seen.append(d.redelivered)
            if len(seen) == 1:
                d.nack(requeue=True)
            else:
                d.ack()

        self.bus_.consume_deliveries("q", handle)
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(seen, [False, True])

    def test_consume_deliveries_nack_without_requeue_drops(self) -> None:
        self.bus_.consume_deliveries("q", lambda m, d: d.nack(requeue=False))
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual((self.broker.ready("q"), self.broker.unacked("q")), ([], 0))

    def test_settling_twice_is_a_no_op(self) -> None:
        held: List[Any] = []
        self.bus_.consume_deliveries("q", lambda m, d: held.append(d))
        self.bus_.send_json("q", 1)
        self.flush()
        held[0].ack()
        held[0].nack(requeue=True)
        held[0].ack()
        self.flush()
        self.assertEqual((len(held), self.broker.ready("q")), (1, []))

    def test_consume_deliveries_that_raises_is_retried(self) -> None:
        attempts: List[Any] = []

        def handle(m: Message, d: Any) -> None:
            attempts.append(m.headers.get(ATTEMPT_HEADER, 0))
            if len(attempts) == 1:
                raise ValueError("not now")
            d.ack()

        self.bus_.consume_deliveries("q", handle)
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(attempts, [0, 1])


class RetryAndDeadLetterTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.observer = Recorder()
        self.bus_ = self.bus(retry_limit=2, observer=self.observer)
        self.bus_.declare_worker_queue("q")
        self.dead: List[Message] = []
        self.bus_.consume("q" + DEAD_SUFFIX, self.dead.append)

    def test_a_failing_handler_is_retried_then_dead_lettered(self) -> None:
        attempts: List[Any] = []

        def handle(m: Message) -> None:
            attempts.append(m.headers.get(ATTEMPT_HEADER, 0))
            raise ValueError("cannot digest this")

        self.bus_.consume("q", handle)
        self.bus_.send_json("q", "poison")
        self.flush()
        self.assertEqual(attempts, [0, 1, 2])
        self.assertEqual([m.json() for m in self.dead], ["poison"])
        self.assertIn("ValueError: cannot digest this", self.dead[0].headers[ERROR_HEADER])
        self.assertEqual(self.dead[0].headers[ORIGIN_HEADER], "q")
        self.assertEqual(self.dead[0].headers[ATTEMPT_HEADER], 2)

    def test_a_failed_deferred_counts_as_a_failure(self) -> None:
        self.bus_.consume("q", lambda m: fail(KeyError("k")))
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(len(self.dead), 1)
        self.assertIn("KeyError", self.dead[0].headers[ERROR_HEADER])

    def test_the_consumer_keeps_running_after_a_dead_letter(self) -> None:
        good: List[Any] = []

        def handle(m: Message) -> None:
            if m.json() == "poison":
                raise ValueError("no")
            good.append(m.json())

        self.bus_.consume("q", handle)
        self.bus_.send_json("q", "poison")
        self.bus_.send_json("q", "fine")
        self.flush()
        self.assertEqual(good, ["fine"])
        self.assertEqual(len(self.dead), 1)

    def test_a_retry_that_succeeds_is_not_dead_lettered(self) -> None:
        attempts: List[int] = []

        def handle(m: Message) -> None:
            attempts.append(1)
            if len(attempts) < 2:
                raise ValueError("flaky")

        self.bus_.consume("q", handle)
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual((len(attempts), self.dead), (2, []))

    def test_an_undecodable_message_is_dead_lettered_at_once(self) -> None:
        calls: List[int] = []

        def handle(m: Message) -> None:
            calls.append(1)
            m.json()

        self.bus_.consume("q", handle)
        self.bus_.send("q", Message(body=b"{not json", content_type="application/json"))
        self.flush()
        self.assertEqual(calls, [1])
        self.assertEqual(self.dead[0].body, b"{not json")
        self.assertIn("BadMessage", self.dead[0].headers[ERROR_HEADER])
        self.assertNotIn(ATTEMPT_HEADER, self.dead[0].headers)

    def test_retry_limit_zero_dead_letters_on_the_first_failure(self) -> None:
        bus = self.bus(retry_limit=0)
        bus.declare_worker_queue("q")
        calls: List[int] = []
        bus.consume("q", lambda m: calls.append(1) or fail(ValueError("x")))
        bus.send_json("q", 1)
        self.flush()
        self.assertEqual((calls, len(self.dead)), ([1], 1))

    def test_the_error_header_is_bounded(self) -> None:
        self.bus_.consume("q", lambda m: fail(ValueError("x" * 5000)))
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(len(self.dead[0].headers[ERROR_HEADER]), 1000)

    def test_a_non_integer_attempt_header_counts_as_the_first(self) -> None:
        attempts: List[Any] = []

        def handle(m: Message) -> None:
            attempts.append(m.headers.get(ATTEMPT_HEADER))
            raise ValueError("x")

        self.bus_.consume("q", handle)
        self.bus_.send("q", Message.of_json(1, headers={ATTEMPT_HEADER: "lots"}))
        self.flush()
        self.assertEqual(attempts, ["lots", 1, 2])

    def test_the_observer_hears_of_errors_and_dead_letters(self) -> None:
        self.bus_.consume("q", lambda m: fail(ValueError("x")))
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(self.observer.calls.count(("error", "q")), 3)
        self.assertEqual(self.observer.calls.count(("dead", "q")), 1)
        self.assertIn(("out", "q"), self.observer.calls)

    def test_in_flight_goes_up_and_back_down(self) -> None:
        gate: Deferred = Deferred()
        self.bus_.consume("q", lambda m: gate)
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(self.bus_._inflight, 1)
        gate.callback(None)
        self.assertEqual(self.bus_._inflight, 0)
        self.assertIn(("inflight", "q", 1), self.observer.calls)
        self.assertIn(("inflight", "q", -1), self.observer.calls)

    def test_a_queue_that_is_not_a_worker_queue_dead_letters_to_the_shared_queue(self) -> None:
        self.result(self.bus_.transport.declare_queue("plain"))
        shared: List[Message] = []
        self.result(self.bus_.transport.declare_queue(SHARED_DEAD_LETTERS))
        self.bus_.consume(SHARED_DEAD_LETTERS, shared.append)
        self.bus_.consume("plain", lambda m: fail(ValueError("x")))
        self.bus_.send_json("plain", 1)
        self.flush()
        self.assertEqual([m.headers[ORIGIN_HEADER] for m in shared], ["plain"])

    def test_when_dead_lettering_fails_the_message_goes_back(self) -> None:
        bus = self.bus(retry_limit=0)
        bus.declare_worker_queue("q")
        publish = bus.transport.publish
        refused: List[str] = []

        def refusing(exchange: str, routing_key: str, message: Message, **kw: Any) -> Any:
            if routing_key.endswith(DEAD_SUFFIX) and not refused:
                refused.append(routing_key)
                return fail(magnet.NotConfirmed("the broker nacked it"))
            return publish(exchange, routing_key, message, **kw)

        bus.transport.publish = refusing  # type: ignore[method-assign]
        calls: List[bool] = []

        def handle(m: Message) -> Any:
            calls.append(m.json())
            return fail(ValueError("x")) if len(calls) == 1 else None

        bus.consume("q", handle)
        bus.send_json("q", "keep me")
        self.flush()
        # the dead-letter publish failed: the message is given back to the
        # broker and comes round again instead of being lost
        self.assertEqual(calls, ["keep me", "keep me"])
        self.assertEqual((self.broker.ready("q"), self.broker.unacked("q")), ([], 0))
        self.assertTrue(any("giving it back" in t for t in self.log_texts()))

    def test_a_dead_letter_queue_deleted_alone_is_declared_again_by_the_dead_letter(self) -> None:
        """(It used to be given back to the broker and come round for ever:
        tests/fast/magnet/test_dead_letter_queue_kept.py has the rest.)"""
        bus = self.bus(retry_limit=0)
        bus.declare_worker_queue("q")
        self.result(bus.transport.delete_queue("q" + DEAD_SUFFIX))
        bus.consume("q", lambda m: fail(ValueError("x")))
        bus.send_json("q", "keep me")
        self.flush()
        self.assertEqual([m.json() for m in self.dead], [])  # the consumer of the old one went with it
        self.assertEqual([entry[0].json() for entry in self.broker.queues["q" + DEAD_SUFFIX].ready], ["keep me"])
        self.assertEqual((self.broker.ready("q"), self.broker.unacked("q")), ([], 0))


class CancelTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.bus_ = self.bus()
        self.bus_.declare_worker_queue("q")

    def test_a_cancelled_subscription_gets_nothing_more(self) -> None:
        got: List[Any] = []
        sub = self.result(self.bus_.consume("q", got.append))
        self.result(sub.cancel())
        self.bus_.send_json("q", 1)
        self.flush()
        self.assertEqual(got, [])
        self.assertEqual(len(self.broker.ready("q")), 1)

    def test_cancel_twice_is_harmless(self) -> None:
        sub = self.result(self.bus_.consume("q", lambda m: None))
        self.result(sub.cancel())
        self.result(sub.cancel())
        self.assertTrue(sub.cancelled)

    def test_cancel_before_the_consumer_started(self) -> None:
        bus = self.bus(start=False)
        got: List[Any] = []
        d = bus.consume("q", got.append)
        self.failureResultOf(d, magnet.NotConnected)
        self.assertEqual(bus._subscriptions, set())

    def test_consuming_a_missing_queue_fails_clearly(self) -> None:
        f = self.failure(self.bus_.consume("nope", lambda m: None), magnet.MagnetError)
        self.assertIn("NOT_FOUND", str(f.value))
        self.assertEqual(self.bus_._subscriptions, set())


class SendTests(BusCase):
    def test_send_to_nowhere_is_unroutable(self) -> None:
        f = self.failure(self.bus().send_json("nowhere", 1), magnet.Unroutable)
        self.assertIn("nowhere", str(f.value))

    def test_send_not_mandatory_to_nowhere_is_dropped_quietly(self) -> None:
        self.assertIsNone(self.result(self.bus().send("nowhere", Message(b"x"), mandatory=False)))

    def test_send_confirms_at_once_in_process(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        d = bus.send_json("q", {"a": 1})
        self.assertIsNone(self.successResultOf(d))

    def test_send_on_a_stopped_bus_is_not_connected(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        self.result(bus.stopService())
        self.failure(bus.send_json("q", 1), magnet.NotConnected)

    def test_send_json_properties_reach_the_consumer(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        got: List[Message] = []
        bus.consume("q", got.append)
        bus.send_json("q", [1], correlation_id="c", type="t", headers={"h": 1})
        self.flush()
        self.assertEqual((got[0].correlation_id, got[0].type, got[0].headers["h"]), ("c", "t", 1))

    def test_a_withheld_confirm_times_out(self) -> None:
        from magnet.memory import HIGH_WATER_BYTES
        bus = self.bus(send_timeout=5)
        bus.declare_worker_queue("slow")
        big = Message(b"x" * (HIGH_WATER_BYTES + 1))
        d = bus.send("slow", big)
        self.flush()
        self.assertNoResult(d)
        self.broker.advance(5)
        f = self.failureResultOf(d, magnet.Timeout)
        self.assertIn("'slow'", str(f.value))
        self.assertEqual(len(bus._deadlines), 0)

    def test_a_withheld_confirm_fires_when_the_queue_drains(self) -> None:
        from magnet.memory import HIGH_WATER_BYTES
        bus = self.bus(send_timeout=5)
        bus.declare_worker_queue("slow")
        d = bus.send("slow", Message(b"x" * (HIGH_WATER_BYTES + 1)))
        bus.consume("slow", lambda m: None)
        self.flush()
        self.assertIsNone(self.successResultOf(d))
        self.broker.advance(10)
        self.assertEqual(len(bus._deadlines), 0)

    def test_many_sends_share_one_timer(self) -> None:
        from magnet.memory import HIGH_WATER_BYTES
        bus = self.bus(send_timeout=5)
        bus.declare_worker_queue("slow")
        bus.send("slow", Message(b"x" * (HIGH_WATER_BYTES + 1))).addErrback(lambda _: None)
        sends = [bus.send("slow", Message(b"y"), timeout=5) for _ in range(3)]
        for d in sends:
            d.addErrback(lambda _: None)
        self.flush()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.broker.advance(5)

    def test_to_a_fanout_by_its_name(self) -> None:
        bus = self.bus()
        bus.declare_fanout("f")
        got: List[Any] = []
        bus.subscribe("f", lambda m: got.append(m.json()))
        self.flush()
        self.result(bus.send_json("f", "x"))
        self.flush()
        self.assertEqual(got, ["x"])

    def test_succeed_and_plain_values_from_handlers_ack(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        bus.consume("q", lambda m: succeed(m.json()))
        bus.send_json("q", 1)
        self.flush()
        self.assertEqual(self.broker.unacked("q"), 0)
