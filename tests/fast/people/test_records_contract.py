"""What a person and a subscription are (ooidx.people.records): names, ids, queue names, bounds."""
from __future__ import annotations


from twisted.trial.unittest import SynchronousTestCase

from ooidx.errors import InvalidRegex
from ooidx.people.records import (InvalidSubscription, UnknownSubscription, check_id, check_person, hash_token,
                                  message_id, queue_name, regex_program_size)


class MessageIdTests(SynchronousTestCase):
    def test_ids_of_the_same_instant_still_sort_in_the_order_made(self) -> None:
        """A stream resumes after Last-Event-ID by skipping every id <= it:
        ids made in the same microsecond (a burst, or a coarse clock) must
        sort in the order they were made, or a resume skips some unseen."""
        ids = [message_id(1_700_000_000.0) for _ in range(200)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 200)

    def test_ids_are_fixed_width_and_follow_the_clock(self) -> None:
        early, late = message_id(1.0), message_id(2_000_000_000.0)
        self.assertEqual(len(early), len(late))
        self.assertLess(early, late)
        self.assertGreaterEqual(late, "02000000000000000")
        self.assertLess(late, message_id(1.0))  # a clock going back never makes an id that sorts before


class NameTests(SynchronousTestCase):
    def test_people(self) -> None:
        self.assertEqual(check_person("ann-1_x"), "ann-1_x")
        for bad in ("", "Ann", "-ann", "a" * 33, None, 5, "a.b", "a b"):
            self.assertRaises(InvalidSubscription, check_person, bad)

    def test_ids(self) -> None:
        self.assertEqual(check_id("0123456789ab"), "0123456789ab")
        for bad in ("0123456789AB", "0123", "../x", None, "0123456789abc"):
            self.assertRaises(UnknownSubscription, check_id, bad)

    def test_queues_tokens_security(self) -> None:
        self.assertEqual(queue_name("ann", "0123456789ab"), "user.ann.0123456789ab")
        self.assertEqual(len(hash_token("ann.secret")), 64)
        self.assertNotEqual(hash_token("ann.a"), hash_token("ann.b"))

    def test_regex_sizes(self) -> None:
        self.assertLess(regex_program_size("a"), regex_program_size("[a-z]{50}"))
        for bad in ("(", "(?=x)", "a" * 100_000, "a\x00", 5):
            self.assertRaises((InvalidRegex, TypeError), regex_program_size, bad)
