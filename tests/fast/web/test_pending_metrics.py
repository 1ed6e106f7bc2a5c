"""C{magnet_pending{kind}} on /metrics (ooidx.node.metrics.pending_families,
magnet.bus.Bus.pending): what the daemon's bus waits on, read at each scrape,
so a Deferred that is never settled shows as a number that only grows."""
from __future__ import annotations

from typing import Any, Dict

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from magnet import Timeout
from magnet.testing import MemoryBroker
from ooidx.node.metrics import PrometheusObserver, renderer_for


def pending(body: bytes) -> Dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "magnet_pending":
            for s in family.samples:
                out[s.labels["kind"]] = s.value
    return out


class PendingGaugeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = MemoryBroker()
        self.addCleanup(self.broker.stop)
        self.bus = self.broker.bus(rpc_timeout=5, observer=PrometheusObserver())
        self.render = renderer_for(self.bus)
        self.broker.flush()

    def scrape(self) -> Dict[str, float]:
        body, _ = self.render({})
        return pending(body)

    def test_a_call_without_a_reply_counts_until_its_timeout(self) -> None:
        self.broker.bus().declare_worker_queue("silent")
        self.broker.flush()
        self.assertEqual(self.scrape()["calls"], 0)
        d = self.bus.call("silent", "echo", value=1)
        self.broker.flush()
        self.assertEqual(self.scrape()["calls"], 1)
        self.broker.advance(5)
        self.failureResultOf(d, Timeout)
        got = self.scrape()
        self.assertEqual(got["calls"], 0)
        self.assertEqual(set(got), {"calls", "sends", "handlers", "listeners", "streams"})

    def test_an_open_listen_address_counts_until_closed(self) -> None:
        d = self.bus.listen(lambda m: None)
        self.broker.flush()
        listener = self.successResultOf(d)
        self.assertEqual(self.scrape()["listeners"], 1)
        listener.close()
        self.broker.flush()
        self.assertEqual(self.scrape()["listeners"], 0)

    def test_a_bus_without_pending_is_left_out(self) -> None:
        class Bare:
            observer = PrometheusObserver()

        body, _ = renderer_for(Bare())({})
        self.assertEqual(pending(body), {})

    def test_a_failing_pending_is_logged_and_the_scrape_served(self) -> None:
        def broken() -> Any:
            raise RuntimeError("boom")

        self.bus.pending = broken  # type: ignore[method-assign]
        body, _ = self.render({})
        self.assertEqual(pending(body), {})
        self.assertIn(b"magnet_messages_out", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
