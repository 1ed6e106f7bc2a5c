"""Consumer liveness (magnet.amqp.liveness), without a broker.

Right after the link is set up, and then every liveness interval, the
transport asks the broker how many consumers each queue it consumes has (a
passive queue.declare, answered here by hand), consumes again what is
missing, restarts what the broker does not count, and logs and counts every
restart (consumer_restarts, the observer's consumer_restarted, and so
magnet_consumer_restarts_total in /metrics).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from txamqp.client import Closed

from magnet.amqp import AMQPConsumer, AMQPTransport, _ConsumerChannel
from magnet.observer import BusObserver

from tests.support.amqp_link import URL, link


class Observer(BusObserver):
    def __init__(self) -> None:
        self.restarts: List[Tuple[str, str]] = []

    def consumer_restarted(self, queue: str, reason: str) -> None:
        self.restarts.append((queue, reason))


class FakeControlChannel:
    """Takes passive queue.declares; the test answers them."""

    def __init__(self) -> None:
        self.declares: List[Tuple[str, Deferred]] = []

    def queue_declare(self, queue: str, passive: bool = False, **_: Any) -> Deferred:
        assert passive, "the check only ever declares passively"
        d: Deferred = Deferred()
        self.declares.append((queue, d))
        return d


def not_found(queue: str) -> Closed:
    return Closed(SimpleNamespace(fields=[404, f"NOT_FOUND - no queue '{queue}' in vhost '/'"]))


class LivenessTests(SynchronousTestCase):
    INTERVAL = 10.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.observer = Observer()
        self.transport = AMQPTransport(URL, reactor=self.clock, heartbeat=self.INTERVAL, observer=self.observer)
        self.proto, _ = link(self.transport, self.clock)
        self.control = FakeControlChannel()
        self.drop_link: List[bool] = []
        self.transport._control_call = self._control_call  # type: ignore[method-assign]
        self.started: List[str] = []
        self.transport._start_consumer = self._start_consumer  # type: ignore[method-assign]
        self.closed: List[Any] = []
        self.proto.close_channel = lambda ch: (self.closed.append(ch), defer.succeed(None))[1]  # type: ignore
        self.channels = 0

    def _control_call(self, protocol: Any, call: Any, drop_link: bool = True) -> Deferred:
        self.drop_link.append(drop_link)
        return call(self.control)

    def _start_consumer(self, protocol: Any, consumer: AMQPConsumer) -> Deferred:
        """What basic.consume does: the consumer delivers on a fresh channel."""
        self.assertIs(protocol, self.proto)
        self.started.append(consumer.queue)
        self._attach(consumer)
        return defer.succeed(consumer)

    def _attach(self, consumer: AMQPConsumer) -> _ConsumerChannel:
        self.channels += 1
        state = _ConsumerChannel(self.proto, self.channels, consumer, f"tag{self.channels}")
        state.txchannel = f"channel {self.channels}"
        self.proto.fast[self.channels] = state
        consumer._channel, consumer.active = state, True
        return state

    def consumer(self, queue: str, active: bool = True) -> AMQPConsumer:
        self.transport._topology[("queue", queue)] = ("queue", queue, {})
        consumer = AMQPConsumer(self.transport, queue, lambda delivery: None, 10)
        self.transport._consumers[id(consumer)] = consumer
        if active:
            self._attach(consumer)
        return consumer

    def answer(self, *counts: Any) -> None:
        """Answer the pending passive declares in order: a consumer count, or an exception."""
        for count in counts:
            queue, d = self.control.declares.pop(0)
            if isinstance(count, Exception):
                d.errback(count)
            else:
                d.callback(SimpleNamespace(queue=queue, message_count=0, consumer_count=count))

    def test_checks_at_once_then_every_interval_and_stops_with_the_link(self) -> None:
        self.consumer("fetcher")
        self.transport.liveness.start(self.proto)
        self.assertEqual([q for q, _ in self.control.declares], ["fetcher"])
        self.answer(1)
        self.clock.advance(self.INTERVAL - 0.1)
        self.assertEqual(self.control.declares, [])
        self.clock.advance(0.1)
        self.assertEqual([q for q, _ in self.control.declares], ["fetcher"])
        self.answer(1)
        self.transport._link_lost(self.proto, True)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.transport.liveness.checks, 2)
        self.assertEqual(self.started, [])

    def test_a_healthy_consumer_is_left_alone(self) -> None:
        consumer = self.consumer("fetcher")
        state = consumer._channel
        self.transport.liveness.start(self.proto)
        self.answer(3)  # ours and two of other nodes
        self.assertIs(consumer._channel, state)
        self.assertEqual((self.started, self.closed, self.observer.restarts), ([], [], []))
        self.assertEqual(self.transport.consumer_health(), {"down": [], "restarts": 0})

    def test_a_consumer_without_a_channel_is_consumed_again_and_counted(self) -> None:
        consumer = self.consumer("fetcher", active=False)  # lost, and nothing brought it back
        self.assertEqual(self.transport.consumer_health(), {"down": ["fetcher"], "restarts": 0})
        self.transport.liveness.start(self.proto)
        self.answer(0)
        self.assertEqual(self.started, ["fetcher"])
        self.assertTrue(consumer.active)
        self.assertEqual(self.observer.restarts, [("fetcher", "missing")])
        self.assertEqual(self.transport.consumer_restarts, {"missing": 1})
        self.assertEqual(self.transport.consumer_health(), {"down": [], "restarts": 1})

    def test_a_consumer_the_broker_does_not_count_is_restarted_on_a_fresh_channel(self) -> None:
        """Registered here, absent at the broker (the silent kind of death)."""
        consumer = self.consumer("fetcher")
        old = consumer._channel
        self.transport.liveness.start(self.proto)
        self.answer(0)
        self.assertFalse(old.open)
        self.assertEqual(self.closed, [old.txchannel])  # what it held goes back to the queue
        self.assertEqual(self.started, ["fetcher"])
        self.assertIsNot(consumer._channel, old)
        self.assertEqual(self.observer.restarts, [("fetcher", "missing")])

    def test_a_single_active_consumer_queue_counting_one_of_ours_is_left_alone(self) -> None:
        """A quorum queue with a single active consumer counts only the active one."""
        first, second = self.consumer("cache.node"), self.consumer("cache.node")
        channels = (first._channel, second._channel)
        self.transport.liveness.start(self.proto)
        self.answer(1)
        self.assertEqual((first._channel, second._channel), channels)
        self.assertEqual(self.started, [])

    def test_a_queue_gone_at_the_broker_is_declared_again(self) -> None:
        self.consumer("fetcher")
        self.transport.liveness.start(self.proto)
        self.answer(not_found("fetcher"))
        self.assertEqual(self.transport._lost_queues, {"fetcher"})
        replays: List[Any] = []
        self.transport._replay_topology = lambda p: (replays.append(p), defer.succeed(None))[1]  # type: ignore
        self.clock.advance(AMQPTransport.REDECLARE_DELAY)
        self.assertEqual(replays, [self.proto])
        self.assertEqual(self.started, ["fetcher"])
        self.assertEqual(self.observer.restarts, [("fetcher", "cancelled")])

    def test_one_pass_at_a_time_on_a_slow_broker(self) -> None:
        self.consumer("a")
        self.consumer("b")
        self.transport.liveness.start(self.proto)
        self.assertEqual(len(self.control.declares), 1)  # one queue at a time
        self.clock.advance(self.INTERVAL * 3)  # the broker has not answered yet
        self.assertEqual(len(self.control.declares), 1)
        self.answer(1, 1)
        self.assertEqual(self.transport.liveness.checks, 1)
        self.clock.advance(self.INTERVAL)
        self.assertEqual(self.transport.liveness.checks, 2)

    def test_a_check_that_fails_is_logged_and_the_next_one_runs(self) -> None:
        consumer = self.consumer("fetcher", active=False)
        self.transport.liveness.start(self.proto)
        self.answer(RuntimeError("broker confused"))
        self.assertEqual(self.started, [])
        self.clock.advance(self.INTERVAL)
        self.answer(0)
        self.assertTrue(consumer.active)

    def test_a_channel_the_broker_closes_is_consumed_again_and_counted(self) -> None:
        """What consumer_timeout does: 406 PRECONDITION_FAILED closes the consumer's channel."""
        consumer = self.consumer("fetcher")
        old = consumer._channel
        self.transport._channel_closed(self.proto, old.id, old, 406,
                                       "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out")
        self.assertFalse(consumer.active)
        self.assertEqual(self.transport.consumer_health()["down"], ["fetcher"])
        self.clock.advance(0.1)
        self.assertTrue(consumer.active)
        self.assertEqual(self.observer.restarts, [("fetcher", "channel_closed")])

    def test_a_reconnect_resumes_and_counts_each_consumer_once(self) -> None:
        consumer = self.consumer("fetcher")
        self.transport._link_lost(self.proto, True)
        self.assertIsNone(consumer._channel)
        self.transport._replay_topology = lambda p: defer.succeed(None)  # type: ignore[method-assign]
        self.successResultOf(self.transport._replay(self.proto))
        self.assertEqual(self.started, ["fetcher"])
        self.assertEqual(self.observer.restarts, [("fetcher", "reconnect")])
        self.transport.liveness.start(self.proto)
        self.answer(1)
        self.assertEqual(self.started, ["fetcher"])  # the check found it there: no second consumer

    def test_an_observer_that_raises_does_not_stop_the_restart(self) -> None:
        def broken(queue: str, reason: str) -> None:
            raise ValueError("metrics file gone")

        self.observer.consumer_restarted = broken  # type: ignore[method-assign]
        consumer = self.consumer("fetcher", active=False)
        self.transport.liveness.start(self.proto)
        self.answer(0)
        self.assertTrue(consumer.active)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_prometheus_counts_restarts_as_magnet_consumer_restarts_total(self) -> None:
        from ooidx.node.metrics import PrometheusObserver
        prometheus = PrometheusObserver()
        self.transport.observer = prometheus
        self.consumer("fetcher", active=False)
        self.transport.liveness.start(self.proto)
        self.answer(0)
        text = prometheus.generate().decode()
        self.assertIn('magnet_consumer_restarts_total{name="fetcher",reason="missing"} 1.0', text)

    def test_checks_never_drop_the_link(self) -> None:
        self.consumer("fetcher")
        self.transport.liveness.start(self.proto)
        self.answer(1)
        self.assertEqual(self.drop_link, [False])

    def test_no_check_while_the_broker_blocks_publishers(self) -> None:
        """RabbitMQ stops reading a blocked link: a check then would go unanswered."""
        consumer = self.consumer("fetcher", active=False)
        self.proto.blocked = "low on memory"
        self.transport.liveness.start(self.proto)
        self.clock.advance(self.INTERVAL * 3)
        self.assertEqual(self.control.declares, [])
        self.proto.blocked = None
        self.clock.advance(self.INTERVAL)
        self.answer(0)
        self.assertTrue(consumer.active)


class UnansweredCheckTests(SynchronousTestCase):
    def test_an_unanswered_check_gives_up_its_channel_not_the_link(self) -> None:
        clock = Clock()
        transport = AMQPTransport(URL, reactor=clock, operation_timeout=5)
        proto, tcp = link(transport, clock)
        control = FakeControlChannel()
        control.closed, control.client = False, proto  # type: ignore[attr-defined]
        transport._control = control
        closed: List[Any] = []
        proto.close_channel = lambda ch: (closed.append(ch), defer.succeed(None))[1]  # type: ignore
        d = transport._control_call(proto, lambda ch: ch.queue_declare(queue="fetcher", passive=True),
                                    drop_link=False)
        clock.advance(5)
        from magnet.errors import Timeout
        self.failureResultOf(d, Timeout)
        self.assertFalse(tcp.disconnecting)
        self.assertIsNone(transport._control)
        self.assertEqual(closed, [control])
