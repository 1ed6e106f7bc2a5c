"""The controller (ooidx.datapath.controller) on a memory:// bus on a Clock,
with a fake attribute store, cache and fetcher served on the bus: register,
get, list, purge, route (by URL and by name: the cache, a fetcher, refusals),
get_dataset, periodic refresh, the dataset events, record and the
statistics. The RabbitMQ version stays in tests/ooidx/test_controller.py."""
from __future__ import annotations

import re
import uuid
from typing import Any, Dict, List, Optional

from twisted.internet import defer

import magnet
from magnet import RemoteError, operation

from ooidx import events
from ooidx.config import SecurityConfig
from ooidx.datapath.controller import Controller, check_base_url, check_name
from ooidx.errors import Forbidden, InvalidName, InvalidURL

from tests.fast.core.support import FastCase, bus_down, bus_up, cases, drive, expand, settle, threadless

BASE = "http://data.example.org/opendap/sst.nc"


class FakeStore:
    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise RuntimeError("the store is down")

    @operation
    def get(self, key: str) -> Any:
        self._check()
        if key not in self.values:
            raise KeyError(key)
        return self.values[key]

    @operation
    def set(self, key: str, value: Any) -> bool:
        self._check()
        self.values[key] = value
        return True

    @operation
    def query(self, regex: str) -> Dict[str, Any]:
        self._check()
        return {k: v for k, v in self.values.items() if re.search(regex, k)}


class Recorder:
    def __init__(self) -> None:
        self.calls: List[Any] = []

    def of(self, op: str) -> List[Dict[str, Any]]:
        return [kw for name, kw in self.calls if name == op]


class FakeCache(Recorder):
    @operation
    def purge(self, name: str, base_url: Optional[str] = None) -> int:
        self.calls.append(("purge", {"name": name, "base_url": base_url}))
        return 0

    @operation
    def answer(self, **kwargs: Any) -> None:
        self.calls.append(("answer", kwargs))


class FakeFetcher(Recorder):
    @operation
    def fetch(self, **kwargs: Any) -> None:
        self.calls.append(("fetch", kwargs))

    @operation
    def fetch_dataset(self, **kwargs: Any) -> None:
        self.calls.append(("fetch_dataset", kwargs))


class ControllerCase(FastCase):
    """A controller on a memory:// bus with the fakes served (no tests of its own)."""

    def setUp(self) -> None:
        self.clock = threadless(self)
        self.bus = magnet.connect(f"memory://controller-{uuid.uuid4().hex}", self.clock, node="n", rpc_timeout=5)
        self.store, self.cache, self.fetcher = FakeStore(), FakeCache(), FakeFetcher()
        self.events: List[Dict[str, Any]] = []

    def start(self, *, cache: bool = True, fetcher: bool = True, allow_hosts: Any = ()) -> Controller:
        controller = Controller("controller", self.bus, node="n", clock=self.clock,
                                security=SecurityConfig(allow_hosts=tuple(allow_hosts)))

        @defer.inlineCallbacks
        def go() -> Any:
            yield bus_up(self.bus)
            yield self.bus.serve("attribute_store", self.store)
            if cache:
                yield self.bus.serve("cache", self.cache)
            if fetcher:
                yield self.bus.serve("fetcher", self.fetcher)
            yield events.subscribe(self.bus, ".", self.events.append)
            yield controller.start()

        self.wait(go())
        self.addCleanup(self.stop, controller)
        return controller

    def stop(self, controller: Controller) -> None:
        self.wait(bus_down(self.bus, controller))

    def wait(self, d: Any) -> Any:
        return drive(self, self.clock, d, seconds=30)

    def call(self, op: str, **kwargs: Any) -> Any:
        if op == "register":  # no upstream here: the check is tested in test_registration_check
            kwargs.setdefault("check", False)
        return self.wait(self.bus.call("controller", op, **kwargs))

    def refused(self, op: str, **kwargs: Any) -> RemoteError:
        try:
            self.call(op, **kwargs)
        except RemoteError as e:
            return e
        self.fail(f"{op} was not refused")

    def route(self, **kwargs: Any) -> Any:
        kwargs.setdefault("address", "proxy.reply")
        kwargs.setdefault("request_id", "r1")
        return self.call("route", **kwargs)



@expand
class ControllerTests(ControllerCase):
    # the registry ------------------------------------------------------------------

    def test_register_get_list_purge(self) -> None:
        self.start()
        record = self.call("register", name="sst", url=BASE + ".dds")  # a DAP suffix is taken off
        self.assertEqual((record["name"], record["url"], record["status"]), ("sst", BASE, "registered"))
        self.assertEqual(self.store.values["dataset:sst"]["url"], BASE)
        self.assertEqual(self.call("get", name="sst")["url"], BASE)
        self.call("register", name="other", url="http://data.example.org/o")
        self.assertEqual([r["name"] for r in self.call("list")], ["other", "sst"])
        self.assertEqual([r["name"] for r in self.call("list", pattern="^s")], ["sst"])
        purged = self.call("purge", name="sst")
        self.assertEqual(purged["status"], "purged")
        settle(self.clock)
        self.assertEqual(self.cache.of("purge"), [{"name": "sst", "base_url": BASE}])
        self.assertEqual(self.refused("purge", name="sst").remote_type, "UnknownDataset")
        self.assertEqual(self.refused("route", url=BASE + ".dds", address="a").remote_type, "Forbidden")
        kinds = [(e["kind"], e["dataset"]) for e in self.events]
        self.assertIn(("registered", "sst"), kinds)
        self.assertIn(("purged", "sst"), kinds)
        # registered again after a purge: a fresh record
        self.assertEqual(self.call("register", name="sst", url=BASE)["status"], "registered")

    def test_register_again_keeps_or_resets_the_record(self) -> None:
        controller = self.start()
        self.call("register", name="sst", url=BASE, refresh=60)
        self.store.values["dataset:sst"] = dict(self.store.values["dataset:sst"], status="fetched", size=9)
        controller.datasets.clear()
        same = self.call("register", name="sst", url=BASE)
        self.assertEqual((same["status"], same["size"], same["refresh"]), ("fetched", 9, None))
        moved = self.call("register", name="sst", url="http://data.example.org/new", replace=True)
        self.assertEqual((moved["status"], moved["size"]), ("registered", 0))

    @cases("kwargs, kind", [
        ({"name": "-bad", "url": BASE}, "InvalidName"),
        ({"name": "sst", "url": "ftp://data.example.org/x"}, "InvalidURL"),
        ({"name": "sst", "url": BASE + "?x=1"}, "InvalidURL"),
        ({"name": "sst", "url": "http://127.0.0.1/x"}, "Forbidden"),
        ({"name": "sst", "url": BASE, "refresh": 0.5}, "ValueError"),
        ({"name": "sst", "url": BASE, "refresh": True}, "ValueError"),
    ])
    def test_register_refusals(self, kwargs: Dict[str, Any], kind: str) -> None:
        self.start()
        self.assertEqual(self.refused("register", **kwargs).remote_type, kind)
        self.assertNotIn("dataset:sst", self.store.values)

    def test_unknown_and_bad_patterns(self) -> None:
        self.start()
        self.assertEqual(self.refused("get", name="nope").remote_type, "UnknownDataset")
        self.assertEqual(self.refused("list", pattern="(").remote_type, "ValueError")
        self.assertEqual(self.refused("list", pattern="x" * 300).remote_type, "ValueError")
        self.assertEqual(self.refused("get_dataset", name="nope").remote_type, "UnknownDataset")

    def test_purge_without_a_cache(self) -> None:
        self.start(cache=False)
        self.call("register", name="sst", url=BASE)
        self.assertEqual(self.call("purge", name="sst")["status"], "purged")

    def test_a_registration_of_another_controller_is_seen(self) -> None:
        controller = self.start()
        self.store.values["dataset:sst"] = {"name": "sst", "url": BASE, "status": "registered"}
        self.assertEqual(self.call("get", name="sst")["url"], BASE)
        controller.datasets.clear()
        controller._last_reload = -1e9
        self.assertEqual(self.route(url=BASE + ".dds")["dataset"], "sst")  # reloaded, then routed

    # route: the proxy's one call (issue 15) ------------------------------------------

    def test_route_by_name_is_one_post_to_the_cache(self) -> None:
        """The controller resolves the name from memory (no store read) and hands
        the request to the cache in one post: two bus hops before the first byte."""
        controller = self.start()
        self.call("register", name="sst", url=BASE)
        sent: List[str] = []
        send = self.bus.send
        self.monkeypatch().setattr(self.bus, "send", lambda address, message, **kw: (
            sent.append(address), send(address, message, **kw))[1])
        got = self.route(dataset="sst", suffix=".dds", query="time[0:1:2]", method="GET")
        self.assertEqual(got, {"via": "cache", "dataset": "sst", "url": BASE + ".dds?time[0:1:2]"})
        settle(self.clock)
        self.assertEqual(self.cache.of("answer"), [{"url": BASE + ".dds?time[0:1:2]", "method": "GET",
                                                    "address": "proxy.reply", "request_id": "r1",
                                                    "dataset": "sst"}])
        # the request was the test's call; the controller sent one post (and its reply)
        self.assertEqual([a for a in sent if a not in ("controller",) and not a.startswith("magnet.")], ["cache"])
        self.assertEqual(self.fetcher.of("fetch"), [])
        self.assertEqual(controller.per_dataset["sst"]["requests"], 1)
        # no "?": no query; an empty "?" is kept
        self.assertEqual(self.route(dataset="sst", suffix=".das")["url"], BASE + ".das")
        self.assertEqual(self.route(dataset="sst", suffix=".dds", query="")["url"], BASE + ".dds?")
        self.assertEqual(self.route(url=BASE + ".dods?x")["dataset"], "sst")

    def test_route_by_url_and_allowed_hosts(self) -> None:
        """A URL (csv's request, a forward proxy's) is resolved to the dataset it is
        under; HEAD is passed on as it is; an allowed host is routed with no dataset."""
        self.start(allow_hosts=("open.example.org",))
        self.call("register", name="sst", url=BASE)
        self.assertEqual(self.route(url=BASE + ".das", method="HEAD"),
                         {"via": "cache", "dataset": "sst", "url": BASE + ".das"})
        self.assertEqual(self.route(url="http://open.example.org/any.dds")["dataset"], None)
        settle(self.clock)
        self.assertEqual([(a["url"], a["method"], a["dataset"]) for a in self.cache.of("answer")],
                         [(BASE + ".das", "HEAD", "sst"), ("http://open.example.org/any.dds", "GET", None)])

    def test_route_without_a_cache_goes_to_a_fetcher_unstored(self) -> None:
        self.start(cache=False)
        self.wait(self.bus.transport.delete_queue("cache"))
        self.call("register", name="sst", url=BASE)
        self.assertEqual(self.route(dataset="sst", suffix=".dds")["via"], "fetcher")
        settle(self.clock)
        self.assertEqual([(f["url"], f["store"]) for f in self.fetcher.of("fetch")], [(BASE + ".dds", None)])

    @cases("kwargs, kind", [
        ({"dataset": "nope", "suffix": ".dds"}, "UnknownDataset"),
        ({"dataset": "-x", "suffix": ".dds"}, "InvalidName"),
        ({"dataset": "sst", "suffix": ".exe"}, "InvalidURL"),
        ({"dataset": "sst", "suffix": ".dds", "query": "a b"}, "InvalidURL"),
        ({"dataset": "sst", "suffix": ".dds", "method": "PUT"}, "InvalidURL"),
        ({"dataset": "sst", "url": BASE + ".dds"}, "ValueError"),
        ({}, "InvalidURL"),
        ({"url": "http://elsewhere.example.org/x.dds"}, "Forbidden"),
        ({"url": BASE + "/../../etc/passwd"}, "InvalidURL"),
        ({"url": "not a url"}, "InvalidURL"),
        ({"url": BASE + ".dds", "method": "POST"}, "InvalidURL"),
        ({"url": BASE + ".dds", "address": ""}, "ValueError"),
    ])
    def test_route_refusals(self, kwargs: Dict[str, Any], kind: str) -> None:
        controller = self.start()
        self.call("register", name="sst", url=BASE)
        try:
            self.route(**kwargs)
        except RemoteError as e:
            self.assertEqual(e.remote_type, kind)
        else:
            self.fail("not refused")
        self.assertEqual(self.cache.of("answer"), [])
        self.assertEqual(controller.totals["errors"], 1)

    def test_route_of_a_purged_dataset_is_unknown(self) -> None:
        self.start()
        self.call("register", name="sst", url=BASE)
        self.call("purge", name="sst")
        with self.assertRaises(RemoteError) as caught:
            self.route(dataset="sst", suffix=".dds")
        self.assertEqual(caught.exception.remote_type, "UnknownDataset")

    def test_no_cache_and_no_fetcher_is_an_error(self) -> None:
        controller = self.start(cache=False, fetcher=False)
        self.wait(self.bus.transport.delete_queue("cache"))
        self.wait(self.bus.transport.delete_queue("fetcher"))
        self.call("register", name="sst", url=BASE)
        self.assertEqual(self.refused("route", url=BASE + ".dds", address="a").remote_type, "Unroutable")
        self.assertEqual(controller.per_dataset["sst"]["errors"], 1)
        self.flushLoggedErrors(magnet.Unroutable)  # the bus logs an operation's unexpected failure

    # get_dataset and periodic refresh ----------------------------------------------

    def test_get_dataset(self) -> None:
        self.start()
        self.call("register", name="sst", url=BASE)
        self.assertEqual(self.call("get_dataset", name="sst"), {"name": "sst", "url": BASE, "address": "pub_sub"})
        self.assertEqual(self.call("get_dataset", name="sst", to=["p.1"])["to"], ["p.1"])
        settle(self.clock)
        self.assertEqual([f.get("to") for f in self.fetcher.of("fetch_dataset")], [None, ["p.1"]])
        self.assertEqual(self.refused("get_dataset", name="sst", to=[]).remote_type, "BadArguments")

    def test_periodic_refresh(self) -> None:
        controller = self.start()
        self.call("register", name="sst", url=BASE, refresh=10)
        self.assertEqual(set(controller.refreshers), {"sst"})
        self.clock.advance(10)
        settle(self.clock)
        self.assertEqual(len(self.fetcher.of("fetch_dataset")), 1)
        self.assertIn("refreshed", self.store.values["dataset:sst"])
        # another controller refreshed it just now: this one skips the round
        self.store.values["dataset:sst"]["refreshed"] = self.clock.seconds() + 9
        self.clock.advance(10)
        settle(self.clock)
        self.assertEqual(len(self.fetcher.of("fetch_dataset")), 1)
        # changed elsewhere (another interval): skipped, and the timer follows a change here
        self.store.values["dataset:sst"]["refresh"] = 99.0
        self.clock.advance(10)
        settle(self.clock)
        self.assertEqual(len(self.fetcher.of("fetch_dataset")), 1)
        self.call("purge", name="sst")
        self.assertEqual(controller.refreshers, {})

    def test_a_refresh_that_fails_is_logged_and_the_timer_goes_on(self) -> None:
        controller = self.start()
        self.call("register", name="sst", url=BASE, refresh=10)
        self.store.down = True
        self.clock.advance(10)
        settle(self.clock)
        self.assertTrue(controller.refreshers["sst"][1].running)
        self.flushLoggedErrors(RuntimeError)
        del self.store.values["dataset:sst"]
        self.store.down = False
        self.clock.advance(10)
        settle(self.clock)
        self.assertEqual(self.fetcher.of("fetch_dataset"), [])

    # events ------------------------------------------------------------------------

    def emit(self, kind: str, name: str, **details: Any) -> None:
        self.wait(events.emit(self.bus, kind, name, **details))
        settle(self.clock)

    def test_events_update_the_record(self) -> None:
        self.start()
        self.call("register", name="sst", url=BASE)
        self.emit("fetched", "sst", url=BASE, bytes=12, addresses=["a"])
        record = self.store.values["dataset:sst"]
        self.assertEqual((record["status"], record["size"]), ("fetched", 12))
        self.assertIsInstance(record["last_fetch"], float)  # the event's time
        later = record["last_fetch"] + 1000.0
        self.emit("saved", "sst", fetched=later, bytes=30, versions=3)
        record = self.store.values["dataset:sst"]
        self.assertEqual((record["last_fetch"], record["size"], record["versions"]), (later, 30, 3))
        self.emit("saved", "sst", fetched=50.0, versions=1)  # older: changes nothing
        self.assertEqual(self.store.values["dataset:sst"], record)
        self.emit("fetched", "sst", url="http://old.example.org/x")  # the former upstream's
        self.assertEqual(self.store.values["dataset:sst"], record)
        self.emit("failed", "sst")
        self.assertEqual(self.store.values["dataset:sst"]["status"], "failed")
        self.emit("failed", "nope")  # no record: nothing
        self.assertNotIn("dataset:nope", self.store.values)

    def test_events_that_are_not_for_the_registry(self) -> None:
        controller = self.start()
        for message in [magnet.Message(type="other"),
                        magnet.Message(type=events.EVENT, headers={events.TOPIC_HEADER: "event.fetched"}),
                        magnet.Message(body=b"{", type=events.EVENT, headers={events.TOPIC_HEADER: "event.saved.x"}),
                        magnet.Message.of_json([1], type=events.EVENT, headers={events.TOPIC_HEADER:
                                                                                   "event.saved.x"})]:
            self.assertIsNone(controller._on_event(message))

    # statistics ----------------------------------------------------------------------

    def test_record_and_stats(self) -> None:
        controller = self.start()
        self.call("register", name="sst", url=BASE)
        self.route(url=BASE + ".dds")
        self.call("record", dataset="sst", url=BASE + ".dds", hit=True, bytes=100, status=200)
        self.call("record", url=BASE + ".das", hit=False, bytes=5, status=502)  # dataset found by its URL
        self.call("record", url="http://elsewhere.example.org/x", bytes=True, count=3, requests=3, hit=True)
        self.call("record", dataset="sst", count=-1, requests=99)  # lenient: one, and no requests
        stats = self.call("get_stats")
        self.assertEqual({k: stats[k] for k in ("requests", "hits", "misses", "bytes", "errors")},
                         {"requests": 4, "hits": 4, "misses": 2, "bytes": 105, "errors": 1})
        self.assertEqual(stats["datasets"]["sst"], {"requests": 1, "hits": 1, "misses": 2, "bytes": 105})
        self.assertEqual(self.call("get", name="sst")["hits"], 1)
        # saved on the timer, and added up with another controller's saved counters
        self.clock.advance(controller.stats_interval)
        settle(self.clock)
        self.assertIn(controller.stats_key, self.store.values)
        self.store.values["stats:controller:other:1"] = {"since": 1.0, "totals": {"requests": 10, "hits": "x"},
                                                        "datasets": {"sst": {"requests": 10}, "bad": 3}}
        stats = self.call("get_stats")
        self.assertEqual((stats["requests"], stats["since"], stats["datasets"]["sst"]["requests"]), (14, 1.0, 11))

    def test_stats_when_the_store_is_down(self) -> None:
        controller = self.start()
        self.call("record", hit=True)
        self.store.down = True
        self.assertEqual(self.call("get_stats")["hits"], 1)
        self.assertRaises(RemoteError, self.wait, controller.save_stats())
        self.assertTrue(controller._stats_dirty)  # saved again later
        self.store.down = False
        self.wait(controller.save_stats())
        self.assertFalse(controller._stats_dirty)
        self.flushLoggedErrors(RuntimeError)


class CheckTests(FastCase):
    def test_names(self) -> None:
        self.assertEqual(check_name("a.b-c_1"), "a.b-c_1")
        for bad in ("", "-x", "x" * 65, 3, None):
            self.assertRaises(InvalidName, check_name, bad)

    def test_base_urls(self) -> None:
        self.assertEqual(check_base_url(BASE + ".das"), BASE)
        self.assertEqual(check_base_url(BASE + ".txt"), BASE + ".txt")
        self.assertRaises(InvalidURL, check_base_url, BASE + "#f")
        self.assertRaises(Forbidden, check_base_url, "http://10.0.0.1/x")
        self.assertEqual(check_base_url("http://10.0.0.1/x", allow_private=True), "http://10.0.0.1/x")
