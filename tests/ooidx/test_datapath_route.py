"""The shorter miss (issue 15, docs/data-path.md "route") on RabbitMQ: proxyng,
controller and cache in this process, each on a bus of its own in a virtual
host of the test's own, and a twisted.web upstream on loopback that counts its
requests. No fetcher component runs: a miss is fetched by the cache itself.

- a request by name is two bus hops before its first byte: the proxy's one
  request (controller.route), the controller's one post (cache.answer);
- concurrent misses for one URL are one upstream request (the per-URL lock);
- the body of a miss is stored on the cache's node as it passes (the tee) and
  the stored copy equals it;
- once a new version of a dataset has been fetched (its fetched event), the
  next read returns it, not the stored old one.
"""
from __future__ import annotations

import hashlib
import uuid
from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.web import resource, server

import magnet
from magnet import rpc

from ooidx import events
from ooidx.config import CacheOptions, FetcherOptions, SecurityConfig
from ooidx.datapath.cache import Cache
from ooidx.datapath.controller import Controller
from ooidx.datapath.proxy import Proxy
from ooidx.node.bootstrap import declare_topology

from tests.support.doubles import FakeStore
from tests.ooidx.waiting import eventually

DDS = b"Dataset {\n    Float64 time[time = 3];\n} sst;\n"


class Upstream(resource.Resource):
    """/sst.nc.SUFFIX answers the current version; /slow/... the same after a delay."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.version = 1
        self.requests: List[bytes] = []
        self.delay = 0.0
        self.big = bytes(range(251)) * (2 * 1024 * 1024 // 251)

    def render_GET(self, request: server.Request) -> Any:
        self.requests.append(request.uri)
        body = self.big if b"big" in request.uri else DDS + b"# version %d\n" % self.version
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if self.delay:
            task.deferLater(reactor, self.delay, lambda: (request.write(body), request.finish()))
            return server.NOT_DONE_YET
        return body


class Stack:
    def __init__(self, url: str, tmp: Any) -> None:
        self.url = url
        self.tmp = tmp
        self.buses: Dict[str, magnet.Bus] = {}
        self.sent: Dict[str, List[Tuple[str, str]]] = {}
        self.upstream = Upstream()

    def bus(self, name: str) -> magnet.Bus:
        bus = magnet.connect(self.url, reactor, node="n1", rpc_timeout=10.0, send_timeout=10.0,
                             shutdown_timeout=2.0)
        sent = self.sent.setdefault(name, [])
        send = bus.send

        def counting(address: str, message: Any, **kwargs: Any) -> Any:
            if message.type == rpc.CALL:
                try:
                    op, _ = rpc.decode_request(message)
                except Exception:  # noqa: BLE001
                    op = "?"
                sent.append((address, op))
            return send(address, message, **kwargs)

        bus.send = counting  # type: ignore[method-assign]
        bus.startService()
        self.buses[name] = bus
        return bus

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.http = reactor.listenTCP(0, server.Site(self.upstream), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.http.getHost().port}/data/sst.nc"
        security = SecurityConfig(allow_private=True, allow_hosts=("127.0.0.1",))
        store_bus = self.bus("attribute_store")
        yield store_bus.when_connected(10)
        yield declare_topology(store_bus)
        self.store = FakeStore()
        yield store_bus.serve("attribute_store", self.store)
        self.controller = Controller("controller", self.bus("controller"), node="n1", security=security)
        self.cache = Cache("cache", self.bus("cache"), node="n1", directory=str(self.tmp / "cache"),
                           options=CacheOptions(max_age=300.0), security=security,
                           fetch_options=FetcherOptions(timeout=10.0), lock_timeout=10.0)
        self.proxy = Proxy("proxyng", self.bus("proxyng"), node="n1", port=0, interface="127.0.0.1",
                           answer_timeout=20.0, lookup_timeout=10.0, hot_ttl=0)
        self.client = self.bus("client")
        for component in (self.controller, self.cache, self.proxy):
            yield component.bus.when_connected(10)
            yield component.start()
        yield self.client.when_connected(10)
        yield self.client.call("controller", "register", name="sst", url=self.base, check=False)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for component in (self.proxy, self.cache, self.controller):
            if component.started:
                try:
                    yield component.stopService()
                except Exception:  # noqa: BLE001 - the rest must stop too
                    pass
        for bus in self.buses.values():
            yield bus.stopService()
        yield self.http.stopListening()

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        response = yield treq.get(f"http://127.0.0.1:{self.proxy.port}{path}", persistent=False)
        body = yield treq.content(response)
        return response.code, response.headers.getRawHeaders(b"x-ooidx-source", [b""])[0].decode(), body

    def requests_to(self, name: str) -> List[Tuple[str, str]]:
        """The requests a component's bus sent (not replies, not streams), events left out."""
        return [(a, op) for a, op in self.sent[name] if a != events.NOTIFICATION]


@pytest_twisted.async_yield_fixture
async def stack(vhost: str, tmp_path: Any) -> Any:
    s = Stack(vhost, tmp_path)
    try:
        await s.start()
        yield s
    finally:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_a_miss_by_name_is_two_bus_hops(stack: Stack) -> None:
    for sent in stack.sent.values():
        sent.clear()
    code, source, body = await stack.get("/datasets/sst.dds?time")
    assert (code, source) == (200, "fetcher")
    assert body.startswith(DDS)
    assert stack.upstream.requests == [b"/data/sst.nc.dds?time"]
    # hop 1: the proxy names what it wants once; no attribute_store read
    assert stack.requests_to("proxyng") == [("controller", "route")]
    # hop 2: the controller hands it to the cache in one post; no lookup, no fetcher
    assert stack.requests_to("controller") == [("cache", "answer")]
    # the cache fetched it, streamed it to the proxy, and asked nobody else (it posts the record)
    assert {op for _, op in stack.requests_to("cache")} <= {"record"}
    # a hit is the same two hops
    for sent in stack.sent.values():
        sent.clear()
    await eventually(lambda: stack.cache.counters["stores"] == 1, what="stored")
    code, source, again = await stack.get("/datasets/sst.dds?time")
    assert (code, source, again) == (200, "cache", body)
    assert stack.requests_to("proxyng") == [("controller", "route")]
    assert stack.requests_to("controller") == [("cache", "answer")]
    assert len(stack.upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_are_one_upstream_request(stack: Stack) -> None:
    stack.upstream.delay = 0.5
    results = await defer.gatherResults([defer.ensureDeferred(stack.get("/datasets/sst.dds")) for _ in range(6)])
    assert [code for code, _, _ in results] == [200] * 6
    assert len({body for _, _, body in results}) == 1
    assert stack.upstream.requests == [b"/data/sst.nc.dds"]
    assert sorted(source for _, source, _ in results) == ["cache"] * 5 + ["fetcher"]
    assert stack.cache.counters["waited"] == 5


@pytest_twisted.ensureDeferred
async def test_a_miss_is_stored_as_it_passes_and_equals_the_body(stack: Stack) -> None:
    code, source, body = await stack.get("/datasets/sst.dods?big")
    assert (code, source) == (200, "fetcher")
    assert body == stack.upstream.big
    # the proxy and the cache are in this process: the 2 MiB body went socket to socket (splice)
    assert stack.cache.fetcher.spliced == 1
    await eventually(lambda: stack.cache.counters["stores"] == 1, what="stored")
    entry = stack.cache.store.get(stack.base + ".dods?big", touch=False)
    with stack.cache.store.open_body(entry) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(body).digest()
    assert entry.dataset == "sst"
    code, source, again = await stack.get("/datasets/sst.dods?big")
    assert (code, source, again == body) == (200, "cache", True)
    assert len(stack.upstream.requests) == 1
    # nothing went to the cache's node address (no second stream through the bus)
    assert all(address != "cache.node.n1" for sent in stack.sent.values() for address, _ in sent)


@pytest_twisted.ensureDeferred
async def test_after_a_new_version_is_fetched_the_next_read_is_it(stack: Stack) -> None:
    seen: List[Dict[str, Any]] = []
    await events.subscribe(stack.client, r"^event\.fetched\.sst$", seen.append)
    _, _, first = await stack.get("/datasets/sst.dds")
    assert first.endswith(b"# version 1\n")
    await eventually(lambda: stack.cache.counters["stores"] == 1, what="stored")
    _, source, hit = await stack.get("/datasets/sst.dds")
    assert (source, hit) == ("cache", first)
    stack.upstream.version = 2
    # what a fetcher says after fetch_dataset got the new version; a reader is told it
    await events.emit(stack.buses["client"], "fetched", "sst", url=stack.base, addresses=1, delivered=1, bytes=10)
    await eventually(lambda: seen, what="the reader notified")
    _, _, after = await stack.get("/datasets/sst.dds")
    assert after.endswith(b"# version 2\n"), after
