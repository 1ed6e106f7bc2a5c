"""A link whose broker goes silent (a dead network: iptables DROP, no reset).

The reliability run of the cluster partition saw a producer bus (heartbeat
2 s, send timeout 5 s) make no send for 40 s after its link went silent.
Here the same bus, on a Clock, over a scripted broker that stops answering
anything: every send fails within its timeout, the heartbeat drops the link
after two silent intervals, the bus links to the next broker URL, and a send
there is confirmed. No send waits without a bound at any point.
"""
from __future__ import annotations

from typing import Any, List

from twisted.internet.error import ConnectionLost as TwistedConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from magnet.bus import Bus
from magnet.errors import ConnectionLost, NotConnected, Timeout
from magnet.message import Message
from tests.fast.magnet.test_amqp_protocol_contract import ack
from tests.fast.magnet.test_amqp_transport_contract import Harness

SEND_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
SEND_ERRORS = (Timeout, ConnectionLost, NotConnected)


class SilentLinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(["amqp://guest:guest@c/", "amqp://guest:guest@a/"], heartbeat=2,
                         operation_timeout=30.0, connect_timeout=CONNECT_TIMEOUT)
        self.h.broker_options = {"heartbeat": 60}
        self.bus = Bus(self.h.transport, clock=self.h.clock, send_timeout=SEND_TIMEOUT)
        self.silent = self.h.up()
        self.assertEqual(self.silent.protocol._heartbeat, 2)

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Time passes; the silent broker reads nothing and answers nothing, but the
        socket close an abort asks for is delivered (as a reactor would)."""
        for _ in range(int(round(seconds / step))):
            self.h.clock.advance(step)
            proto = self.silent.protocol
            if self.silent.wire.disconnecting and not proto.lost:
                proto.connectionLost(Failure(TwistedConnectionLost("aborted")))
            if self.h.brokers[-1] is not self.silent:
                self.h.pump()  # the next broker answers

    def send(self, log: List[Any]) -> None:
        """A send; what became of it (when, and its result) goes to C{log}."""
        began = self.h.clock.seconds()
        entry: List[Any] = [began, None, None]
        log.append(entry)

        def settled(result: Any) -> None:
            entry[1] = self.h.clock.seconds()
            entry[2] = result

        self.bus.send("q", Message(body=b"x")).addBoth(settled)

    def send_every_half_second(self, log: List[Any], times: int) -> None:
        """C{times} sends, one every 0.5 s of the clock; after each, no send may
        have waited unsettled longer than its timeout."""
        for _ in range(times):
            self.advance(0.5)
            self.send(log)
            now = self.h.clock.seconds()
            for began, fired, result in log:
                waited = (fired if fired is not None else now) - began
                self.assertLessEqual(waited, SEND_TIMEOUT + 0.2,
                                     f"a send made at {began:.1f} s unsettled at {now:.1f} s")

    def test_sends_on_a_silent_link_fail_in_time_and_the_next_link_takes_them(self) -> None:
        log: List[Any] = []
        self.send(log)  # awaiting its confirm when the broker goes silent
        # a send every 0.5 s for 12 s: the link silent, then dropped, then the next one
        self.send_every_half_second(log, 24)
        # the heartbeat dropped the silent link (after two intervals) and the bus linked to the next URL
        self.assertTrue(self.silent.protocol.lost)
        self.assertEqual(self.h.attempts[:2], ["c", "a"])
        self.assertTrue(self.h.transport.connected)
        broker = self.h.brokers[-1]
        self.assertIsNot(broker, self.silent)
        failed = [r for _, fired, r in log if isinstance(r, Failure)]
        self.assertTrue(failed)
        for f in failed:
            self.assertIsNotNone(f.check(*SEND_ERRORS), f)
        # a send on the new link is confirmed
        tail: List[Any] = []
        self.send(tail)
        self.h.pump()
        broker.feed(ack(1, len(broker.publishes), multiple=True))
        self.assertIsNone(tail[0][2], tail)

    def test_sends_while_the_next_link_hangs_fail_in_time(self) -> None:
        """The next URL's connect hangs (its name resolution waits for a thread
        of a busy pool, which nothing bounds): sends made meanwhile wait for
        the link at most their timeout."""
        self.h.script.append("hang")
        log: List[Any] = []
        self.send(log)
        self.send_every_half_second(log, 16)  # 8 s: silent, dropped by the heartbeat, then no link
        self.assertTrue(self.silent.protocol.lost)
        self.assertFalse(self.h.transport.connected)
        for _, fired, result in log[:-int(SEND_TIMEOUT / 0.5)]:
            self.assertIsInstance(result, Failure)
            self.assertIsNotNone(result.check(*SEND_ERRORS), result)

    def test_a_connect_that_never_ends_is_given_up_and_the_next_url_tried(self) -> None:
        """A connection attempt is bounded as a whole, name resolution included
        (HostnameEndpoint's timeout covers only the TCP connects after it): a
        hung attempt does not leave the bus without a link for ever."""
        self.h.script.append("hang")
        self.advance(6.0)  # the heartbeat drops the silent link; the attempt on the next URL hangs
        self.assertTrue(self.silent.protocol.lost)
        self.assertEqual(self.h.attempts, ["c", "a"])
        hung = self.h.hanging[0]
        self.advance(2 * CONNECT_TIMEOUT)
        self.assertTrue(hung.called)
        self.assertIn("did not connect within 4.0 s", self.h.transport.last_error or "")
        self.advance(1.5)  # backoff(1) = 1 s: the next URL (the network is back)
        self.assertEqual(self.h.attempts, ["c", "a", "c"])
        self.assertTrue(self.h.transport.connected)
