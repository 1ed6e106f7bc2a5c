"""The cache's answer (issue 15, docs/data-path.md "route"): the controller's one
post for a request. A fresh entry is streamed; a miss is fetched on the cache's
node (a fake Agent here) and its body written to the store on its way to the
client (the tee: no second stream on the bus, the client never waits on the
disk); concurrent misses for one URL share one upstream fetch (the per-URL
lock, bounded); a dataset's change event drops what was stored of it. On a
memory:// bus on a threadless Clock; the RabbitMQ version is in
tests/ooidx/test_cache.py."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

import magnet
from magnet import RemoteError, StreamError
from magnet.rpc import decode_reply

from ooidx import events
from ooidx.config import CacheOptions, FetcherOptions, SecurityConfig
from ooidx.datapath.cache import Cache

from tests.fast.core.support import FastCase, LogEvents, bus_down, bus_up, drive, expand, settle, threadless
from tests.fast.datapath.test_cache_contract import FakeStore, Recorder
from tests.fast.datapath.test_fetcher_contract import HOST, FakeAgent, FakeResponse

BASE = f"http://{HOST}/opendap/sst.nc"
URL = BASE + ".dods?time"


@expand
class CacheAnswerTests(FastCase):
    def setUp(self) -> None:
        self.clock = threadless(self)
        self.bus = magnet.connect(f"memory://answer-{uuid.uuid4().hex}", self.clock, node="n", rpc_timeout=5)
        self.controller = Recorder()
        self.streams: List[Dict[str, Any]] = []
        self.messages: List[Any] = []
        self.events: List[Dict[str, Any]] = []

    def wait(self, d: Any) -> Any:
        return drive(self, self.clock, d, seconds=30)

    def start(self, answers: Dict[str, Any], lock_timeout: float = 5.0, **options: Any) -> Cache:
        cache = Cache("cache", self.bus, node="n", clock=self.clock, directory=str(self.tmp_path() / "cache"),
                      options=CacheOptions(**options), lock_timeout=lock_timeout,
                      security=SecurityConfig(allow_hosts=(HOST,)), fetch_options=FetcherOptions(timeout=30.0))
        self.agent = FakeAgent(answers)
        cache.fetcher._agent = self.agent

        @defer.inlineCallbacks
        def go() -> Any:
            yield bus_up(self.bus)
            yield self.bus.serve("attribute_store", FakeStore())
            yield self.bus.serve("controller", self.controller)
            yield events.subscribe(self.bus, ".", self.events.append)
            self.listener = yield self.bus.listen(self.messages.append, on_stream=self.on_stream)
            yield cache.start()

        self.wait(go())
        self.addCleanup(self.stop, cache)
        self.cache = cache
        return cache

    def stop(self, cache: Cache) -> None:
        self.wait(bus_down(self.bus, cache))

    def on_stream(self, stream: Any) -> None:
        chunks: List[bytes] = []
        got: Dict[str, Any] = {"metadata": stream.metadata, "chunks": chunks, "id": stream.correlation_id}
        self.streams.append(got)
        stream.deliver(chunks.append).addBoth(lambda r: [got.setdefault("end", r), None][1])

    def answer(self, request_id: str = "r1", **kwargs: Any) -> None:
        kwargs.setdefault("url", URL)
        kwargs.setdefault("address", self.listener.address)
        self.wait(self.bus.post("cache", "answer", request_id=request_id, **kwargs))
        settle(self.clock)

    def body(self, request_id: str) -> bytes:
        got = [s for s in self.streams if s["id"] == request_id]
        self.assertEqual(len(got), 1, request_id)
        self.assertNotIsInstance(got[0].get("end"), Exception)
        self.assertIn("end", got[0])
        return b"".join(got[0]["chunks"])

    def source(self, request_id: str) -> str:
        return [s for s in self.streams if s["id"] == request_id][0]["metadata"]["source"]

    def hold_disk_writes(self, cache: Cache) -> List[Callable[[], None]]:
        """The cache's body writes wait, in order, until the test runs them (a slow disk)."""
        held: List[Callable[[], None]] = []
        io = cache._write_io

        def slow_io(f: Any, *args: Any, **kwargs: Any) -> Deferred:
            if getattr(f, "__name__", "") == "_write_queued":
                d: Deferred = Deferred()
                held.append(lambda: io(f, *args, **kwargs).chainDeferred(d))
                return d
            return io(f, *args, **kwargs)

        self.monkeypatch().setattr(cache, "_write_io", slow_io)
        return held

    def stored(self) -> Any:
        return self.wait(self.cache._io(self.cache.store.get, URL, touch=False))

    def test_a_miss_is_fetched_here_and_teed_into_the_store(self) -> None:
        cache = self.start({URL: FakeResponse(chunks=[b"abc", b"def"], headers={"ETag": '"e1"'})})
        sent: List[str] = []
        send = self.bus.send
        self.monkeypatch().setattr(self.bus, "send", lambda address, message, **kw: (
            sent.append(address), send(address, message, **kw))[1])
        self.answer(dataset="sst")
        self.assertEqual(self.body("r1"), b"abcdef")
        self.assertEqual(self.source("r1"), "fetcher")
        entry = self.stored()
        self.assertEqual((entry.size, entry.dataset, entry.validators["etag"]), (6, "sst", '"e1"'))
        with open(self.cache.store.open_body(entry).name, "rb") as f:
            self.assertEqual(f.read(), b"abcdef")
        # no second stream: nothing went to the cache's node address
        self.assertNotIn("cache.node.n", sent)
        self.assertEqual(cache.counters["stores"], 1)
        self.assertIn(("cached", "sst"), [(e["kind"], e["dataset"]) for e in self.events])
        # the next request is a hit, from the store, without the upstream
        self.answer(request_id="r2")
        self.assertEqual((self.body("r2"), self.source("r2")), (b"abcdef", "cache"))
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual((cache.counters["hits"], cache.counters["misses"]), (1, 1))

    def test_concurrent_misses_share_one_upstream_fetch(self) -> None:
        pending: Deferred = Deferred()
        cache = self.start({URL: [pending]})
        for i in range(5):
            self.answer(request_id=f"r{i}")
        self.assertEqual(len(self.agent.requests), 1)  # one upstream fetch, four waiting
        self.assertEqual(cache.counters["waited"], 4)
        self.assertEqual(self.streams, [])
        pending.callback(FakeResponse(chunks=[b"x" * 1000, b"y" * 1000]))
        settle(self.clock)
        for i in range(5):
            self.assertEqual(self.body(f"r{i}"), b"x" * 1000 + b"y" * 1000)
        self.assertEqual(sorted(self.source(f"r{i}") for i in range(5)), ["cache"] * 4 + ["fetcher"])
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(cache._fills, {})

    def test_a_follower_waits_bounded_then_goes_upstream_unstored(self) -> None:
        pending: Deferred = Deferred()
        cache = self.start({URL: [pending, FakeResponse(chunks=[b"later"])]}, lock_timeout=2.0)
        self.answer(request_id="r1")
        self.answer(request_id="r2")
        self.clock.advance(1.9)
        settle(self.clock)
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(0.2)
        settle(self.clock)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(self.body("r2"), b"later")
        self.assertIsNone(self.stored())  # the follower's copy is not stored
        pending.callback(FakeResponse(chunks=[b"first"]))
        settle(self.clock)
        self.assertEqual(self.body("r1"), b"first")
        self.assertEqual(self.stored().size, 5)
        self.assertEqual(cache._fills, {})

    def test_the_client_never_waits_on_the_disk(self) -> None:
        response = FakeResponse(chunks=[b"a" * 300, b"b" * 300, b"c" * 300])
        cache = self.start({URL: response})
        held = self.hold_disk_writes(cache)
        self.answer()
        self.assertEqual(self.body("r1"), b"a" * 300 + b"b" * 300 + b"c" * 300)  # whole, the disk not done
        self.assertEqual(response.transport.paused, 0)  # the upstream never waited for the disk
        self.assertEqual(len(held), 1)  # the disk writes wait in order, one at a time
        self.assertIsNone(self.stored())
        while held:
            held.pop(0)()
            settle(self.clock)
        self.assertEqual(self.stored().size, 900)

    def test_a_disk_far_behind_holds_the_transfer_then_drops_the_copy(self) -> None:
        """Past TEE_BUFFER bytes behind, the upstream is paused for the disk, at most
        TEE_STALL seconds; a disk stuck that long loses the copy, never the client."""
        from ooidx.datapath import cache as cache_module
        self.monkeypatch().setattr(cache_module, "TEE_BUFFER", 500)
        response = FakeResponse(chunks=[b"a" * 300, b"b" * 300, b"c" * 300], end=None)
        cache = self.start({URL: response})
        io = cache._write_io
        self.monkeypatch().setattr(cache, "_write_io", lambda f, *a, **k: Deferred() if f.__name__ == "_write_queued"
                                   else io(f, *a, **k))
        self.answer()
        self.assertEqual(response.transport.paused, 1)  # held for the disk
        self.assertEqual(response.transport.resumed, 0)
        self.clock.advance(cache_module.TEE_STALL)
        settle(self.clock)
        self.assertEqual(response.transport.resumed, 1)  # given up on the copy, not the client
        response.protocol.connectionLost(Failure(ResponseDone()))
        settle(self.clock)
        self.assertEqual(len(self.body("r1")), 900)
        self.assertIsNone(self.stored())

    def test_a_disk_that_catches_up_keeps_the_copy(self) -> None:
        from ooidx.datapath import cache as cache_module
        self.monkeypatch().setattr(cache_module, "TEE_BUFFER", 500)
        response = FakeResponse(chunks=[b"a" * 300, b"b" * 300, b"c" * 300], end=None)
        cache = self.start({URL: response})
        held = self.hold_disk_writes(cache)
        self.answer()
        self.assertEqual(response.transport.paused, 1)
        while held:
            held.pop(0)()
            settle(self.clock)
        self.assertEqual(response.transport.resumed, 1)  # the disk caught up: the transfer goes on
        response.protocol.connectionLost(Failure(ResponseDone()))
        settle(self.clock)
        self.assertEqual(self.body("r1"), b"a" * 300 + b"b" * 300 + b"c" * 300)
        self.assertEqual(self.stored().size, 900)

    def test_a_store_that_cannot_open_the_copy_says_why_and_the_client_gets_its_body(self) -> None:
        """A read-only (or full) cache disk: the store cannot even open the copy.
        The client gets the whole body, nothing is kept, and the log says why
        (it said nothing before: the copy that never opened was dropped silently)."""
        cache = self.start({URL: FakeResponse(chunks=[b"abc", b"def"])})
        logged = LogEvents(self)

        def read_only(*args: Any, **kwargs: Any) -> Any:
            raise OSError(30, "Read-only file system")

        self.monkeypatch().setattr(cache.store, "writer", read_only)
        self.answer()
        self.assertEqual(self.body("r1"), b"abcdef")
        self.assertIsNone(self.stored())
        self.assertEqual(cache.counters["store_failures"], 1)
        self.assertTrue([t for t in logged.texts() if "not keeping" in t and "Read-only file system" in t],
                        logged.texts())

    def test_a_body_cut_short_is_not_kept(self) -> None:
        cache = self.start({URL: FakeResponse(chunks=[b"abc"], length=10, end="broken")})
        self.answer()
        got = self.streams[0]
        self.assertIsInstance(got["end"].value, StreamError)
        self.assertIsNone(self.stored())
        self.assertEqual(cache.counters["stores"], 0)

    def test_a_new_version_is_read_after_its_fetched_event(self) -> None:
        """Fresh after a change: once version 2 was fetched (the fetched event), no
        read returns version 1 from the store (it would for max_age without)."""
        cache = self.start({URL: [FakeResponse(chunks=[b"version 1"]), FakeResponse(chunks=[b"version 2"])]},
                           max_age=300.0)
        self.answer(dataset="sst")
        self.assertEqual(self.body("r1"), b"version 1")
        self.answer(request_id="r2", dataset="sst")
        self.assertEqual(self.body("r2"), b"version 1")  # a hit
        self.wait(events.emit(self.bus, "fetched", "sst", url=BASE))
        settle(self.clock)
        self.answer(request_id="r3", dataset="sst")
        self.assertEqual(self.body("r3"), b"version 2")
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(cache.counters["invalidated"], 1)

    def test_a_change_during_a_fetch_keeps_nothing_of_it(self) -> None:
        pending: Deferred = Deferred()
        self.start({URL: [pending]})
        self.answer(dataset="sst")
        self.wait(events.emit(self.bus, "saved", "sst", url=BASE))
        settle(self.clock)
        pending.callback(FakeResponse(chunks=[b"old"]))
        settle(self.clock)
        self.assertEqual(self.body("r1"), b"old")  # the client gets what it asked for
        self.assertIsNone(self.stored())  # but it is not kept

    def test_a_stale_entry_is_revalidated(self) -> None:
        cache = self.start({URL: [FakeResponse(chunks=[b"abc"], headers={"ETag": '"e1"'}),
                                  FakeResponse(code=304, chunks=[], phrase=b"Not Modified")]}, max_age=10.0)
        self.answer()
        self.clock.advance(11)
        self.answer(request_id="r2")
        self.assertEqual((self.body("r2"), self.source("r2")), (b"abc", "cache"))
        self.assertEqual(self.agent.requests[1][2].getRawHeaders(b"if-none-match"), [b'"e1"'])
        self.assertEqual(cache.counters["stale"], 1)

    def test_upstream_errors_are_error_replies(self) -> None:
        self.start({})  # nothing answers: connection refused
        self.answer()
        with self.assertRaises(RemoteError) as caught:
            decode_reply(self.messages[0])
        self.assertEqual((caught.exception.remote_type, self.messages[0].correlation_id), ("UpstreamError", "r1"))
        self.assertIsNone(self.stored())

    def test_bad_answers(self) -> None:
        cache = self.start({})
        self.answer(url="ftp://x")
        self.answer(request_id="r2", method="POST")
        self.answer(request_id="r3", dataset="../x")
        kinds = []
        for message in self.messages:
            try:
                decode_reply(message)
            except RemoteError as e:
                kinds.append((e.remote_type, message.correlation_id))
        self.assertEqual(kinds, [("InvalidURL", "r1"), ("InvalidURL", "r2"), ("InvalidName", "r3")])
        self.answer(request_id="r4", address="")  # nowhere to answer: dropped, not retried
        self.assertEqual(self.agent.requests, [])
        self.assertEqual(cache.counters["lookups"], 0)
