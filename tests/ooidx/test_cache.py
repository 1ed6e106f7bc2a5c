"""The cache component (ooidx.datapath.cache) on the bus: lookup, store streams, serve, purge, faults."""
from __future__ import annotations

import errno
import hashlib
import os
import uuid
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

import magnet
from magnet import Message, rpc
from magnet.bus import SHARED_DEAD_LETTERS

from tests.ooidx.waiting import eventually, sleep
from ooidx.datapath import store as store_module
from ooidx.datapath.cache import PURGE_FANOUT, Cache, node_address
from ooidx.config import parse

URL = "http://upstream.example/opendap/sst.nc.dods"
HEADERS = [["Content-Type", "application/octet-stream"], ["ETag", '"abc"'],
           ["Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"], ["X-Repeat", "1"], ["X-Repeat", "2"]]




class Env:
    """A started cache on its own memory:// broker, with a Clock for its time."""

    def __init__(self, tmp_path: Any, url: Optional[str] = None, *, node: Optional[str] = None,
                 name: str = "cache", max_bytes: int = 1 << 30, max_age: float = 300.0) -> None:
        self.url = url or f"memory://cache-{uuid.uuid4().hex}"
        self.tmp_path = tmp_path
        self.node = node or "n1"
        self.name = name
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.config = parse(f"data_dir: {tmp_path}\ncomponents:\n  {name if name == 'cache' else 'cache'}:\n"
                            f"    max_bytes: {max_bytes}\n    max_age: {max_age}\n", str(tmp_path / "dx.yaml"),
                            environ={})
        self.buses: List[magnet.Bus] = []
        self.cache: Optional[Cache] = None

    def bus(self, **options: Any) -> magnet.Bus:
        options.setdefault("rpc_timeout", 10.0)
        options.setdefault("send_timeout", 10.0)
        options.setdefault("shutdown_timeout", 2.0)
        options.setdefault("node", self.node)
        bus = magnet.connect(self.url, reactor, **options)
        bus.startService()
        self.buses.append(bus)
        return bus

    @defer.inlineCallbacks
    def start(self, **bus_options: Any) -> Any:
        self.cache_bus = self.bus(**bus_options)
        self.client = self.bus()
        yield self.cache_bus.when_connected(10)
        yield self.client.when_connected(10)
        self.cache = Cache.from_config(self.name, self.cache_bus, self.config, node=self.node, instances=2, clock=self.clock)
        yield self.cache.start()
        self.cache.startService()
        return self

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if self.cache is not None and self.cache.running:
            yield self.cache.stopService()
        for bus in self.buses:
            if bus.running:
                yield bus.stopService()

    @property
    def address(self) -> str:
        return node_address(self.node)

    def lookup(self, url: str = URL, **kwargs: Any) -> defer.Deferred:
        return self.client.call(self.name, "lookup", url=url, **kwargs)

    @defer.inlineCallbacks
    def store(self, url: str = URL, body: bytes = b"hello", *, chunk: int = 1000, wait: bool = True,
              **extra: Any) -> Any:
        metadata = {"status": 200, "reason": "OK", "headers": HEADERS, "url": url, "source": "fetcher",
                    "length": len(body), "store": True, "validators": {"etag": '"abc"'}}
        metadata.update(extra)
        chunks = (body[i:i + chunk] for i in range(0, len(body), chunk))
        yield self.client.send_stream(self.address, metadata, chunks)
        if wait:
            yield self.idle()

    @defer.inlineCallbacks
    def idle(self) -> Any:
        """Until the cache has no stream or serve in progress (after one has begun)."""
        yield sleep(0.05)
        yield eventually(lambda: not self.cache._active and not self.cache._writers)

    @defer.inlineCallbacks
    def serve(self, url: str = URL, method: str = "GET", **kwargs: Any) -> Any:
        """Ask for C{url} as the proxy would; (metadata, body) of the stream, or the error reply."""
        listener = yield self.client.listen()
        rid = uuid.uuid4().hex
        yield self.client.post(self.address, "serve", url=url, method=method, address=listener.address,
                               request_id=rid, **kwargs)
        s = yield listener.next_stream(timeout=10)
        assert s.correlation_id == rid
        body = yield s.read_all(limit=1 << 30)
        yield listener.close()
        return s.metadata, body

    @defer.inlineCallbacks
    def error_of_serve(self, **kwargs: Any) -> Any:
        listener = yield self.client.listen()
        rid = uuid.uuid4().hex
        yield self.client.post(self.address, "serve", address=listener.address, request_id=rid, **kwargs)
        message = yield listener.get(timeout=10)
        yield listener.close()
        assert message.correlation_id == rid
        with pytest.raises(magnet.RemoteError) as info:
            rpc.decode_reply(message)
        return info.value

    @defer.inlineCallbacks
    def capture(self, queue: str) -> Any:
        """Everything posted to worker queue C{queue}, as (op, kwargs)."""
        got: List[Any] = []
        yield self.client.declare_worker_queue(queue)
        yield self.client.consume(queue, lambda m: got.append(rpc.decode_request(m)))
        return got

    def files(self) -> List[str]:
        root = os.path.join(str(self.tmp_path), "cache")
        return sorted(n for n in os.listdir(root) if n != ".lock")


@pytest.fixture
def env(tmp_path: Any) -> Any:
    e = Env(tmp_path)
    pytest_twisted.blockon(e.start())
    yield e
    pytest_twisted.blockon(e.stop())


# lookup and store ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_miss_then_store_then_fresh(env: Env) -> Any:
    answer = yield env.lookup()
    limit = answer.pop("max_entry_bytes")  # the largest body it would keep: under the store's size
    assert isinstance(limit, int) and 0 < limit < (yield env.client.call("cache", "stats"))["max_bytes"]
    assert answer == {"state": "miss", "node": "cache.node.n1", "validators": {}}
    yield env.store(body=b"x" * 5000)
    answer = yield env.lookup()
    assert answer["state"] == "fresh" and answer["node"] == env.address
    assert answer["validators"] == {"etag": '"abc"', "last_modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
    stats = yield env.client.call("cache", "stats")
    assert stats["entries"] == 1 and stats["misses"] == 1 and stats["stores"] == 1
    assert not any(n.startswith(".tmp-") for n in env.files())


@pytest_twisted.inlineCallbacks
def test_freshness_follows_the_clock(env: Env) -> Any:
    yield env.store()
    env.clock.advance(299)
    assert (yield env.lookup())["state"] == "fresh"
    env.clock.advance(2)
    answer = yield env.lookup()
    assert answer["state"] == "stale" and answer["validators"]["etag"] == '"abc"'


@pytest_twisted.inlineCallbacks
def test_revalidated_serve_refreshes_and_serves(env: Env) -> Any:
    yield env.store(body=b"payload")
    env.clock.advance(400)
    assert (yield env.lookup())["state"] == "stale"
    metadata, body = yield env.serve(revalidated=True)
    assert body == b"payload" and metadata["source"] == "cache"
    assert (yield env.lookup())["state"] == "fresh"


@pytest_twisted.inlineCallbacks
def test_aborted_stream_leaves_nothing(env: Env) -> Any:
    writer = env.client.open_stream(env.address, {"status": 200, "reason": "OK", "headers": [], "url": URL,
                                                  "length": 100000, "store": True})
    yield writer.write(b"x" * 70000)
    yield eventually(lambda: any(n.startswith(".tmp-") for n in env.files()))  # being written...
    assert (yield env.lookup())["state"] == "miss"  # ...but not visible
    yield writer.abort(RuntimeError("upstream broke"))
    yield env.idle()
    assert (yield env.lookup())["state"] == "miss"
    assert env.files() == []


@pytest_twisted.inlineCallbacks
def test_short_stream_is_not_kept(env: Env) -> Any:
    # a complete stream-end, but fewer bytes than the upstream announced: a truncated body
    yield env.store(body=b"x" * 1000, length=5000)
    assert (yield env.lookup())["state"] == "miss"
    assert env.files() == []


@pytest_twisted.inlineCallbacks
def test_stalled_stream_leaves_nothing(tmp_path: Any) -> Any:
    e = Env(tmp_path)
    yield e.start(stream_idle_timeout=0.3)
    try:
        writer = e.client.open_stream(e.address, {"status": 200, "reason": "OK", "headers": [], "url": URL,
                                                  "length": None, "store": True})
        yield writer.write(b"x" * 70000)
        yield sleep(0.1)
        assert e.cache._writers
        yield e.idle()  # the stream goes idle, fails, and the write is dropped
        assert (yield e.lookup())["state"] == "miss"
        assert e.files() == []
    finally:
        yield e.stop()


@pytest_twisted.inlineCallbacks
def test_streams_that_are_not_for_storing_are_drained_and_dropped(env: Env) -> Any:
    for extra in ({"store": False}, {"status": 404}, {"url": "file:///etc/passwd"}, {"headers": "bad"},
                  {"length": "many"}):
        yield env.store(body=b"y" * 3000, **extra)
    assert (yield env.lookup())["state"] == "miss"
    assert env.files() == []
    yield env.store(body=b"after")
    assert (yield env.lookup())["state"] == "fresh"


# serve --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_serve_streams_the_stored_response(env: Env) -> Any:
    records = yield env.capture("controller")
    body = os.urandom(300_000)
    yield env.store(body=body)
    metadata, got = yield env.serve()
    assert got == body
    assert metadata == {"status": 200, "reason": "OK", "headers": HEADERS, "url": URL, "source": "cache",
                        "length": len(body)}
    yield eventually(lambda: records)
    assert records == [("record", {"dataset": None, "url": URL, "hit": True, "bytes": len(body), "status": 200})]


@pytest_twisted.inlineCallbacks
def test_head_is_metadata_only(env: Env) -> Any:
    yield env.store(body=b"z" * 12345)
    metadata, got = yield env.serve(method="HEAD")
    assert got == b"" and metadata["length"] == 12345 and metadata["status"] == 200


@pytest_twisted.inlineCallbacks
def test_dataset_from_lookup_is_remembered_for_the_store_and_record(env: Env) -> Any:
    records = yield env.capture("controller")
    yield env.lookup(dataset="sst")
    yield env.store(body=b"abc")
    yield env.serve()
    yield eventually(lambda: records)
    assert records[0][1]["dataset"] == "sst"


@pytest_twisted.inlineCallbacks
def test_gone_entry_goes_to_a_fetcher(env: Env) -> Any:
    fetches = yield env.capture("fetcher")
    listener = yield env.client.listen()
    yield env.client.post(env.address, "serve", url=URL, method="GET", address=listener.address, request_id="r1")
    yield eventually(lambda: fetches)
    assert fetches == [("fetch", {"url": URL, "method": "GET", "address": listener.address, "request_id": "r1",
                                  "store": env.address, "validators": {}})]


@pytest_twisted.inlineCallbacks
def test_gone_entry_without_a_fetcher_is_an_upstream_error(env: Env) -> Any:
    error = yield env.error_of_serve(url=URL, method="GET")
    assert error.remote_type == "UpstreamError" and "cache entry gone" in error.message


@pytest_twisted.inlineCallbacks
def test_large_body_round_trip_keeps_rss_bounded(env: Env) -> Any:
    size = 50 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    baseline = rss()
    peak = [baseline]
    sampler = task.LoopingCall(lambda: peak.append(rss()))
    sampler.start(0.02)
    try:
        metadata = {"status": 200, "reason": "OK", "headers": [], "url": URL, "length": size, "store": True}
        yield env.client.send_stream(env.address, metadata, (block for _ in range(size // len(block))))
        yield env.idle()
        assert (yield env.lookup())["state"] == "fresh"
        assert (yield env.client.call("cache", "stats"))["bytes"] >= size
        listener = yield env.client.listen()
        yield env.client.post(env.address, "serve", url=URL, method="GET", address=listener.address,
                              request_id="big")
        s = yield listener.next_stream(timeout=10)
        digest = hashlib.sha256()
        total = yield s.deliver(digest.update)
    finally:
        sampler.stop()
    assert total == size
    assert digest.digest() == hashlib.sha256(block * (size // len(block))).digest()
    growth = max(peak) - baseline
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


# purge and stats ----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_purge_by_dataset_and_base_url(env: Env) -> Any:
    base = "http://upstream.example/opendap/sst.nc"
    yield env.lookup(url=base + ".das", dataset="sst")
    yield env.store(url=base + ".das")
    yield env.store(url=base + ".dds")
    yield env.store(url="http://upstream.example/opendap/other.nc.dds")
    count = yield env.client.call("cache", "purge", name="sst", base_url=base)
    assert count == 2
    assert (yield env.lookup(url=base + ".das"))["state"] == "miss"
    assert (yield env.lookup(url="http://upstream.example/opendap/other.nc.dds"))["state"] == "fresh"
    with pytest.raises(magnet.RemoteError) as info:
        yield env.client.call("cache", "purge", name="../etc")
    assert info.value.remote_type == "InvalidName"


class FakeAttributeStore:
    def __init__(self, records: Dict[str, Any]) -> None:
        self.records = records

    @magnet.operation
    def get(self, key: str) -> Any:
        if key not in self.records:
            raise KeyError(key)
        return self.records[key]


@pytest_twisted.inlineCallbacks
def test_purge_by_name_finds_the_base_url_in_the_attribute_store(env: Env) -> Any:
    base = "http://upstream.example/opendap/sst.nc"
    yield env.store(url=base + ".dds")
    yield env.store(url=base + ".dods?time[0:1]")
    yield env.store(url="http://upstream.example/opendap/other.nc.dds")
    # no attribute store yet: purge by name alone finds nothing recorded under it
    assert (yield env.client.call("cache", "purge", name="sst")) == 0
    yield env.client.serve("attribute_store", FakeAttributeStore(
        {"dataset:sst": {"name": "sst", "url": base, "status": "purged"}}))
    assert (yield env.client.call("cache", "purge", name="sst")) == 2
    assert (yield env.client.call("cache", "purge", name="unknown")) == 0  # KeyError: by name only
    assert (yield env.lookup(url="http://upstream.example/opendap/other.nc.dds"))["state"] == "fresh"


@pytest_twisted.inlineCallbacks
def test_purge_reaches_every_node(tmp_path: Any) -> Any:
    url = f"memory://cache-{uuid.uuid4().hex}"
    a, b = Env(tmp_path / "a", url, node="a"), Env(tmp_path / "b", url, node="b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    yield a.start()
    yield b.start()
    try:
        base = "http://upstream.example/d"
        yield a.store(url=base + ".dds")
        yield b.store(url=base + ".dds")
        count = yield a.cache.purge("d", base)  # directly on node a: b hears it on the fanout
        assert count == 1
        yield eventually(lambda: b.cache.store.stats()["entries"] == 0)
    finally:
        yield a.stop()
        yield b.stop()


@pytest_twisted.inlineCallbacks
def test_size_bound_evicts_least_recently_used(tmp_path: Any) -> Any:
    e = Env(tmp_path, max_bytes=3 * 1500)
    yield e.start()
    try:
        for i in range(3):
            e.clock.advance(1)
            yield e.store(url=f"http://h/{i}", body=b"x" * 1000)
        e.clock.advance(1)
        yield e.serve(url="http://h/0")
        e.clock.advance(1)
        yield e.store(url="http://h/3", body=b"x" * 1000)
        states = []
        for i in range(4):
            states.append((yield e.lookup(url=f"http://h/{i}"))["state"])
        assert states == ["fresh", "miss", "fresh", "fresh"]
        stats = yield e.client.call("cache", "stats")
        assert stats["evictions"] == 1 and stats["bytes"] <= 3 * 1500
    finally:
        yield e.stop()


@pytest_twisted.inlineCallbacks
def test_max_entry_bytes_is_what_fits(tmp_path: Any) -> Any:
    """lookup's max_entry_bytes: a body one byte over it is drained without being
    written (it could never fit with its metadata); one a little under it is kept."""
    e = Env(tmp_path, max_bytes=4000)
    yield e.start()
    try:
        url = "http://h/fits"
        limit = (yield e.lookup(url=url))["max_entry_bytes"]
        assert 0 < limit < 4000
        writes: List[int] = []
        real_writer = e.cache.store.writer

        def writer(*args: Any, **kwargs: Any) -> Any:
            made = real_writer(*args, **kwargs)
            real_write = made.write
            made.write = lambda data: (writes.append(len(data)), real_write(data))[1]
            return made

        e.cache.store.writer = writer
        yield e.store(url=url, body=b"x" * (limit + 1), headers=[])
        assert writes == [] and (yield e.lookup(url=url))["state"] == "miss"
        # what is left for the metadata (no headers here) is a few hundred bytes at most
        yield e.store(url=url, body=b"x" * (limit - 300), headers=[])
        assert sum(writes) == limit - 300
        stats = yield e.client.call("cache", "stats")
        assert stats["stores"] == 1, stats
    finally:
        yield e.stop()


# malformed requests and faults -------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_malformed_posts_never_break_the_cache(env: Env) -> Any:
    dead: List[Message] = []
    yield env.client.transport.declare_queue(SHARED_DEAD_LETTERS, durable=True)
    yield env.client.consume(SHARED_DEAD_LETTERS, dead.append)
    # bad JSON, unknown operation, no address, not a request at all
    yield env.client.send(env.address, Message(body=b"{not json", content_type="application/json", type="call",
                                               headers={"op": "serve"}))
    yield env.client.post(env.address, "explode", url=URL)
    yield env.client.post(env.address, "serve", url=URL)
    yield env.client.send(env.address, Message(body=b"hello", type="something"))
    yield eventually(lambda: len(dead) == 3)
    reasons = " | ".join(m.headers.get("x-magnet-error", "") for m in dead)
    assert "not valid JSON" in reasons and "explode" in reasons and "address" in reasons
    # a serve without a URL, or with a bad method, is answered with an error
    error = yield env.error_of_serve(method="GET")
    assert error.remote_type == "InvalidURL"
    error = yield env.error_of_serve(url=URL, method="DELETE")
    assert error.remote_type == "InvalidURL"
    with pytest.raises(magnet.RemoteError) as info:
        yield env.lookup(url="ftp://x/y")
    assert info.value.remote_type == "InvalidURL"
    with pytest.raises(magnet.BadArguments):
        yield env.client.call("cache", "lookup", link=URL)
    # still working
    yield env.store(body=b"ok")
    _, body = yield env.serve()
    assert body == b"ok"


@pytest_twisted.inlineCallbacks
def test_full_disk_refuses_to_store_and_keeps_serving(env: Env, monkeypatch: Any) -> Any:
    yield env.store(body=b"existing body")

    real_write = os.write
    root = os.path.join(str(env.tmp_path), "cache")

    def full(fd: int, data: Any) -> int:
        # ENOSPC for files on the cache's file system only (not the reactor's waker pipe)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", full)
    other = "http://upstream.example/other"
    yield env.store(url=other, body=b"n" * 200_000)
    assert (yield env.lookup(url=other))["state"] == "miss"
    assert not any(n.startswith(".tmp-") for n in env.files())
    _, body = yield env.serve()
    assert body == b"existing body"
    stats = yield env.client.call("cache", "stats")
    assert stats["store_failures"] == 1 and stats["entries"] == 1
    monkeypatch.undo()
    yield env.store(url=other, body=b"n" * 200_000)
    assert (yield env.lookup(url=other))["state"] == "fresh"


@pytest_twisted.inlineCallbacks
def test_read_only_dir_refuses_to_store_and_keeps_serving(env: Env, monkeypatch: Any) -> Any:
    yield env.store(body=b"existing body")
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT and str(path).startswith(str(env.tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(store_module.os, "open", read_only)
    other = "http://upstream.example/other"
    yield env.store(url=other, body=b"n" * 1000)
    assert (yield env.lookup(url=other))["state"] == "miss"
    _, body = yield env.serve()
    assert body == b"existing body"
    # a revalidated serve cannot save the new time, but still serves
    _, body = yield env.serve(revalidated=True)
    assert body == b"existing body"


@pytest_twisted.inlineCallbacks
def test_a_restart_finds_what_was_stored(tmp_path: Any) -> Any:
    url = f"memory://cache-{uuid.uuid4().hex}"
    e = Env(tmp_path, url)
    yield e.start()
    yield e.store(body=b"persisted")
    yield e.stop()
    e2 = Env(tmp_path, url)
    yield e2.start()
    try:
        _, body = yield e2.serve()
        assert body == b"persisted"
    finally:
        yield e2.stop()


# over RabbitMQ -------------------------------------------------------------------------------


@pytest.mark.rabbitmq
@pytest_twisted.inlineCallbacks
def test_store_lookup_serve_over_rabbitmq(tmp_path: Any, broker_url: str) -> Any:
    # a queue name of this test's own, so that other caches on the broker do not answer
    name = f"test.cache.{uuid.uuid4().hex[:10]}"
    e = Env(tmp_path, broker_url, node=f"test-{uuid.uuid4().hex[:8]}", name=name)
    yield e.start(heartbeat=5.0)
    try:
        yield e.cache_bus.serve(name, e.cache)
        assert (yield e.lookup())["state"] == "miss"
        body = os.urandom(1_000_000)
        yield e.store(body=body, chunk=100_000)
        assert (yield e.lookup())["state"] == "fresh"
        metadata, got = yield e.serve()
        assert got == body and metadata["source"] == "cache" and metadata["length"] == len(body)
        metadata, got = yield e.serve(method="HEAD")
        assert got == b""
    finally:
        for queue in (name, name + ".dead"):
            yield e.client.transport.delete_queue(queue).addErrback(lambda _: None)
        yield e.stop()
