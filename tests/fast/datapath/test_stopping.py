"""ended_within: waiting at stop for running work, bounded, never cancelling it."""
from __future__ import annotations

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ooidx.datapath.stopping import ended_within


class EndedWithinTests(SynchronousTestCase):
    def test_nothing_running(self) -> None:
        self.assertIs(self.successResultOf(ended_within([], 5.0, task.Clock())), True)

    def test_all_end_in_time(self) -> None:
        clock = task.Clock()
        a, b = Deferred(), Deferred()
        waited = ended_within([a, b], 5.0, clock)
        a.callback("a")
        self.assertNoResult(waited)
        b.errback(ValueError("b failed"))
        self.assertIs(self.successResultOf(waited), True)
        # their results stay theirs
        self.assertEqual(self.successResultOf(a), "a")
        self.failureResultOf(b, ValueError)

    def test_bounded_and_nothing_cancelled(self) -> None:
        clock = task.Clock()
        cancelled = []
        slow: Deferred = Deferred(lambda d: cancelled.append(d))
        waited = ended_within([slow], 5.0, clock)
        clock.advance(5.0)
        self.assertIs(self.successResultOf(waited), False)
        self.assertEqual(cancelled, [])
        self.assertNoResult(slow)
        slow.callback(None)
