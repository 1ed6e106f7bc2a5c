"""A stream ticket opens one stream, once (ooidx.people.api), remembered until it expires."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ooidx.http.answers import HTTPError
from ooidx.people.api import SubscriptionsApi


def api(clock: Clock) -> SubscriptionsApi:
    return SubscriptionsApi(object(), clock, check_operator=lambda r: None, arguments=lambda r: {},
                            operator_token=lambda: "t" * 20)


class SingleUseTests(SynchronousTestCase):
    def test_a_ticket_is_refused_the_second_time(self) -> None:
        clock = Clock()
        a = api(clock)
        a._use_ticket("mac1", 60, "0123456789ab", {})
        with self.assertRaises(HTTPError) as caught:
            a._use_ticket("mac1", 60, "0123456789ab", {})
        self.assertEqual((caught.exception.status, caught.exception.kind), (401, "TicketUsed"))
        self.assertIn("POST /api/subscriptions/0123456789ab/ticket", caught.exception.message)
        a._use_ticket("mac2", 60, "0123456789ab", {})  # another ticket is another matter

    def test_used_tickets_are_forgotten_once_expired(self) -> None:
        clock = Clock()
        a = api(clock)
        for n in range(100):
            a._use_ticket(f"mac{n}", 60 + n, "0123456789ab", {})
        clock.advance(100)
        a._use_ticket("late", 200, "0123456789ab", {})
        self.assertEqual(sorted(a._used), ["late"] + sorted(f"mac{n}" for n in range(41, 100)))
