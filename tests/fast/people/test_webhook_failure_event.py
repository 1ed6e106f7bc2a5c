"""A failing webhook's event names its subscription and host, never the person or the URL."""
from __future__ import annotations

import json
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from ooidx.people.webhooks import failure_event, webhook_host


class FailureEventTests(SynchronousTestCase):
    def test_only_the_subscription_and_the_host(self) -> None:
        url = "https://hooks.example.org:8443/hook/SECRET123?sig=SIG456"
        record = {"id": "0123456789ab", "person": "ann", "webhook": url, "queue": "user.ann.0123456789ab"}
        reason = f"ResponseFailed: POST {url} failed; /hook/SECRET123 said sig=SIG456"
        event = failure_event(SimpleNamespace(node="n1"), record, attempt=2, attempts=8, reason=reason,
                              given_up=False, now=5.0)
        body = event.json()
        self.assertEqual(body["webhook_subscription"], "0123456789ab")
        self.assertEqual(body["host"], "hooks.example.org:8443")
        self.assertEqual((body["attempt"], body["attempts"], body["given_up"]), (2, 8, False))
        self.assertEqual(body["topic"], "event.failed.-")
        text = json.dumps(body)
        for secret in ("SECRET123", "SIG456", "ann", "user.ann"):
            self.assertNotIn(secret, text)

    def test_hosts(self) -> None:
        self.assertEqual(webhook_host("http://[::1]:80/x"), "[::1]:80")
        self.assertEqual(webhook_host("https://h.example/x?y"), "h.example")
        self.assertEqual(webhook_host("http://[bad/"), "?")
