"""The webhook settings of user_notification and user_pub_sub in the config file (ooidx.config.WebhookOptions),
and the per-dataset metrics cap (http.metrics_datasets): taken, checked, and reaching the components."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ooidx.config import ConfigError, WebhookOptions, parse
from ooidx.people.user_notification import UserNotification
from ooidx.people.user_pub_sub import UserPubSub

BASE = "node: a\nbroker: memory://\ndata_dir: /tmp/ooidx-options-test\n"


def config(text: str) -> object:
    return parse(BASE + text, "dx.yaml")


class WebhookOptionsTests(SynchronousTestCase):
    def test_defaults_and_settings(self) -> None:
        c = config("components: {user_notification: {}, user_pub_sub: {webhook_disable_after: 3, "
                   "webhook_verify_timeout: 2.5, webhook_attempts: 4, webhook_log_size: 10, "
                   "webhook_disabled_ttl: 0}}\n")
        self.assertEqual(c.components["user_notification"].options, WebhookOptions())
        options = c.components["user_pub_sub"].options
        self.assertEqual((options.webhook_disable_after, options.webhook_verify_timeout, options.webhook_attempts,
                          options.webhook_log_size), (3, 2.5, 4, 10))
        bus = SimpleNamespace(node="a")
        component = UserPubSub.from_config("user_pub_sub", bus, c, node="a", clock=Clock())
        self.assertEqual((component.webhook_disable_after, component.webhook_verify_timeout,
                          component.webhook_attempts, component.webhook_log_size,
                          component.webhook_disabled_ttl), (3, 2.5, 4, 10, 0.0))
        # a keyword argument wins over the file
        component = UserPubSub.from_config("user_pub_sub", bus, c, node="a", clock=Clock(), webhook_disable_after=7)
        self.assertEqual(component.webhook_disable_after, 7)
        other = UserNotification.from_config("user_notification", bus, c, node="a", clock=Clock())
        self.assertEqual((other.webhook_disable_after, other.webhook_verify_timeout, other.webhook_disabled_ttl),
                         (20, 5.0, 604800.0))
        self.assertEqual(c.to_dict()["components"]["user_pub_sub"]["webhook_disable_after"], 3)

    def test_refused_settings(self) -> None:
        for bad in ("webhook_disable_after: 0", "webhook_verify_timeout: 31", "webhook_verify_timeout: -1",
                    "webhook_attempts: 1000", "webhook_log_size: x", "webhook_secret: 1",
                    "webhook_disabled_ttl: -5"):
            with self.assertRaises(ConfigError, msg=bad):
                config(f"components: {{user_notification: {{{bad}}}}}\n")

    def test_metrics_datasets(self) -> None:
        self.assertEqual(config("").http.metrics_datasets, 50)
        self.assertEqual(config("http: {metrics_datasets: 0}\n").http.metrics_datasets, 0)
        for bad in ("-1", "1001", "many"):
            with self.assertRaises(ConfigError):
                config(f"http: {{metrics_datasets: {bad}}}\n")
