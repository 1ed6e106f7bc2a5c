"""/metrics is open to all: people's queue names (user.PERSON.ID) are counted under one label."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ooidx.node.metrics import PrometheusObserver, metric_label, renderer_for


class MetricsPrivacyTests(SynchronousTestCase):
    def test_people_are_folded_into_one_label(self) -> None:
        self.assertEqual(metric_label("user.ann.0123456789ab"), "user.*")
        self.assertEqual(metric_label("user_notification"), "user_notification")
        self.assertEqual(metric_label("pubsub.sub.user.ann.0123456789ab"), "pubsub.sub")

    def test_the_exposition_names_nobody(self) -> None:
        observer = PrometheusObserver()
        for name in ("user.ann.0123456789ab", "user.bob.ba9876543210", "fetcher"):
            observer.message_in(name)
            observer.message_out(name)
        body, content_type = renderer_for(type("Bus", (), {"observer": observer})())({"web": True})
        self.assertTrue(content_type.startswith(b"text/plain"))
        self.assertNotIn(b"user.ann", body)
        self.assertNotIn(b"0123456789ab", body)
        self.assertNotIn(b"0123456789ab", body)
        self.assertIn(b'magnet_messages_in_total{name="user.*"} 2.0', body)
