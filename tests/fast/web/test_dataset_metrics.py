"""Per-dataset series of /metrics (ooidx.node.metrics.DatasetMetrics): the cap, "other", sticky labels,
the age of the newest version, the cache and a controller that does not answer."""
from __future__ import annotations

from typing import Any, Dict, List

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet import Timeout
from ooidx.node.metrics import OTHER, DatasetMetrics, PrometheusObserver, renderer_for


class FakeBus:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.observer = PrometheusObserver()
        self.stats: Dict[str, Any] = {"datasets": {}}
        self.records: List[Dict[str, Any]] = []
        self.calls: List[Any] = []
        self.hang = False
        self.fail = False

    def call(self, address: str, op: str, timeout: float = None, **kwargs: Any) -> defer.Deferred:
        self.calls.append((address, op, timeout))
        if self.fail:
            return defer.fail(Timeout("no answer"))
        if self.hang:
            d: defer.Deferred = defer.Deferred()
            return d.addTimeout(timeout, self.clock)
        return defer.succeed(self.stats if op == "get_stats" else self.records)


def samples(body: bytes) -> Dict[Any, float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stats(**requests: int) -> Dict[str, Any]:
    return {"datasets": {name: {"requests": n, "hits": n // 2, "misses": n - n // 2, "bytes": n * 10}
                         for name, n in requests.items()}}


class DatasetMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = FakeBus(self.clock)
        self.datasets = DatasetMetrics(self.bus, self.clock, cap=2, ttl=5.0, timeout=2.0)
        self.render = renderer_for(self.bus, datasets=self.datasets)

    def scrape(self) -> Dict[Any, float]:
        result = self.render({"web": True})
        if isinstance(result, defer.Deferred):
            result = self.successResultOf(result)
        body, content_type = result
        self.assertTrue(content_type.startswith(b"text/plain"))
        return samples(body)

    def test_series_per_dataset_with_the_rest_under_other(self) -> None:
        self.bus.stats = stats(sst=30, chl=20, ice=5, wind=1)
        self.bus.records = [{"name": "sst", "versions": 2, "last_fetch": 900.0, "status": "fetched"},
                            {"name": "ice", "versions": 1, "last_fetch": 400.0},
                            {"name": "wind", "versions": 1, "last_fetch": 700.0},
                            {"name": "new", "versions": 0, "last_fetch": None}]
        got = self.scrape()
        self.assertEqual(got[("ooidx_dataset_requests_total", (("dataset", "sst"),))], 30)
        self.assertEqual(got[("ooidx_dataset_bytes_total", (("dataset", "chl"),))], 200)
        self.assertEqual(got[("ooidx_dataset_hits_total", (("dataset", "sst"),))], 15)
        self.assertEqual(got[("ooidx_dataset_misses_total", (("dataset", "sst"),))], 15)
        # the cap: two by name (the most requested), the other three summed
        self.assertEqual(got[("ooidx_dataset_requests_total", (("dataset", OTHER),))], 6)
        self.assertNotIn(("ooidx_dataset_requests_total", (("dataset", "ice"),)), got)
        self.assertEqual(got[("ooidx_dataset_series_datasets", (("labelled", "yes"),))], 2)
        self.assertEqual(got[("ooidx_dataset_series_datasets", (("labelled", "no"),))], 3)
        # age of the newest version: of those with a version; under other the oldest
        self.assertEqual(got[("ooidx_dataset_age_seconds", (("dataset", "sst"),))], 100.0)
        self.assertEqual(got[("ooidx_dataset_age_seconds", (("dataset", OTHER),))], 600.0)
        self.assertNotIn(("ooidx_dataset_age_seconds", (("dataset", "chl"),)), got)
        self.assertEqual(got[("ooidx_dataset_metrics_up", ())], 1)
        # the bus's own series are still there
        self.assertEqual(got[("ooidx_component_up", (("component", "web"),))], 1)

    def test_read_once_per_ttl(self) -> None:
        self.bus.stats = stats(sst=1)
        self.scrape()
        self.scrape()
        self.assertEqual(len(self.bus.calls), 2)  # get_stats and list, once
        self.assertTrue(all(timeout == 2.0 for _, _, timeout in self.bus.calls))
        self.clock.advance(5.0)
        self.scrape()
        self.assertEqual(len(self.bus.calls), 4)

    def test_labels_are_sticky(self) -> None:
        self.bus.stats = stats(a=10, b=9, c=1)
        self.scrape()
        self.bus.stats = stats(a=10, b=9, c=100)  # c is now the most requested: a and b keep their labels
        self.clock.advance(6)
        got = self.scrape()
        self.assertIn(("ooidx_dataset_requests_total", (("dataset", "b"),)), got)
        self.assertEqual(got[("ooidx_dataset_requests_total", (("dataset", OTHER),))], 100)
        self.bus.stats = stats(a=10, c=100)  # b purged: its slot goes to c
        self.clock.advance(6)
        got = self.scrape()
        self.assertEqual(got[("ooidx_dataset_requests_total", (("dataset", "c"),))], 100)
        self.assertNotIn(("ooidx_dataset_requests_total", (("dataset", OTHER),)), got)

    def test_a_cap_of_zero_names_no_dataset(self) -> None:
        self.datasets.cap = 0
        self.bus.stats = stats(secret_name=3)
        got = self.scrape()
        self.assertEqual(got[("ooidx_dataset_requests_total", (("dataset", OTHER),))], 3)
        self.assertFalse([k for k in got if ("dataset", "secret_name") in k[1]])

    def test_a_controller_that_does_not_answer(self) -> None:
        self.bus.stats = stats(sst=3)
        self.scrape()
        self.clock.advance(6)
        self.bus.hang = True
        result = self.render({})
        self.assertNoResult(result)
        self.clock.advance(2.0)  # the bounded call gives up; the last figures are served
        got = samples(self.successResultOf(result)[0])
        self.assertEqual(got[("ooidx_dataset_metrics_up", ())], 0)
        self.assertEqual(got[("ooidx_dataset_requests_total", (("dataset", "sst"),))], 3)
        self.bus.hang, self.bus.fail = False, True
        self.clock.advance(6)
        self.assertEqual(self.scrape()[("ooidx_dataset_metrics_up", ())], 0)
        self.flushLoggedErrors()

    def test_without_datasets_the_renderer_answers_at_once(self) -> None:
        body, _ = renderer_for(self.bus)({"web": True})
        self.assertNotIn(b"ooidx_dataset_", body)
