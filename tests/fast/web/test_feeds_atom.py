"""The Atom documents of ooidx.web.feeds, read by feedparser (no port): entries newest first, the change
summary in words, ids stable across polls, text XML cannot carry replaced, a dataset's topics matched exactly."""
from __future__ import annotations

import json

import feedparser
from twisted.trial.unittest import SynchronousTestCase

from ooidx.routing import compile_filter
from ooidx.web.feeds import dataset_regex, render_atom, summary_of, title_of

EVENTS = [
    {"topic": "event.registered.sst", "kind": "registered", "dataset": "sst", "time": 100.0, "node": "n"},
    {"topic": "event.saved.sst", "kind": "saved", "dataset": "sst", "time": 200.0, "node": "n", "version": "V2",
     "changes": {"text": "time → 2024-01-03 (was → 2024-01-02); variable added: salt",
                 "variables": {"added": ["salt"], "removed": [], "more": 0}}},
    {"topic": "event.failed.sst", "kind": "failed", "dataset": "sst", "time": 300.0, "node": "n",
     "reason": "bad \x00\x1b[31m bytes \ud800"},
]


class AtomTests(SynchronousTestCase):
    def feed(self, events: list) -> feedparser.FeedParserDict:
        body = render_atom(events, feed_id="urn:ooidx:feed:dataset:sst", title="ooidx dataset sst",
                           self_link="/feeds/datasets/sst.atom", now=1000.0)
        parsed = feedparser.parse(body)
        self.assertFalse(parsed.bozo, parsed.get("bozo_exception"))
        return parsed

    def test_entries_newest_first_with_the_change_summary(self) -> None:
        feed = self.feed(EVENTS)
        self.assertEqual([e.title.split(":")[0] for e in feed.entries], ["failed sst", "saved sst", "registered sst"])
        saved = feed.entries[1]
        self.assertIn("variable added: salt", saved.title)
        self.assertIn("variable added: salt", saved.summary)
        self.assertEqual(json.loads(saved.content[0].value)["version"], "V2")
        self.assertEqual(feed.feed.updated_parsed[:6], (1970, 1, 1, 0, 5, 0))
        self.assertIn("\ufffd", feed.entries[0].summary)
        self.assertEqual([e.id for e in self.feed(EVENTS).entries], [e.id for e in feed.entries])

    def test_an_empty_feed_is_a_feed(self) -> None:
        feed = self.feed([])
        self.assertEqual(feed.entries, [])
        self.assertEqual(feed.feed.id, "urn:ooidx:feed:dataset:sst")

    def test_odd_events(self) -> None:
        feed = self.feed([{"kind": "saved", "time": "not a time"}, "not an event",
                          {"kind": "saved", "dataset": "x", "time": 1e20, "changes": [1, 2]}])
        self.assertEqual(len(feed.entries), 2)
        self.assertIn("- 1", summary_of({"kind": "saved", "changes": [1, 2]}))
        self.assertEqual(title_of({"kind": "saved", "dataset": "x", "changes": {"text": "  "}}), "saved x")

    def test_a_dataset_regex_matches_its_topics_only(self) -> None:
        matches = compile_filter(dataset_regex("sea-ice.v2"))
        self.assertTrue(matches("event.saved.sea-ice.v2"))
        self.assertTrue(matches("event.failed.sea-ice.v2"))
        for topic in ("event.saved.sea-ice.v2x", "event.saved.seaXice.v2", "event.saved.sea-ice-v2",
                      "event.saved.x.sea-ice.v2", "event.saved.sea-ice.v2\n"):
            self.assertFalse(matches(topic), topic)
