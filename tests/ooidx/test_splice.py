"""A large body spliced socket to socket (ooidx.datapath.splice, issue 15):
proxyng, controller and cache in this process on a memory:// bus, a
twisted.web upstream on loopback, and clients that read whole, leave, or
stop reading. Every case checks what the client got, what the cache kept,
and that the splice gave back what it took (pipes, the client's connection).

- a miss goes socket to socket, is stored as it passes, and the stored copy
  is the body; the connection then serves a second request (keep-alive);
- the upstream breaking off the body: the client's connection ends short of
  Content-Length, nothing is stored;
- the upstream going silent mid-body: after the fetch timeout, the same;
- the client leaving mid-body: the upstream's connection is closed, nothing
  is stored;
- the client reading nothing: cut off after the proxy's stall_timeout;
- HEAD, a small body and OOIDX_NO_SPLICE take the stream path.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.web import resource, server

import magnet

from ooidx.config import CacheOptions, FetcherOptions, SecurityConfig
from ooidx.datapath import splice
from ooidx.datapath.cache import Cache
from ooidx.datapath.controller import Controller
from ooidx.datapath.proxy import Proxy
from ooidx.node.bootstrap import declare_topology

from tests.support.doubles import FakeStore
from tests.ooidx.waiting import eventually

pytestmark = pytest.mark.skipif(not splice.available(), reason="splice(2) is Linux's")

SIZE = 6 * 1024 * 1024 + 12345  # several pipes' worth, not a multiple of a page


def pattern(size: int, start: int = 0) -> bytes:
    block = bytes(range(251)) * ((size + start) // 251 + 2)
    return block[start:start + size]


class Upstream(resource.Resource):
    """/whole/N: N bytes; /broken/N: declares N, sends half, closes; /silent/N:
    declares N, sends 2 MiB, then nothing; /small: 10 KiB."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[bytes] = []
        self.lost: List[str] = []  # the connections that ended, by path
        self.held: List[server.Request] = []

    def render(self, request: server.Request) -> Any:
        self.requests.append(request.uri)
        parts = request.path.decode().strip("/").split("/")
        kind = parts[-2] if parts[-1].isdigit() else "whole"
        size = int(parts[-1]) if parts[-1].isdigit() else 10240
        path = request.path.decode()
        request.notifyFinish().addBoth(lambda _: self.lost.append(path))
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Length", str(size).encode())
        if request.method == b"HEAD":
            return b""
        body = pattern(size)
        if kind == "broken":
            request.write(body[:size // 2])
            reactor.callLater(0.05, request.channel.transport.loseConnection)
            return server.NOT_DONE_YET
        if kind == "silent":
            request.write(body[:2 * 1024 * 1024])
            self.held.append(request)
            return server.NOT_DONE_YET
        return body


class Stack:
    def __init__(self, tmp: Any, *, stall_timeout: float = 5.0, fetch_timeout: float = 10.0) -> None:
        self.tmp = tmp
        self.url = f"memory://splice-{uuid.uuid4().hex}"
        self.upstream = Upstream()
        self.buses: List[magnet.Bus] = []
        self.stall_timeout = stall_timeout
        self.fetch_timeout = fetch_timeout

    def bus(self) -> magnet.Bus:
        bus = magnet.connect(self.url, reactor, node="n1", rpc_timeout=10.0, send_timeout=10.0,
                             shutdown_timeout=2.0)
        bus.startService()
        self.buses.append(bus)
        return bus

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.http = reactor.listenTCP(0, server.Site(self.upstream), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.http.getHost().port}/data"
        security = SecurityConfig(allow_private=True, allow_hosts=("127.0.0.1",))
        store_bus = self.bus()
        yield declare_topology(store_bus)
        yield store_bus.serve("attribute_store", FakeStore())
        self.controller = Controller("controller", self.bus(), node="n1", security=security)
        self.cache = Cache("cache", self.bus(), node="n1", directory=str(self.tmp / "cache"),
                           options=CacheOptions(max_age=300.0), security=security,
                           fetch_options=FetcherOptions(timeout=self.fetch_timeout), lock_timeout=10.0)
        self.proxy = Proxy("proxyng", self.bus(), node="n1", port=0, interface="127.0.0.1",
                           answer_timeout=20.0, lookup_timeout=10.0, hot_ttl=0,
                           stall_timeout=self.stall_timeout)
        for component in (self.controller, self.cache, self.proxy):
            yield component.start()
        client = self.bus()
        yield client.call("controller", "register", name="big", url=self.base, check=False)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for request in self.upstream.held:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()
        for component in (self.proxy, self.cache, self.controller):
            try:
                yield component.stopService()
            except Exception:  # noqa: BLE001 - the rest must stop too
                pass
        for bus in self.buses:
            yield bus.stopService()
        yield self.http.stopListening()

    def stored(self, path: str) -> Optional[bytes]:
        entry = self.cache.store.get(self.base + path, touch=False)
        if entry is None:
            return None
        with self.cache.store.open_body(entry) as f:
            return f.read()


class Raw(protocol.Protocol):
    """An HTTP/1.1 client on one connection: sends the requests it is given,
    keeps every byte; may leave after C{leave_after} body bytes or stop
    reading after the head (C{stall})."""

    def __init__(self, requests: List[bytes], leave_after: Optional[int] = None, stall: bool = False) -> None:
        self.requests = requests
        self.leave_after = leave_after
        self.stall = stall
        self.data = bytearray()
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"".join(self.requests))

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head_end = self.data.find(b"\r\n\r\n")
        if head_end < 0:
            return
        if self.stall:
            self.stall = False
            self.transport.pauseProducing()
        if self.leave_after is not None and len(self.data) - head_end - 4 >= self.leave_after:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(bytes(self.data))


def responses(data: bytes) -> List[Tuple[int, Dict[bytes, bytes], bytes]]:
    """The responses in what a connection got, by Content-Length; a short last body as it came."""
    out = []
    while data:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            break
        lines = data[:head_end].split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        out.append((status, headers, data[head_end + 4:head_end + 4 + length]))
        data = data[head_end + 4 + length:]
    return out


def get(stack: Stack, path: str, close: bool = False, method: str = "GET") -> bytes:
    """A forward-proxy request for the upstream's C{path} (under the registered base)."""
    return (f"{method} {stack.base}{path} HTTP/1.1\r\nHost: x\r\n" + ("Connection: close\r\n" if close else "")
            + "\r\n").encode()


def connect(stack: Stack, client: "Raw") -> "Raw":
    """C{client} connected to the stack's proxy."""
    factory = protocol.ClientFactory()
    factory.protocol = lambda: client
    reactor.connectTCP("127.0.0.1", stack.proxy.port, factory)
    return client


@defer.inlineCallbacks
def talk(stack: Stack, requests: List[bytes], **kwargs: Any) -> Any:
    client = connect(stack, Raw(requests, **kwargs))
    data = yield client.closed.addTimeout(30, reactor)
    return data


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))



@pytest.fixture(autouse=True)
def no_errors_logged() -> Any:
    """Nothing of a splice ends in an unhandled error or a logged failure."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    errors: List[str] = []

    def observe(event: Dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            errors.append(formatEvent(event) + str(event.get("log_failure", "")))

    globalLogPublisher.addObserver(observe)
    yield errors
    globalLogPublisher.removeObserver(observe)
    assert not errors, errors


@contextlib.asynccontextmanager
async def running(tmp_path: Any, **options: Any) -> Any:
    """A L{Stack} started with C{options}, stopped at the end."""
    s = Stack(tmp_path, **options)
    try:
        await s.start()
        yield s
    finally:
        await s.stop()


@pytest_twisted.async_yield_fixture
async def stack(tmp_path: Any) -> Any:
    async with running(tmp_path) as s:
        yield s


@pytest_twisted.ensureDeferred
async def test_a_miss_is_spliced_and_stored_and_the_connection_serves_again(stack: Stack) -> None:
    fds = open_fds()
    path = f"/whole/{SIZE}"
    data = await talk(stack, [get(stack, path), get(stack, "/small", close=True)])
    (status, headers, body), (status2, _, small) = responses(data)
    assert (status, headers[b"x-ooidx-source"], len(body)) == (200, b"fetcher", SIZE)
    assert body == pattern(SIZE)
    assert stack.cache.fetcher.spliced == 1
    # the same connection served the next request (the splice gave it back to twisted.web)
    assert (status2, small) == (200, pattern(10240))
    await eventually(lambda: stack.cache.counters["stores"] == 2, what="both stored")
    assert hashlib.sha256(stack.stored(f"/whole/{SIZE}") or b"").digest() == hashlib.sha256(body).digest()
    # the upstream's connection of the spliced body is closed (it cannot go back to the pool)
    await eventually(lambda: f"/data/whole/{SIZE}" in stack.upstream.lost, what="upstream closed")
    await eventually(lambda: open_fds() <= fds + 2, what="the pipes closed")  # (+ the pooled upstream socket)
    # a hit is served from the store, whole
    data = await talk(stack, [get(stack, path, close=True)])
    [(status, headers, again)] = responses(data)
    assert (status, headers[b"x-ooidx-source"], again == body) == (200, b"cache", True)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_breaks_off_cuts_the_client_short_and_nothing_is_kept(stack: Stack) -> None:
    path = f"/broken/{SIZE}"
    data = await talk(stack, [get(stack, path)])
    [(status, headers, body)] = responses(data)
    assert status == 200 and int(headers[b"content-length"]) == SIZE
    assert len(body) < SIZE  # the connection ended short: never passed as whole
    assert body == pattern(len(body))
    await eventually(lambda: stack.cache.counters["store_failures"] >= 1, what="the copy dropped")
    assert stack.stored(f"/broken/{SIZE}") is None
    assert stack.cache.fetcher.spliced == 1


@pytest_twisted.ensureDeferred
async def test_a_silent_upstream_times_out_and_the_client_is_cut_short(tmp_path: Any) -> None:
    async with running(tmp_path, fetch_timeout=1.0) as s:
        data = await talk(s, [get(s, f"/silent/{SIZE}")])
        [(status, _, body)] = responses(data)
        assert status == 200 and 2 * 1024 * 1024 <= len(body) < SIZE
        assert s.stored(f"/silent/{SIZE}") is None
        assert s.cache.fetcher.spliced == 1


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_closes_the_upstream_and_nothing_is_kept(stack: Stack) -> None:
    fds = open_fds()
    path = f"/silent/{SIZE}"  # the upstream holds the rest: only the client's leaving ends it
    data = await talk(stack, [get(stack, path)], leave_after=1024 * 1024)
    assert len(data) < SIZE
    await eventually(lambda: f"/data/silent/{SIZE}" in stack.upstream.lost, what="upstream closed")
    await eventually(lambda: stack.cache.counters["store_failures"] >= 1, what="the copy dropped")
    assert stack.stored(f"/silent/{SIZE}") is None
    await eventually(lambda: open_fds() <= fds, what="the pipes closed")


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_nothing_is_cut_off_after_the_stall_timeout(tmp_path: Any) -> None:
    async with running(tmp_path, stall_timeout=1.0) as s:
        big = 64 * 1024 * 1024  # more than the sockets' buffers hold
        client = connect(s, Raw([get(s, f"/whole/{big}")], stall=True))
        await eventually(lambda: s.proxy.stalled == 1, what="the client cut off", timeout=15)
        assert s.cache.fetcher.spliced == 1
        client.transport.resumeProducing()  # (a paused transport does not see the reset)
        data = await client.closed.addTimeout(30, reactor)
        assert len(data) < big


@pytest_twisted.ensureDeferred
async def test_head_and_small_bodies_take_the_stream_path(stack: Stack) -> None:
    data = await talk(stack, [get(stack, f"/whole/{SIZE}", method="HEAD"),
                              get(stack, "/small", close=True)])
    head_end = data.find(b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and f"Content-Length: {SIZE}".encode() in data[:head_end]
    [(status, _, small)] = responses(data[head_end + 4:])
    assert (status, small) == (200, pattern(10240))
    assert stack.cache.fetcher.spliced == 0
    assert len(splice.HANDOFFS) == 0
    # (the stored copy's commit done before the stack stops: else it fails, logged)
    await eventually(lambda: stack.cache.counters["stores"] >= 1, what="/small stored")


@pytest_twisted.ensureDeferred
async def test_without_splice_the_body_streams_as_before(stack: Stack, monkeypatch: Any) -> None:
    monkeypatch.setenv("OOIDX_NO_SPLICE", "1")
    data = await talk(stack, [get(stack, f"/whole/{SIZE}", close=True)])
    [(status, _, body)] = responses(data)
    assert (status, body == pattern(SIZE)) == (200, True)
    assert stack.cache.fetcher.spliced == 0
    await eventually(lambda: stack.cache.counters["stores"] >= 1, what="stored")  # (before the stack stops)


@pytest_twisted.ensureDeferred
async def test_a_disk_that_keeps_the_copy_behind_loses_the_copy_not_the_client(stack: Stack) -> None:
    """The write thread never gets to the copy: past the tee's bounds the client
    is held at most 2 s, then the copy is dropped and the body goes on whole."""
    fds = open_fds()
    held: List[Any] = []
    io = stack.cache._write_io

    def stuck(f: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(f, "__name__", "") == "_write_queued":
            d: defer.Deferred = defer.Deferred()
            held.append(lambda: io(f, *args, **kwargs).chainDeferred(d))
            return d
        return io(f, *args, **kwargs)

    stack.cache._write_io = stuck  # type: ignore[method-assign]
    size = 40 * 1024 * 1024  # more than the tee's 8 MiB and the store's 16 pipes
    started = reactor.seconds()
    data = await talk(stack, [get(stack, f"/whole/{size}", close=True)])
    [(status, _, body)] = responses(data)
    assert (status, len(body), body == pattern(size)) == (200, size, True)
    assert reactor.seconds() - started < 10
    assert stack.cache.fetcher.spliced == 1
    for run in held:  # the disk comes back: nothing is left to write
        run()
    await eventually(lambda: stack.cache.counters["store_failures"] >= 1, what="the copy dropped")
    assert stack.stored(f"/whole/{size}") is None
    await eventually(lambda: open_fds() <= fds + 2, what="the pipes closed")



# hits: the stored body's file -> pipe -> the client's socket ------------------------------

BIG = 32 * 1024 * 1024 + 4321  # more than the pipes and the sockets' buffers hold


async def store_first(stack: Stack, path: str) -> None:
    """A miss for C{path}, stored (the hits below are of it)."""
    data = await talk(stack, [get(stack, path, close=True)])
    [(status, _, _body)] = responses(data)
    assert status == 200
    await eventually(lambda: stack.stored(path) is not None, what="stored", timeout=20)


@pytest_twisted.ensureDeferred
async def test_a_hit_is_spliced_whole_and_the_connection_serves_again(stack: Stack) -> None:
    path = f"/whole/{SIZE}"
    await store_first(stack, path)
    hits, served = stack.cache.counters["hits"], stack.cache.counters["served_bytes"]
    fds = open_fds()
    data = await talk(stack, [get(stack, path), get(stack, "/small", close=True)])
    (status, headers, body), (status2, _, small) = responses(data)
    assert (status, headers[b"x-ooidx-source"], int(headers[b"content-length"])) == (200, b"cache", SIZE)
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(SIZE)).digest()
    assert stack.cache.counters["spliced_hits"] == 1
    assert (stack.cache.counters["hits"], stack.cache.counters["served_bytes"]) == (hits + 1, served + SIZE)
    # the same connection served the next request (the splice gave it back to twisted.web)
    assert (status2, small) == (200, pattern(10240))
    assert len(splice.HANDOFFS) == 0
    # (+ the pooled upstream connection of /small: both its ends are in this process)
    await eventually(lambda: open_fds() <= fds + 2, what="the pipes and the body closed")


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_hit_ends_it_and_leaks_nothing(stack: Stack) -> None:
    path = f"/whole/{BIG}"
    await store_first(stack, path)
    fds = open_fds()
    data = await talk(stack, [get(stack, path)], leave_after=1024 * 1024)
    assert len(data) < BIG
    await eventually(lambda: open_fds() <= fds, what="the pipes and the body closed")
    assert stack.cache.counters["spliced_hits"] == 0  # not counted as a hit served whole
    assert len(splice.HANDOFFS) == 0
    # the entry is untouched, and served again whole
    data = await talk(stack, [get(stack, path, close=True)])
    [(status, headers, body)] = responses(data)
    assert (status, headers[b"x-ooidx-source"], body == pattern(BIG)) == (200, b"cache", True)
    assert stack.cache.counters["spliced_hits"] == 1
    await eventually(lambda: open_fds() <= fds, what="the pipes and the body closed")


@pytest_twisted.ensureDeferred
async def test_an_entry_replaced_and_evicted_mid_hit_still_serves_the_old_body_whole(stack: Stack) -> None:
    path = f"/whole/{BIG}"
    await store_first(stack, path)
    url = stack.base + path
    fds = open_fds()
    client = connect(stack, Raw([get(stack, path, close=True)], stall=True))  # the head, then nothing read a while
    await eventually(lambda: b"\r\n\r\n" in client.data, what="the head")
    store = stack.cache.store
    old = store.get(url, touch=False)
    # a new version replaces it (the old body's file is unlinked), then the new one is evicted
    writer = store.writer(url, status=200, reason="OK", headers=old.headers, length=10)
    writer.write(b"B" * 10)
    writer.commit()
    assert stack.stored(path) == b"B" * 10
    assert store.remove(url)
    client.transport.resumeProducing()
    data = await client.closed.addTimeout(30, reactor)
    [(status, headers, body)] = responses(data)
    assert (status, headers[b"x-ooidx-source"], len(body)) == (200, b"cache", BIG)
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(BIG)).digest()
    assert stack.cache.counters["spliced_hits"] == 1
    await eventually(lambda: open_fds() <= fds, what="the pipes and the (unlinked) body closed")


@pytest_twisted.ensureDeferred
async def test_a_small_hit_and_a_head_hit_stream_as_before(stack: Stack) -> None:
    await store_first(stack, "/small")
    await store_first(stack, f"/whole/{SIZE}")
    data = await talk(stack, [get(stack, "/small"), get(stack, f"/whole/{SIZE}", method="HEAD"),
                              get(stack, "/small", close=True)])
    head_at = data.find(b"HTTP/1.1", data.find(b"\r\n\r\n") + 4 + 10240)
    [(status, headers, small)] = responses(data[:head_at])
    assert (status, headers[b"x-ooidx-source"], small) == (200, b"cache", pattern(10240))
    assert stack.cache.counters["spliced_hits"] == 0
    assert len(splice.HANDOFFS) == 0


@pytest_twisted.ensureDeferred
async def test_without_splice_a_hit_streams_as_before(stack: Stack, monkeypatch: Any) -> None:
    path = f"/whole/{SIZE}"
    await store_first(stack, path)
    monkeypatch.setenv("OOIDX_NO_SPLICE", "1")
    data = await talk(stack, [get(stack, path, close=True)])
    [(status, headers, body)] = responses(data)
    assert (status, headers[b"x-ooidx-source"], body == pattern(SIZE)) == (200, b"cache", True)
    assert stack.cache.counters["spliced_hits"] == 0
    assert stack.cache.counters["hits"] >= 1


@pytest_twisted.ensureDeferred
async def test_a_client_reading_nothing_of_a_hit_is_cut_off_after_the_stall_timeout(tmp_path: Any) -> None:
    async with running(tmp_path, stall_timeout=1.0) as s:
        path = f"/whole/{BIG}"
        await store_first(s, path)
        fds = open_fds()
        client = connect(s, Raw([get(s, path)], stall=True))
        await eventually(lambda: s.proxy.stalled == 1, what="the client cut off", timeout=15)
        client.transport.resumeProducing()  # (a paused transport does not see the reset)
        data = await client.closed.addTimeout(30, reactor)
        assert len(data) < BIG
        assert s.cache.counters["spliced_hits"] == 0
        await eventually(lambda: open_fds() <= fds, what="the pipes and the body closed")
        assert s.stored(path) == pattern(BIG)  # the entry is untouched
