"""A bus for unit tests: the in-process broker on a L{task.Clock}, no reactor.

Code built on L{magnet.Bus} is tested here as U{treq.testing.StubTreq
<https://treq.readthedocs.io/en/latest/api.html#module-treq.testing>} lets
HTTP clients be tested: nothing listens on a port, nothing waits for a reactor
turn. The broker is L{magnet.memory.MemoryBroker} (RabbitMQ's semantics:
competing consumers, prefetch, acks, requeues, fanouts, mandatory publishes,
exclusive queues), and its deliveries are zero-delay calls on the clock the
test owns. The test decides when they run:

    - L{MemoryBroker.flush} runs every delivery that is due, and every
      delivery those cause, until nothing more is due (quiescence), without
      moving time. A message loop that never settles (a handler that always
      gives its message back) is reported, not spun on forever.
    - L{MemoryBroker.advance} moves time forward timer by timer, flushing
      after each, as a reactor would: RPC timeouts, send timeouts, stream idle
      timeouts and shutdown bounds fire exactly at their deadlines.
    - C{clock.advance(seconds)} works too (deliveries are calls on the
      clock), without the loop guard.

So C{successResultOf}, C{failureResultOf} and C{assertNoResult} of
L{twisted.trial.unittest.SynchronousTestCase} tell the whole story::

    from twisted.trial.unittest import SynchronousTestCase
    from magnet import Timeout, Unroutable, operation
    from magnet.testing import MemoryBroker

    class Echo:
        @operation
        def echo(self, value):
            return value

    class EchoTests(SynchronousTestCase):
        def setUp(self):
            self.broker = MemoryBroker()          # its own task.Clock
            self.addCleanup(self.broker.stop)
            server, self.client = self.broker.bus(), self.broker.bus(rpc_timeout=5)
            server.serve("echo", Echo())
            self.broker.flush()

        def test_echo(self):
            d = self.client.call("echo", "echo", value=[1, 2])
            self.broker.flush()
            self.assertEqual(self.successResultOf(d), [1, 2])

        def test_nobody_answers(self):
            d = self.client.call("nobody-serves-this", "echo", value=1)
            self.broker.flush()
            self.failureResultOf(d, Unroutable)

        def test_timeout(self):
            self.broker.bus().declare_worker_queue("silent")
            d = self.client.call("silent", "echo", value=1)
            self.broker.advance(4.9)
            self.assertNoResult(d)
            self.broker.advance(0.1)
            self.failureResultOf(d, Timeout)

Several buses on one broker are several processes on one RabbitMQ: each has
its own connection (so exclusive queues, private listen addresses and
redelivery on disconnect behave as they do there). L{bus} is the short form
for one bus on a broker of its own.

A resource alarm is L{MemoryBroker.block} (and C{unblock}): publishes are
held, a sender that gives up gets L{magnet.Blocked}, and C{bus.blocked} and
the bus's block listeners say so, as with RabbitMQ's C{connection.blocked}.

What the in-process broker does not imitate: topic exchanges (magnet uses
fanout and direct only), message TTLs, broker-side dead-letter exchanges
(magnet dead-letters itself, see L{magnet.bus}), and the network (no
reconnects; L{MemoryBroker.drop_link} drops one bus's link).
"""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock

from magnet import memory
from magnet.bus import Bus
from magnet.message import Message

__all__ = ["MemoryBroker", "NotQuiescent", "bus"]

#: How many due calls L{MemoryBroker.flush} runs before it calls the traffic a loop.
DEFAULT_STEP_LIMIT = 100_000


class NotQuiescent(AssertionError):
    """Delivery did not settle: some message keeps coming back (a handler that
    always nacks with requeue, a retry loop). An AssertionError, so a test
    that meets it fails rather than errs."""


class MemoryBroker(memory.MemoryBroker):
    """An in-process broker whose deliveries run when the test says so.

    @param clock: the L{Clock} that drives deliveries and every timeout of
        the buses made with L{bus}; a new one if not given.
    """

    def __init__(self, clock: Optional[Clock] = None) -> None:
        clock = Clock() if clock is None else clock
        if not hasattr(clock, "calls") or not hasattr(clock, "advance"):
            raise TypeError(f"magnet.testing needs a twisted.internet.task.Clock, not {clock!r}")
        super().__init__(clock)
        self.clock: Clock = clock
        self.buses: List[Bus] = []

    # buses -----------------------------------------------------------------

    def bus(self, *, node: str = "test", start: bool = True, **options: Any) -> Bus:
        """A new L{Bus} on its own connection to this broker, started unless
        C{start} is false. C{options} are L{Bus}'s (C{rpc_timeout},
        C{retry_limit}, C{prefetch}, C{observer}, ...); the clock is the broker's."""
        made = Bus(memory.MemoryTransport(self), clock=self.clock, node=node, **options)
        self.buses.append(made)
        if start:
            made.startService()
        return made

    def drop_link(self, bus: Bus) -> None:
        """Close C{bus}'s connection as a broker does when a client goes: what
        its consumers held goes back to the queues, its exclusive queues (private
        listen addresses, subscriptions) go, and the bus hears that its link is
        down (pending calls fail with L{magnet.errors.ConnectionLost})."""
        bus.transport.stop()

    def stop(self) -> Deferred:
        """Stop every bus made here and run what that lets happen. Fires when
        all have stopped (at once unless a handler is still in flight: then
        after the bus's C{shutdown_timeout}, on L{advance}). Meant for
        C{addCleanup}."""
        stops = [b.stopService() for b in self.buses if b.running]
        self.flush()
        return DeferredList(stops, consumeErrors=True)

    # time ------------------------------------------------------------------

    def flush(self, limit: int = DEFAULT_STEP_LIMIT) -> int:
        """Run every call that is due now (deliveries, and what they cause)
        until none is; returns how many ran. Time does not move.

        @raise NotQuiescent: after C{limit} calls with more still due.
        """
        clock = self.clock
        calls = clock.calls
        ran = 0
        now = clock.seconds()
        while calls:
            calls.sort(key=lambda c: c.getTime())
            call = calls[0]
            if call.getTime() > now:
                break
            if ran >= limit:
                raise NotQuiescent(f"delivery did not settle after {limit} steps; still due: {call!r}")
            calls.pop(0)
            call.called = 1
            call.func(*call.args, **call.kw)
            ran += 1
        return ran

    def advance(self, seconds: float, limit: int = DEFAULT_STEP_LIMIT) -> int:
        """Move time forward by C{seconds}, stopping at each timer on the way
        to run it and flush what it caused; returns how many calls ran."""
        if seconds < 0:
            raise ValueError(f"time does not go back ({seconds} s)")
        clock = self.clock
        target = clock.seconds() + seconds
        ran = self.flush(limit)
        while True:
            due = [c.getTime() for c in clock.calls if c.getTime() <= target]
            if not due:
                break
            step = max(0.0, min(due) - clock.seconds())
            _jump(clock, step)
            ran += self.flush(limit)
        _jump(clock, target - clock.seconds())
        return ran + self.flush(limit)

    # looking inside --------------------------------------------------------

    def ready(self, queue: str) -> List[Message]:
        """The messages waiting in C{queue}, not yet delivered, oldest first
        (an empty list for a queue that does not exist)."""
        q = self.queues.get(queue)
        return [] if q is None else [entry[0] for entry in q.ready]

    def unacked(self, queue: str) -> int:
        """How many messages of C{queue} its current consumers hold unacknowledged."""
        q = self.queues.get(queue)
        return 0 if q is None else sum(len(c.unacked) for c in q.consumers)

    def consumers(self, queue: str) -> int:
        """How many consumers C{queue} has."""
        q = self.queues.get(queue)
        return 0 if q is None else len(q.consumers)


def _jump(clock: Clock, seconds: float) -> None:
    """Move the clock without running anything: L{MemoryBroker.advance} runs
    the calls itself, with its loop guard."""
    if seconds > 0:
        clock.rightNow += seconds


def bus(clock: Optional[Clock] = None, **options: Any) -> Bus:
    """A started L{Bus} on a L{MemoryBroker} of its own (C{bus.transport.broker}).

    For a second bus on the same broker: C{bus.transport.broker.bus()}."""
    return MemoryBroker(clock).bus(**options)
