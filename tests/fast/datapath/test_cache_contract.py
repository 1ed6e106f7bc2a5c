"""The cache (ooidx.datapath.cache) on a memory:// bus on a threadless Clock,
its DiskStore in a temporary directory: a stream with "store": true is kept,
lookup says fresh/stale/miss, serve streams it back, purge drops it (and tells
the other nodes), bad input is refused. The RabbitMQ version stays in
tests/ooidx/test_cache.py."""
from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional

from twisted.internet import defer

import magnet
from magnet import RemoteError, operation, rpc
from magnet.rpc import decode_reply

from ooidx import events
from ooidx.config import CacheOptions
from ooidx.datapath.cache import PURGE_FANOUT, Cache

from tests.fast.core.support import FastCase, bus_down, bus_up, cases, drive, expand, settle, threadless

URL = "http://data.example.org/opendap/sst.nc.dods?time"
BASE = "http://data.example.org/opendap/sst.nc"


class FakeStore:
    @operation
    def get(self, key: str) -> Any:
        if key == "dataset:sst":
            return {"name": "sst", "url": BASE, "status": "purged"}
        raise KeyError(key)


class Recorder:
    def __init__(self) -> None:
        self.calls: List[Any] = []

    @operation
    def fetch(self, **kwargs: Any) -> None:
        self.calls.append(("fetch", kwargs))

    @operation
    def record(self, **kwargs: Any) -> None:
        self.calls.append(("record", kwargs))


@expand
class CacheTests(FastCase):
    def setUp(self) -> None:
        self.clock = threadless(self)
        self.bus = magnet.connect(f"memory://cache-{uuid.uuid4().hex}", self.clock, node="n", rpc_timeout=5)
        self.fetcher, self.controller = Recorder(), Recorder()
        self.events: List[Dict[str, Any]] = []
        self.purges: List[Any] = []
        self.streams: List[Any] = []
        self.messages: List[Any] = []

    def wait(self, d: Any) -> Any:
        return drive(self, self.clock, d, seconds=30)

    def start(self, fetcher: bool = True, **options: Any) -> Cache:
        cache = Cache("cache", self.bus, node="n", clock=self.clock, directory=str(self.tmp_path() / "cache"),
                      options=CacheOptions(**options))

        @defer.inlineCallbacks
        def go() -> Any:
            yield bus_up(self.bus)
            yield self.bus.serve("attribute_store", FakeStore())
            yield self.bus.serve("controller", self.controller)
            if fetcher:
                yield self.bus.serve("fetcher", self.fetcher)
            else:
                yield self.bus.transport.delete_queue("fetcher")
            yield events.subscribe(self.bus, ".", self.events.append)
            yield self.bus.subscribe(PURGE_FANOUT, self.purges.append)
            self.listener = yield self.bus.listen(self.messages.append, on_stream=self.on_stream)
            yield cache.start()

        self.wait(go())
        self.addCleanup(self.stop, cache)
        return cache

    def on_stream(self, stream: Any) -> None:
        chunks: List[bytes] = []
        got = {"metadata": stream.metadata, "chunks": chunks, "id": stream.correlation_id}
        self.streams.append(got)
        stream.deliver(chunks.append).addBoth(lambda r: got.setdefault("end", r))

    def stop(self, cache: Cache) -> None:
        self.wait(bus_down(self.bus, cache))

    def store(self, url: str = URL, body: bytes = b"0123456789" * 10, **metadata: Any) -> None:
        meta = {"store": True, "url": url, "status": 200, "reason": "OK", "length": len(body),
                "headers": [["Content-Type", "application/octet-stream"]], "validators": {"etag": '"v1"'}}
        meta.update(metadata)
        self.wait(self.bus.send_stream("cache.node.n", meta, [body[:50], body[50:]]))
        settle(self.clock)

    def call(self, op: str, **kwargs: Any) -> Any:
        return self.wait(self.bus.call("cache", op, **kwargs))

    def serve(self, **kwargs: Any) -> None:
        kwargs.setdefault("address", self.listener.address)
        self.wait(self.bus.post("cache.node.n", "serve", **kwargs))
        settle(self.clock)

    def test_store_lookup_serve(self) -> None:
        cache = self.start(max_age=60.0)
        self.assertEqual(self.call("lookup", url=URL)["state"], "miss")
        self.store(dataset="sst")
        found = self.call("lookup", url=URL, dataset="sst")
        self.assertEqual((found["state"], found["node"], found["size"]), ("fresh", "cache.node.n", 100))
        self.assertEqual(found["validators"], {"etag": '"v1"', "last_modified": None})
        self.assertGreater(found["max_entry_bytes"], 0)
        self.assertIn(("cached", "sst"), [(e["kind"], e["dataset"]) for e in self.events])
        self.serve(url=URL, request_id="r1")
        got = self.streams[0]
        self.assertEqual((got["metadata"]["status"], got["metadata"]["source"], got["id"]), (200, "cache", "r1"))
        self.assertEqual(b"".join(got["chunks"]), b"0123456789" * 10)
        self.assertIn("record", [c[0] for c in self.controller.calls])
        self.serve(url=URL, method="HEAD", request_id="r2", revalidated=True)
        self.assertEqual(self.streams[1]["chunks"], [])
        self.clock.advance(61)
        self.assertEqual(self.call("lookup", url=URL)["state"], "stale")
        stats = self.call("stats")
        self.assertEqual((stats["entries"], stats["hits"], stats["stores"], stats["node"]), (1, 2, 1, "n"))
        self.assertEqual((stats["lookups"], stats["misses"], stats["stale"]), (3, 1, 1))
        self.assertEqual(cache.counters["served_bytes"], 100)

    @cases("metadata", [{"store": False}, {"status": 404}, {"url": "ftp://x"}, {"length": -1},
                        {"length": 10 ** 12}])
    def test_streams_not_kept(self, metadata: Dict[str, Any]) -> None:
        self.start()
        self.store(**metadata)
        self.assertEqual(self.call("lookup", url=URL)["state"], "miss")

    def test_a_stream_longer_than_said_is_not_kept(self) -> None:
        cache = self.start(max_bytes=4096)
        self.store(body=b"x" * 3000, length=None)
        self.store(url=URL + "2", body=b"x" * 5000, length=None)  # larger than the store: written, refused
        self.assertEqual(self.call("lookup", url=URL)["state"], "fresh")
        self.assertEqual(self.call("lookup", url=URL + "2")["state"], "miss")
        self.assertEqual(cache.counters["store_failures"], 1)

    def test_purge(self) -> None:
        self.start()
        self.store(dataset="sst")
        self.store(url="http://data.example.org/opendap/sst.nc.das")  # no dataset: found by base URL
        self.store(url="http://data.example.org/other.das")
        self.assertEqual(self.call("purge", name="sst"), 2)  # base URL from the attribute store
        settle(self.clock)
        self.assertEqual(self.call("lookup", url=URL)["state"], "miss")
        self.assertEqual(self.call("lookup", url="http://data.example.org/other.das")["state"], "fresh")
        op, kwargs = rpc.decode_request(self.purges[0])
        self.assertEqual((op, kwargs["name"], kwargs["base_url"]), ("purge", "sst", BASE))
        self.assertEqual(self.call("purge", name="other", base_url="http://data.example.org/other"), 1)
        self.assertEqual(self.call("purge", name="unknown"), 0)
        self.assertEqual(self.refused("purge", name="-x"), "InvalidName")
        self.assertEqual(self.refused("purge", name="x", base_url="ftp://x"), "InvalidURL")

    def test_a_purge_broadcast_from_another_node(self) -> None:
        self.start()
        self.store(dataset="sst")
        for message in [rpc.request("purge", {"name": "sst", "base_url": 3}), rpc.request("stats", {}),
                        magnet.Message(body=b"{", type="call")]:
            self.wait(self.bus.send(PURGE_FANOUT, message))
            settle(self.clock)
        self.assertEqual(self.call("lookup", url=URL)["state"], "fresh")  # those are ignored
        self.wait(self.bus.send(PURGE_FANOUT, rpc.request("purge", {"name": "sst", "base_url": None,
                                                                    "origin": "elsewhere"})))
        settle(self.clock)
        self.assertEqual(self.call("lookup", url=URL)["state"], "miss")

    def refused(self, op: str, **kwargs: Any) -> str:
        try:
            self.call(op, **kwargs)
        except RemoteError as e:
            return e.remote_type
        self.fail("not refused")

    def test_lookup_refusals(self) -> None:
        self.start()
        self.assertEqual(self.refused("lookup", url="file:///etc/passwd"), "InvalidURL")
        self.assertEqual(self.refused("lookup", url=URL, dataset="../x"), "InvalidName")

    def test_serve_of_what_is_gone_asks_a_fetcher(self) -> None:
        cache = self.start()
        self.serve(url=URL, request_id="r1")
        self.assertEqual(self.fetcher.calls, [("fetch", {"url": URL, "method": "GET", "address": self.listener.address,
                                                         "request_id": "r1", "store": "cache.node.n",
                                                         "validators": {}})])
        self.assertEqual(cache.counters["gone"], 1)

    def test_serve_of_what_is_gone_without_a_fetcher_is_an_error_reply(self) -> None:
        self.start(fetcher=False)
        self.serve(url=URL, request_id="r1")
        self.assertEqual(len(self.messages), 1)
        with self.assertRaises(RemoteError) as caught:
            decode_reply(self.messages[0])
        self.assertEqual(caught.exception.remote_type, "UpstreamError")

    @cases("kwargs, kind", [({"url": "ftp://x"}, "InvalidURL"), ({"url": URL, "method": "POST"}, "InvalidURL"),
                            ({"url": URL, "dataset": "-x"}, "InvalidName")])
    def test_bad_serves_get_an_error_reply(self, kwargs: Dict[str, Any], kind: str) -> None:
        self.start()
        self.serve(request_id="r9", **kwargs)
        self.assertEqual(len(self.messages), 1)
        with self.assertRaises(RemoteError) as caught:
            decode_reply(self.messages[0])
        self.assertEqual((caught.exception.remote_type, self.messages[0].correlation_id), (kind, "r9"))

    def test_the_recent_dataset_names_are_one_string_each_and_bounded(self) -> None:
        # every lookup decodes its own copy of the name from JSON; the soak's 10,000
        # remembered pairs kept 10,000 copies of a few names (docs/reliability.md#soak)
        from ooidx.datapath import cache as cache_module
        self.patch(cache_module, "RECENT_DATASETS", 5)
        cache = self.start()
        urls = [f"{BASE}.dods?time[{i}]" for i in range(7)]
        for url in urls:
            self.assertEqual(self.call("lookup", url=url, dataset="sst")["state"], "miss")
        remembered = cache._recent_datasets
        self.assertEqual(list(remembered), urls[2:])  # the last five
        self.assertEqual({id(name) for name in remembered.values()}, {id(remembered[urls[-1]])})

    def test_a_serve_without_an_address_is_dead_lettered(self) -> None:
        cache = self.start()
        self.wait(self.bus.post("cache.node.n", "serve", url=URL, address=""))
        self.wait(self.bus.send("cache.node.n", magnet.Message(body=b"x", type="other")))
        settle(self.clock)
        self.assertEqual(cache.counters["hits"], 0)
