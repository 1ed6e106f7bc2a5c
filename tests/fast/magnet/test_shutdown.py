"""Stopping a bus: in-flight handlers finish (bounded by the clock), what
arrives meanwhile goes back, nothing is lost."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred

from magnet import Message

from tests.fast.magnet.base import BusCase


class ShutdownTests(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.producer = self.bus()
        self.worker = self.bus(shutdown_timeout=5)
        self.producer.declare_worker_queue("q")

    def test_stop_waits_for_the_handler_in_flight(self) -> None:
        gate: Deferred = Deferred()
        self.worker.consume("q", lambda m: gate)
        self.producer.send_json("q", "job")
        self.flush()
        stopped = self.worker.stopService()
        self.flush()
        self.assertNoResult(stopped)
        gate.callback(None)
        self.flush()
        self.successResultOf(stopped)
        self.assertEqual((self.broker.ready("q"), self.broker.unacked("q")), ([], 0))

    def test_a_handler_that_outlives_the_bound_is_given_back(self) -> None:
        self.worker.consume("q", lambda m: Deferred())
        self.producer.send_json("q", "job")
        self.flush()
        stopped = self.worker.stopService()
        self.broker.advance(4.9)
        self.assertNoResult(stopped)
        self.broker.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual([m.json() for m in self.broker.ready("q")], ["job"])
        self.assertTrue(any("still running after 5" in t for t in self.log_texts()))

    def test_what_arrives_while_stopping_goes_back_to_the_queue(self) -> None:
        gate: Deferred = Deferred()
        seen: List[Any] = []
        self.worker.consume("q", lambda m: seen.append(m.json()) or gate, prefetch=1)
        self.producer.send_json("q", 1)
        self.flush()
        self.worker.stopService()
        self.producer.send_json("q", 2)
        self.flush()
        gate.callback(None)
        self.flush()
        self.assertEqual(seen, [1])
        self.assertEqual([m.json() for m in self.broker.ready("q")], [2])

    def test_a_stopped_bus_can_start_again(self) -> None:
        self.result(self.worker.stopService())
        self.worker.startService()
        got: List[Message] = []
        self.result(self.worker.consume("q", got.append))
        self.producer.send_json("q", 1)
        self.flush()
        self.assertEqual(len(got), 1)

    def test_stop_with_nothing_in_flight_is_immediate(self) -> None:
        self.worker.consume("q", lambda m: None)
        self.flush()
        self.successResultOf(self.worker.stopService())
        self.assertEqual(self.broker.consumers("q"), 0)
