"""A worker queue's dead-letter queue deleted alone (issue 17, scenario 3;
`rabbitmqctl delete_queue fetcher.dead`), on memory:// with time on the
broker's clock: the bus declares it again, from its periodic check (and
after a reconnect) or when a message to dead-letter finds it gone, logs it
once, counts it; a poison message sent afterwards lands in it. The memory
broker deletes a dead-letter queue as RabbitMQ does: it is gone from
existing_queues, and a mandatory publish to it is unroutable."""
from __future__ import annotations

from typing import Any, List

import magnet
from magnet import Message, Unroutable
from magnet.bus import DEAD_SUFFIX, ERROR_HEADER, ORIGIN_HEADER
from magnet.observer import BusObserver
from magnet.transport import DEFAULT_EXCHANGE

from tests.fast.magnet.base import BusCase


class Restarts(BusObserver):
    def __init__(self) -> None:
        self.restarts: List[tuple] = []

    def consumer_restarted(self, queue: str, reason: str) -> None:
        self.restarts.append((queue, reason))


def poison(message: Message) -> None:
    raise ValueError("cannot digest this")


class DeadLetterQueueKeptTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.observer = Restarts()

    def serving(self, **options: Any) -> magnet.Bus:
        bus = self.bus(retry_limit=1, observer=self.observer, **options)
        self.result(bus.declare_worker_queue("q"))
        self.result(bus.consume("q", poison))
        return bus

    def dead_letters(self) -> List[Message]:
        queue = self.broker.queues.get("q" + DEAD_SUFFIX)
        return [] if queue is None else [entry[0] for entry in queue.ready]

    def redeclared_lines(self) -> List[str]:
        return [t for t in self.log_texts() if "dead-letter queue 'q.dead'" in t and "declaring it again" in t]

    def test_the_memory_broker_deletes_a_dead_letter_queue_as_rabbitmq_does(self) -> None:
        bus = self.bus()
        self.result(bus.declare_worker_queue("q"))
        self.broker.delete_queue("q" + DEAD_SUFFIX)
        self.assertEqual(self.result(bus.transport.existing_queues(["q", "q.dead"])), {"q"})
        self.failure(bus.transport.publish(DEFAULT_EXCHANGE, "q.dead", Message(body=b"x"), mandatory=True),
                     Unroutable)

    def test_the_periodic_check_declares_it_again(self) -> None:
        bus = self.serving(dead_letter_check=5.0)
        self.broker.delete_queue("q" + DEAD_SUFFIX)
        self.broker.advance(4.9)
        self.assertNotIn("q.dead", self.broker.queues)
        self.broker.advance(0.2)
        self.assertIn("q.dead", self.broker.queues)
        self.assertEqual(self.observer.restarts, [("q", "dead_letter_queue")])
        self.assertEqual(bus.dead_letter_queues_redeclared, 1)
        self.assertEqual(len(self.redeclared_lines()), 1)
        # the next checks find it: nothing more is declared, logged or counted
        self.broker.advance(20)
        self.assertEqual((bus.dead_letter_queues_redeclared, len(self.redeclared_lines())), (1, 1))
        # a poison message sent afterwards is dead-lettered into it
        bus.send_json("q", "poison")
        self.flush()
        self.assertEqual([m.json() for m in self.dead_letters()], ["poison"])
        self.assertEqual(self.dead_letters()[0].headers[ORIGIN_HEADER], "q")
        self.assertIn("cannot digest this", self.dead_letters()[0].headers[ERROR_HEADER])

    def test_a_message_to_dead_letter_that_finds_it_gone_declares_it_and_lands(self) -> None:
        bus = self.serving(dead_letter_check=0)  # no periodic check: the dead-letter publish alone
        self.broker.delete_queue("q" + DEAD_SUFFIX)
        bus.send_json("q", "poison")
        self.flush()
        self.assertEqual([m.json() for m in self.dead_letters()], ["poison"])
        self.assertEqual(self.observer.restarts, [("q", "dead_letter_queue")])
        self.assertEqual(len(self.redeclared_lines()), 1)
        self.assertEqual(self.broker.queues["q"].ready, type(self.broker.queues["q"].ready)())  # acked, not looping

    def test_a_reconnect_checks_at_once(self) -> None:
        bus = self.serving(dead_letter_check=60.0)
        self.broker.delete_queue("q" + DEAD_SUFFIX)
        for listener in list(bus.transport._listeners):
            listener(True)  # the link (re)made
        self.flush()
        self.assertIn("q.dead", self.broker.queues)
        self.assertEqual(bus.dead_letter_queues_redeclared, 1)

    def test_only_the_worker_queues_consumed_here_are_kept(self) -> None:
        bus = self.bus(dead_letter_check=5.0, observer=self.observer)
        self.result(bus.declare_worker_queue("other"))  # declared, not consumed here
        self.result(bus.subscribe("news", lambda m: None))  # a fanout's queue: dead letters are shared
        self.broker.delete_queue("other" + DEAD_SUFFIX)
        self.broker.advance(30)
        self.assertNotIn("other.dead", self.broker.queues)
        self.assertEqual(self.observer.restarts, [])

    def test_no_check_after_the_bus_stops(self) -> None:
        bus = self.serving(dead_letter_check=5.0)
        self.result(bus.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_checks_as_often_as_the_heartbeat(self) -> None:
        bus = magnet.connect("memory://kept-" + self.id(), self.clock, heartbeat=7)
        self.assertEqual(bus.dead_letter_check, 7)
        self.assertEqual(magnet.connect("memory://kept2-" + self.id(), self.clock).dead_letter_check, 30.0)
