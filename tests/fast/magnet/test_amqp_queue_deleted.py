"""A queue deleted under its consumer (the broker's basic.cancel), without a broker.

The transport declares again a queue it declared itself, once, a moment
(REDECLARE_DELAY) after the cancel, taking every queue lost meanwhile in one
pass, then resumes the consumers; a queue declared elsewhere, or whose
consumers the application cancelled meanwhile, is left alone.
"""
from __future__ import annotations

import struct
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import AMQPConsumer, AMQPTransport, _ConsumerChannel

from tests.support.amqp_link import URL, frame, link


def _cancel_frame(channel: int, tag: bytes) -> bytes:
    return frame(channel, struct.pack(">HH", 60, 30) + bytes([len(tag)]) + tag + b"\x00")


class QueueDeletedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = AMQPTransport(URL, reactor=self.clock)
        self.proto, _ = link(self.transport, self.clock)
        self.passes: List[Deferred] = []
        self.resumed: List[str] = []
        self.transport._replay_topology = self._replay  # type: ignore[method-assign]
        self.transport._resume_consumers_of = self.resumed.append  # type: ignore[method-assign]
        self.channels = 0

    def _replay(self, protocol: Any) -> Deferred:
        self.assertIs(protocol, self.proto)
        d: Deferred = Deferred()
        self.passes.append(d)
        return d

    def consumer(self, queue: str, declared_here: bool = True) -> int:
        """A consumer of C{queue} delivering on a channel of its own; that channel's id."""
        if declared_here:
            self.transport._topology[("queue", queue)] = ("queue", queue, {})
        consumer = AMQPConsumer(self.transport, queue, lambda delivery: None, 10)
        self.transport._consumers[id(consumer)] = consumer
        self.channels += 1
        state = _ConsumerChannel(self.proto, self.channels, consumer, f"tag{self.channels}")
        self.proto.fast[self.channels] = state
        consumer._channel, consumer.active = state, True
        return self.channels

    def deleted(self, channel: int) -> None:
        self.proto.dataReceived(_cancel_frame(channel, f"tag{channel}".encode()))

    def test_a_queue_declared_here_is_declared_again_and_its_consumer_resumes(self) -> None:
        channel = self.consumer("fetcher")
        self.deleted(channel)
        self.assertEqual(self.passes, [])
        self.clock.advance(AMQPTransport.REDECLARE_DELAY)
        self.assertEqual(len(self.passes), 1)
        self.assertEqual(self.resumed, [])  # only once the topology is declared again
        self.passes[0].callback(None)
        self.assertEqual(self.resumed, ["fetcher"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queues_lost_together_are_declared_again_in_one_pass(self) -> None:
        first, second = self.consumer("a"), self.consumer("b")
        self.deleted(first)
        self.clock.advance(0.5)
        self.deleted(second)
        self.clock.advance(0.5)
        self.assertEqual(len(self.passes), 1)
        self.passes[0].callback(None)
        self.assertEqual(self.resumed, ["a", "b"])

    def test_a_queue_lost_during_a_pass_gets_one_more_pass_after_it(self) -> None:
        first, second = self.consumer("a"), self.consumer("b")
        self.deleted(first)
        self.clock.advance(1.0)
        self.deleted(second)
        self.clock.advance(5.0)
        self.assertEqual(len(self.passes), 1)  # one pass at a time
        self.passes[0].callback(None)
        self.clock.advance(1.0)
        self.assertEqual(len(self.passes), 2)
        self.passes[1].callback(None)
        self.assertEqual(self.resumed, ["a", "b"])

    def test_a_failed_pass_is_logged_and_the_next_cancel_still_gets_one(self) -> None:
        first, second = self.consumer("a"), self.consumer("b")
        self.deleted(first)
        self.clock.advance(1.0)
        self.passes[0].errback(RuntimeError("refused"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.deleted(second)
        self.clock.advance(1.0)
        self.assertEqual(len(self.passes), 2)

    def test_a_queue_declared_elsewhere_is_left_alone(self) -> None:
        channel = self.consumer("theirs", declared_here=False)
        self.deleted(channel)
        self.clock.advance(10)
        self.assertEqual(self.passes, [])
        self.assertEqual(self.resumed, [])

    def test_a_consumer_the_application_cancels_meanwhile_is_not_brought_back(self) -> None:
        channel = self.consumer("unsubscribed")
        consumer = self.proto.fast[channel].consumer
        self.deleted(channel)
        self.successResultOf(consumer.cancel())  # e.g. the person unsubscribed on another node
        self.clock.advance(10)
        self.assertEqual(self.passes, [])
