"""magnet.testing itself: flush runs to quiescence, advance steps timer by
timer, loops are reported, the module docstring's example runs."""
from __future__ import annotations

import re
import textwrap
import unittest
from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import magnet
from magnet import Bus, Message, testing
from magnet.testing import MemoryBroker, NotQuiescent

from tests.fast.magnet.base import BusCase


class FlushTests(BusCase):
    def test_nothing_is_delivered_before_a_flush(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        got: List[Any] = []
        bus.consume("q", got.append)
        bus.send_json("q", 1)
        self.assertEqual(got, [])
        self.flush()
        self.assertEqual([m.json() for m in got], [1])

    def test_flush_runs_what_deliveries_cause(self) -> None:
        bus = self.bus()
        for name in ("a", "b", "c"):
            bus.declare_worker_queue(name)
        got: List[Any] = []
        bus.consume("a", lambda m: bus.send_json("b", m.json() + 1))
        bus.consume("b", lambda m: bus.send_json("c", m.json() + 1))
        bus.consume("c", lambda m: got.append(m.json()))
        bus.send_json("a", 1)
        self.flush()
        self.assertEqual(got, [3])

    def test_flush_does_not_move_time(self) -> None:
        self.bus()
        self.clock.advance(5)
        self.flush()
        self.assertEqual(self.clock.seconds(), 5)

    def test_flush_does_not_run_future_timers(self) -> None:
        fired: List[int] = []
        self.clock.callLater(1, fired.append, 1)
        self.assertEqual(self.flush(), 0)
        self.assertEqual(fired, [])

    def test_flush_counts_what_it_ran(self) -> None:
        fired: List[int] = []
        for i in range(3):
            self.clock.callLater(0, fired.append, i)
        self.assertEqual(self.flush(), 3)
        self.assertEqual(fired, [0, 1, 2])

    def test_a_message_that_never_settles_is_reported(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("loop")
        bus.consume_deliveries("loop", lambda m, d: d.nack(requeue=True))
        bus.send_json("loop", "again")
        with self.assertRaises(NotQuiescent) as raised:
            self.broker.flush(limit=50)
        self.assertIn("50 steps", str(raised.exception))
        bus.transport.delete_queue("loop")  # let the cleanup settle


class AdvanceTests(BusCase):
    def test_advance_moves_time_exactly(self) -> None:
        self.broker.advance(2.5)
        self.assertEqual(self.clock.seconds(), 2.5)

    def test_advance_refuses_to_go_back(self) -> None:
        self.assertRaises(ValueError, self.broker.advance, -1)

    def test_advance_runs_timers_in_order_with_deliveries_between(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        seen: List[Any] = []
        bus.consume("q", lambda m: seen.append(("got", m.json(), self.clock.seconds())))
        self.clock.callLater(1, lambda: bus.send_json("q", "first"))
        self.clock.callLater(2, lambda: seen.append(("timer", 2, self.clock.seconds())))
        self.broker.advance(3)
        self.assertEqual(seen, [("got", "first", 1), ("timer", 2, 2)])

    def test_advance_stops_short_of_later_timers(self) -> None:
        fired: List[float] = []
        self.clock.callLater(5, lambda: fired.append(self.clock.seconds()))
        self.broker.advance(4.999)
        self.assertEqual(fired, [])
        self.broker.advance(0.001)
        self.assertEqual(fired, [5])

    def test_timers_set_while_advancing_fire_if_due(self) -> None:
        fired: List[float] = []
        self.clock.callLater(1, lambda: self.clock.callLater(1, lambda: fired.append(self.clock.seconds())))
        self.broker.advance(2)
        self.assertEqual(fired, [2])

    def test_plain_clock_advance_delivers_too(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        got: List[Any] = []
        bus.consume("q", got.append)
        bus.send_json("q", 1)
        self.clock.advance(0)
        self.assertEqual(len(got), 1)


class BrokerTests(SynchronousTestCase):
    def test_a_clock_of_its_own_when_none_is_given(self) -> None:
        broker = MemoryBroker()
        self.assertIsInstance(broker.clock, Clock)

    def test_the_given_clock_drives_every_bus(self) -> None:
        clock = Clock()
        broker = MemoryBroker(clock)
        self.assertIs(broker.bus().clock, clock)

    def test_a_real_reactor_is_refused(self) -> None:
        self.assertRaises(TypeError, MemoryBroker, object())

    def test_buses_are_started_unless_asked_not_to(self) -> None:
        broker = MemoryBroker()
        self.assertTrue(broker.bus().running)
        idle = broker.bus(start=False)
        self.assertFalse(idle.running)
        self.failureResultOf(idle.declare_worker_queue("q"), magnet.NotConnected)

    def test_bus_options_reach_the_bus(self) -> None:
        bus = MemoryBroker().bus(node="n1", rpc_timeout=3, retry_limit=7)
        self.assertEqual((bus.node, bus.rpc_timeout, bus.retry_limit), ("n1", 3, 7))

    def test_each_bus_has_its_own_connection(self) -> None:
        broker = MemoryBroker()
        a, b = broker.bus(), broker.bus()
        self.assertIsNot(a.transport, b.transport)
        self.assertIs(a.transport.broker, b.transport.broker)

    def test_module_level_bus_has_a_broker_of_its_own(self) -> None:
        one, two = testing.bus(), testing.bus()
        self.assertIsInstance(one, Bus)
        self.assertIsNot(one.transport.broker, two.transport.broker)
        self.assertIn(one, one.transport.broker.buses)

    def test_stop_stops_every_bus(self) -> None:
        broker = MemoryBroker()
        buses = [broker.bus(), broker.bus()]
        self.successResultOf(broker.stop())
        self.assertFalse(any(b.running for b in buses))
        self.assertFalse(any(b.transport.connected for b in buses))

    def test_stop_waits_for_a_handler_in_flight_up_to_its_bound(self) -> None:
        from twisted.internet.defer import Deferred
        broker = MemoryBroker()
        bus = broker.bus(shutdown_timeout=4)
        bus.declare_worker_queue("q")
        bus.consume("q", lambda m: Deferred())
        bus.send_json("q", 1)
        broker.flush()
        stopped = broker.stop()
        self.assertNoResult(stopped)
        broker.advance(4)
        self.successResultOf(stopped)


class LookingInsideTests(BusCase):
    def test_ready_lists_what_waits_oldest_first(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        for i in range(3):
            bus.send_json("q", i)
        self.assertEqual([m.json() for m in self.broker.ready("q")], [0, 1, 2])
        self.assertEqual(self.broker.ready("no-such-queue"), [])

    def test_unacked_and_consumers(self) -> None:
        bus = self.bus()
        bus.declare_worker_queue("q")
        held: List[Any] = []
        bus.consume_deliveries("q", lambda m, d: held.append(d), prefetch=2)
        for i in range(3):
            bus.send_json("q", i)
        self.flush()
        self.assertEqual((self.broker.consumers("q"), self.broker.unacked("q"), len(self.broker.ready("q"))),
                         (1, 2, 1))
        held[0].ack()
        self.flush()
        self.assertEqual((self.broker.unacked("q"), len(self.broker.ready("q"))), (2, 0))
        self.assertEqual((self.broker.consumers("none"), self.broker.unacked("none")), (0, 0))

    def test_drop_link_gives_back_what_a_bus_held(self) -> None:
        worker, other = self.bus(), self.bus()
        worker.declare_worker_queue("q")
        worker.consume_deliveries("q", lambda m, d: None)
        worker.send_json("q", "job")
        self.flush()
        self.assertEqual(self.broker.unacked("q"), 1)
        self.broker.drop_link(worker)
        self.assertEqual([m.json() for m in self.broker.ready("q")], ["job"])
        got: List[Message] = []
        other.consume("q", got.append)
        self.flush()
        self.assertEqual([m.json() for m in got], ["job"])


class DocumentedExampleTests(SynchronousTestCase):
    """The example in magnet.testing's docstring is real code that passes."""

    def test_the_module_docstring_example_passes(self) -> None:
        found = re.search(r"tell the whole story::\n\n(.*?)\n\nSeveral", testing.__doc__ or "", re.S)
        self.assertIsNotNone(found, "the example is where the docstring says")
        namespace: dict = {}
        exec(compile(textwrap.dedent(found.group(1)), "magnet.testing example", "exec"), namespace)
        suite = unittest.TestLoader().loadTestsFromTestCase(namespace["EchoTests"])
        outcome = unittest.TestResult()
        suite.run(outcome)
        self.assertEqual((outcome.testsRun, outcome.errors, outcome.failures), (3, [], []))


class NoBrokerSwitchTests(SynchronousTestCase):
    """OOIDX_TEST_BROKER=none (the fast tier's setting): AMQP on the real
    reactor is refused at once; on a Clock (a contract test's scripted fake
    broker) it reaches nothing and is allowed."""

    def test_an_amqp_bus_is_refused_under_the_switch(self) -> None:
        from twisted.internet import reactor as real_reactor

        from tests.support import nobroker
        if not nobroker.forbidden():
            raise unittest.SkipTest("OOIDX_TEST_BROKER is not none")
        with self.assertRaises(nobroker.BrokerForbidden) as raised:
            magnet.connect("amqp://guest:guest@127.0.0.1:5672/", reactor=real_reactor)
        self.assertIn("OOIDX_TEST_BROKER=none", str(raised.exception))
        bus = magnet.connect("amqp://guest:guest@127.0.0.1:5672/", reactor=Clock())
        self.assertFalse(bus.running)

    def test_the_switch_reads_the_environment(self) -> None:
        from tests.support import nobroker
        self.assertTrue(nobroker.forbidden({"OOIDX_TEST_BROKER": " None "}))
        self.assertFalse(nobroker.forbidden({"OOIDX_TEST_BROKER": "private"}))
        self.assertFalse(nobroker.forbidden({}))
