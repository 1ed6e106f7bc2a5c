"""The fetcher on a memory:// bus (and once on RabbitMQ) against real HTTP
upstreams on loopback ports: a twisted.web server with the awkward cases,
and pydap's server for the DAP parts."""
from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any, Dict, List
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent

import magnet
from magnet import operation
from magnet.errors import RemoteError, StreamError
from magnet.rpc import decode_reply, decode_request

from ooidx import config as config_module
from ooidx.config import FetcherOptions, SecurityConfig
from ooidx.datapath.fetcher import Fetcher

from tests.ooidx import upstream_http as up

RID = "request-1"


# --------------------------------------------------------------------------- #
# fixtures


@pytest.fixture(scope="module")
def upstream() -> Any:
    """The twisted.web upstream: its base URL and port; the Slow resource's waiters cleared after."""
    site = up.make_site()
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port
    yield {"url": f"http://127.0.0.1:{number}", "port": number, "site": site}
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture(scope="module")
def recorder() -> Any:
    """A loopback port that records connections: nothing may reach it."""
    factory = up.Recorder()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def make_config(*, allow_hosts: tuple = (), allow_private: bool = False, **options: Any) -> Any:
    base = config_module.parse("components: {fetcher: {}, controller: {}}\n", "/tmp/dx.yaml", environ={})
    fetcher = dataclasses.replace(base.components["fetcher"], options=FetcherOptions(**options))
    components = dict(base.components)
    components["fetcher"] = fetcher
    return dataclasses.replace(base, components=components,
                               security=SecurityConfig(allow_hosts=tuple(allow_hosts), allow_private=allow_private))


class FakeResolver:
    """Names the tests make up; anything else goes to the system resolver."""

    def __init__(self, names: Dict[str, List[str]]) -> None:
        self.names = names
        self.asked: List[str] = []

    def __call__(self, host: str, port: int) -> defer.Deferred:
        self.asked.append(host)
        if host in self.names:
            return defer.succeed(list(self.names[host]))
        from ooidx.urlpolicy import getaddrinfo_resolver
        return getaddrinfo_resolver(reactor)(host, port)


class Controller:
    """Stands in for the controller: keeps what the fetcher records."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.arrived: defer.Deferred = defer.Deferred()

    @operation
    def record(self, **kwargs: Any) -> None:
        self.records.append(kwargs)
        if not self.arrived.called:
            self.arrived.callback(kwargs)


@pytest.fixture
def make_fetcher(upstream: Any) -> Any:
    """make(**options) -> Deferred (bus, fetcher) on a fresh memory:// bus; the upstream's port is allowed."""
    made: List[Any] = []

    def make(*, allow_hosts: Any = None, allow_private: bool = False, resolver: Any = None,
             url: str = "", tls_policy: Any = None, **options: Any) -> Any:
        options.setdefault("timeout", 5.0)
        hosts = (f"127.0.0.1:{upstream['port']}",) if allow_hosts is None else allow_hosts
        bus = magnet.connect(url or f"memory://fetcher-{uuid.uuid4().hex}", reactor, rpc_timeout=10,
                             send_timeout=10, shutdown_timeout=2, stream_idle_timeout=30)
        bus.startService()
        fetcher = Fetcher.from_config("fetcher", bus, make_config(
            allow_hosts=hosts, allow_private=allow_private, **options), node="test", resolver=resolver, tls_policy=tls_policy)
        made.append((bus, fetcher))
        return fetcher.start().addCallback(lambda _: (bus, fetcher))

    yield make
    for bus, fetcher in made:
        pytest_twisted.blockon(defer.maybeDeferred(fetcher.stopService))
        pytest_twisted.blockon(defer.maybeDeferred(bus.stopService))


@defer.inlineCallbacks
def ask(bus: Any, url: Any, method: Any = "GET", *, address: Any = None, **kwargs: Any) -> Any:
    """Post a fetch; fires with the listener its answer goes to."""
    listener = yield bus.listen()
    yield bus.post("fetcher", "fetch", url=url, method=method,
                   address=listener.address if address is None else address, request_id=RID, **kwargs)
    return listener


@defer.inlineCallbacks
def fetch_body(bus: Any, url: str, method: str = "GET", **kwargs: Any) -> Any:
    """(metadata, body, correlation_id) of a successful fetch."""
    listener = yield ask(bus, url, method, **kwargs)
    s = yield listener.next_stream(timeout=10)
    body = yield s.read_all()
    return s.metadata, body, s.correlation_id


@defer.inlineCallbacks
def fetch_error(bus: Any, url: Any, method: Any = "GET", **kwargs: Any) -> Any:
    """The RemoteError of a refused fetch (an error reply, no stream)."""
    listener = yield ask(bus, url, method, **kwargs)
    message = yield listener.get(timeout=10)
    assert message.correlation_id == RID
    with pytest.raises(RemoteError) as info:
        decode_reply(message)
    return info.value


@defer.inlineCallbacks
def fetch_broken(bus: Any, url: str, **kwargs: Any) -> Any:
    """(metadata, StreamError) of a fetch whose stream starts and then is aborted."""
    listener = yield ask(bus, url, **kwargs)
    s = yield listener.next_stream(timeout=10)
    try:
        yield s.read_all()
    except StreamError as e:
        return s.metadata, e
    raise AssertionError("the stream completed")


# --------------------------------------------------------------------------- #
# answers


@pytest_twisted.inlineCallbacks
def test_get_small_body(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    url = upstream["url"] + "/small?u[0:1:3],v&lat>10.0"
    metadata, body, cid = yield fetch_body(bus, url)
    assert body == up.SMALL_BODY
    assert cid == RID
    assert metadata["status"] == 200 and metadata["reason"] == "OK"
    assert metadata["url"] == url and metadata["source"] == "fetcher"
    assert metadata["length"] == len(up.SMALL_BODY)
    headers = dict((k.lower(), v) for k, v in metadata["headers"])
    assert headers["content-type"] == "text/plain"
    assert headers["etag"] == up.ETAG.decode()
    assert headers["content-length"] == str(len(up.SMALL_BODY))


@pytest_twisted.inlineCallbacks
def test_head(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/small", "HEAD")
    assert body == b""
    assert metadata["status"] == 200
    assert metadata["length"] == len(up.SMALL_BODY)
    assert ["Content-Length", str(len(up.SMALL_BODY))] in metadata["headers"]


@pytest_twisted.inlineCallbacks
def test_status_passed_on_not_an_error(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    for code in (404, 500):
        metadata, body, _ = yield fetch_body(bus, upstream["url"] + f"/status/{code}")
        assert metadata["status"] == code
        assert body == b"status %d body" % code


@pytest_twisted.inlineCallbacks
def test_repeated_headers_kept_hop_by_hop_removed(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    metadata, _, _ = yield fetch_body(bus, upstream["url"] + "/repeats")
    pairs = [(k.lower(), v) for k, v in metadata["headers"]]
    assert [v for k, v in pairs if k == "set-cookie"] == ["a=1", "b=2"]
    assert [v for k, v in pairs if k == "x-multi"] == ["one", "two"]
    names = {k for k, _ in pairs}
    for hop in ("connection", "keep-alive", "trailer", "upgrade", "proxy-authenticate", "proxy-foo",
                "x-named-hop", "transfer-encoding", "te"):
        assert hop not in names


@pytest_twisted.inlineCallbacks
def test_chunked_body_without_length(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/chunked?size=300000")
    assert metadata["length"] is None
    assert body == up.pattern(300000)


@pytest_twisted.inlineCallbacks
def test_store_stream_and_record(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    controller = Controller()
    yield bus.serve("controller", controller)
    store = yield bus.listen()
    url = upstream["url"] + "/small"
    metadata, body, _ = yield fetch_body(bus, url, store=store.address)
    stored = yield store.next_stream(timeout=10)
    stored_body = yield stored.read_all()
    assert stored_body == body == up.SMALL_BODY
    assert stored.correlation_id == RID
    assert stored.metadata["store"] is True
    assert stored.metadata["url"] == url
    assert stored.metadata["validators"] == {"etag": up.ETAG.decode(), "last_modified": up.LAST_MODIFIED.decode()}
    assert "store" not in metadata
    record = yield controller.arrived
    assert record == {"dataset": None, "url": url, "hit": False, "bytes": len(up.SMALL_BODY), "status": 200}


@pytest_twisted.inlineCallbacks
def test_no_store_stream_for_head_or_non_200(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    yield fetch_body(bus, upstream["url"] + "/small", "HEAD", store=store.address)
    yield fetch_body(bus, upstream["url"] + "/status/404", store=store.address)
    with pytest.raises(magnet.Timeout):
        yield store.next_stream(timeout=0.5)


@pytest_twisted.inlineCallbacks
def test_no_store_stream_for_a_body_over_store_limit(make_fetcher: Any, upstream: Any) -> Any:
    """A Content-Length over what the cache will keep: the client's stream only."""
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/big?size=300000", store=store.address,
                                         store_limit=299999)
    assert metadata["length"] == len(body) == 300000
    with pytest.raises(magnet.Timeout):
        yield store.next_stream(timeout=0.5)
    # at the limit it is still stored
    _, body, _ = yield fetch_body(bus, upstream["url"] + "/big?size=300000", store=store.address,
                                  store_limit=300000)
    stored = yield store.next_stream(timeout=10)
    assert (yield stored.read_all()) == body


@pytest_twisted.inlineCallbacks
def test_store_stream_aborted_past_store_limit_unknown_length(make_fetcher: Any, upstream: Any) -> Any:
    """No Content-Length: the store stream is aborted once the body passes the
    limit; the client still gets the whole body."""
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/chunked?size=3000000", store=store.address,
                                         store_limit=100000)
    assert metadata["length"] is None and len(body) == 3000000
    stored = yield store.next_stream(timeout=10)
    with pytest.raises(StreamError) as info:
        yield stored.read_all()
    assert "limit" in str(info.value)


@pytest_twisted.inlineCallbacks
def test_store_limit_must_be_a_byte_count(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    for bad in (-1, "10", True, 1.5):
        e = yield fetch_error(bus, upstream["url"] + "/small", store="somewhere", store_limit=bad)
        assert e.remote_type == "BadArguments"


@pytest_twisted.inlineCallbacks
def test_revalidation_304_tells_the_cache_to_serve(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    listener = yield ask(bus, upstream["url"] + "/small", store=store.address,
                         validators={"etag": up.ETAG.decode(), "last_modified": None})
    message = yield store.get(timeout=10)
    op, kwargs = decode_request(message)
    assert op == "serve"
    assert kwargs == {"url": upstream["url"] + "/small", "method": "GET", "address": listener.address,
                      "request_id": RID, "revalidated": True}
    with pytest.raises(magnet.Timeout):
        yield listener.next_stream(timeout=0.3)


@pytest_twisted.inlineCallbacks
def test_stale_validators_get_the_new_body(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/small", store=store.address,
                                         validators={"etag": '"old"'})
    assert metadata["status"] == 200 and body == up.SMALL_BODY
    stored = yield store.next_stream(timeout=10)
    assert (yield stored.read_all()) == up.SMALL_BODY


# --------------------------------------------------------------------------- #
# redirects


@pytest_twisted.inlineCallbacks
def test_redirect_chain_within_limit(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher(max_redirects=5)
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/chain/5")
    assert body == b"end of chain"
    assert metadata["url"] == upstream["url"] + "/chain/5"


@pytest_twisted.inlineCallbacks
def test_redirect_chain_over_limit(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher(max_redirects=5)
    e = yield fetch_error(bus, upstream["url"] + "/chain/6")
    assert e.remote_type == "UpstreamError"
    assert "redirects" in e.message


@pytest_twisted.inlineCallbacks
def test_redirect_to_forbidden_targets_refused_without_connecting(make_fetcher: Any, upstream: Any,
                                                                   recorder: Any) -> Any:
    resolver = FakeResolver({"evil.test": ["127.0.0.1"]})
    bus, _ = yield make_fetcher(resolver=resolver)
    before = len(recorder.connections)
    rp = recorder.port
    for target in (f"http://127.0.0.1:{rp}/", f"http://localhost:{rp}/", f"http://evil.test:{rp}/",
                   f"http://2130706433:{rp}/", f"http://[::ffff:127.0.0.1]:{rp}/", "http://169.254.169.254/"):
        for code in (301, 302, 307):
            e = yield fetch_error(bus, upstream["url"] + f"/goto?u={quote(target, safe='')}&code={code}")
            assert e.remote_type == "Forbidden", (target, e)
    for target in ("file:///etc/passwd", f"gopher://127.0.0.1:{rp}/"):
        e = yield fetch_error(bus, upstream["url"] + f"/goto?u={quote(target, safe='')}")
        assert e.remote_type == "UpstreamError", (target, e)
    assert len(recorder.connections) == before


# --------------------------------------------------------------------------- #
# the security rules, direct


FORBIDDEN = [
    "http://127.0.0.1:{rp}/x", "http://[::1]:{rp}/x", "http://localhost:{rp}/x", "http://evil.test:{rp}/x",
    "http://rebind.test:{rp}/x", "http://2130706433:{rp}/x", "http://0x7f.1:{rp}/x", "http://0177.0.0.1:{rp}/x",
    "http://127.1:{rp}/x", "http://0x7f000001:{rp}/x", "http://[::ffff:127.0.0.1]:{rp}/x", "http://0.0.0.0:{rp}/x",
    "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://224.0.0.1/", "http://100.64.0.1/",
    "http://127.0.0.1:{up}.evil.test/",
]


@pytest_twisted.inlineCallbacks
def test_forbidden_addresses_never_reached(make_fetcher: Any, upstream: Any, recorder: Any) -> Any:
    resolver = FakeResolver({"evil.test": ["127.0.0.1"], "rebind.test": ["93.184.216.34", "127.0.0.1"],
                             "127.0.0.1:%d.evil.test" % upstream["port"]: ["127.0.0.1"]})
    bus, _ = yield make_fetcher(resolver=resolver)
    before = len(recorder.connections)
    for template in FORBIDDEN:
        url = template.format(rp=recorder.port, up=upstream["port"])
        e = yield fetch_error(bus, url)
        assert e.remote_type in ("Forbidden", "InvalidURL"), (url, e)
    assert len(recorder.connections) == before


@pytest_twisted.inlineCallbacks
def test_other_schemes_refused(make_fetcher: Any, recorder: Any) -> Any:
    bus, _ = yield make_fetcher()
    before = len(recorder.connections)
    for url in ("file:///etc/passwd", f"gopher://127.0.0.1:{recorder.port}/", "ftp://ftp.example.org/x",
                "javascript:alert(1)", "//127.0.0.1/x", "http:///x", "http://user:pw@example.org/"):
        e = yield fetch_error(bus, url)
        assert e.remote_type == "InvalidURL", (url, e)
    assert len(recorder.connections) == before


@pytest_twisted.inlineCallbacks
def test_allow_private_reaches_the_recorder(make_fetcher: Any, recorder: Any) -> Any:
    """The recorder does record: with allow_private the same URL gets through."""
    bus, _ = yield make_fetcher(allow_private=True)
    before = len(recorder.connections)
    e = yield fetch_error(bus, f"http://127.0.0.1:{recorder.port}/x")
    assert e.remote_type == "UpstreamError"
    assert len(recorder.connections) == before + 1


@pytest_twisted.inlineCallbacks
def test_name_connects_to_the_checked_address(make_fetcher: Any, upstream: Any) -> Any:
    """A name resolved once; the connection goes to that address, the Host header keeps the name."""
    resolver = FakeResolver({"upstream.test": ["127.0.0.1"]})
    bus, _ = yield make_fetcher(resolver=resolver, allow_hosts=(f"upstream.test:{upstream['port']}",))
    metadata, body, _ = yield fetch_body(bus, f"http://upstream.test:{upstream['port']}/host")
    assert body == f"upstream.test:{upstream['port']}".encode()
    assert resolver.asked == ["upstream.test"]


# --------------------------------------------------------------------------- #
# failures


@pytest_twisted.inlineCallbacks
def test_truncated_body_aborts_both_streams(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    metadata, e = yield fetch_broken(bus, upstream["url"] + "/truncated", store=store.address)
    assert metadata["length"] == 1000
    assert "UpstreamError" in str(e)
    stored = yield store.next_stream(timeout=10)
    with pytest.raises(StreamError):
        yield stored.read_all()


@pytest_twisted.inlineCallbacks
def test_chunked_body_without_last_chunk_aborts(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    store = yield bus.listen()
    _, e = yield fetch_broken(bus, upstream["url"] + "/chunked-cut", store=store.address)
    assert "UpstreamError" in str(e)
    stored = yield store.next_stream(timeout=10)
    with pytest.raises(StreamError):
        yield stored.read_all()


@pytest_twisted.inlineCallbacks
def test_close_delimited_body_reaches_client_but_not_store(make_fetcher: Any) -> Any:
    port = reactor.listenTCP(0, up.CloseDelimited(), interface="127.0.0.1")
    try:
        number = port.getHost().port
        bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{number}",))
        store = yield bus.listen()
        metadata, body, _ = yield fetch_body(bus, f"http://127.0.0.1:{number}/", store=store.address)
        assert body == b"body until close" and metadata["length"] is None
        stored = yield store.next_stream(timeout=10)
        with pytest.raises(StreamError):
            yield stored.read_all()
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_slow_upstream_times_out(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher(timeout=0.5)
    e = yield fetch_error(bus, upstream["url"] + "/slow")
    assert e.remote_type == "UpstreamTimeout"


@pytest_twisted.inlineCallbacks
def test_stalled_body_times_out(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher(timeout=0.5)
    metadata, e = yield fetch_broken(bus, upstream["url"] + "/stall")
    assert metadata["status"] == 200
    assert "UpstreamTimeout" in str(e)


@pytest_twisted.inlineCallbacks
def test_connection_refused(make_fetcher: Any) -> Any:
    port = reactor.listenTCP(0, up.Recorder(), interface="127.0.0.1")
    number = port.getHost().port
    yield port.stopListening()
    bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{number}",))
    e = yield fetch_error(bus, f"http://127.0.0.1:{number}/")
    assert e.remote_type == "UpstreamError"
    assert "refused" in e.message


@pytest_twisted.inlineCallbacks
def test_size_limit_declared_length(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher(max_bytes=1000)
    e = yield fetch_error(bus, upstream["url"] + "/big?size=5000")
    assert e.remote_type == "UpstreamError"
    assert "limit" in e.message


@pytest_twisted.inlineCallbacks
def test_size_limit_unknown_length(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher(max_bytes=100000)
    store = yield bus.listen()
    _, e = yield fetch_broken(bus, upstream["url"] + "/chunked?size=300000", store=store.address)
    assert "limit" in str(e)
    stored = yield store.next_stream(timeout=10)
    with pytest.raises(StreamError):
        yield stored.read_all()


@pytest_twisted.inlineCallbacks
def test_malformed_requests_get_error_replies(make_fetcher: Any, upstream: Any) -> Any:
    bus, _ = yield make_fetcher()
    cases = [
        (dict(url=None), "InvalidURL"),
        (dict(url=42), "InvalidURL"),
        (dict(url="not a url"), "InvalidURL"),
        (dict(url=upstream["url"] + "/small", method="POST"), "BadArguments"),
        (dict(url=upstream["url"] + "/small", method=7), "BadArguments"),
        (dict(url=upstream["url"] + "/small", store=5), "BadArguments"),
        (dict(url=upstream["url"] + "/small", validators="etag"), "BadArguments"),
        (dict(url=upstream["url"] + "/small", validators={"etag": 5}), "BadArguments"),
    ]
    for kwargs, kind in cases:
        listener = yield bus.listen()
        yield bus.post("fetcher", "fetch", address=listener.address, request_id=RID, **kwargs)
        message = yield listener.get(timeout=10)
        with pytest.raises(RemoteError) as info:
            decode_reply(message)
        assert info.value.remote_type == kind, (kwargs, info.value)
    # nowhere to answer: dropped, not retried into a dead-letter loop; the fetcher still works
    yield bus.post("fetcher", "fetch", url=upstream["url"] + "/small")
    _, body, _ = yield fetch_body(bus, upstream["url"] + "/small")
    assert body == up.SMALL_BODY


@pytest_twisted.inlineCallbacks
def test_upstream_head_is_bounded(make_fetcher: Any, upstream: Any) -> Any:
    """An upstream's answer head is bounded: 90 fields pass; 400 fields, or 100
    fields of 1000 bytes, are an UpstreamError (a 502 at the proxy), read no further."""
    bus, fetcher = yield make_fetcher()
    metadata, body, _ = yield fetch_body(bus, upstream["url"] + "/headers?n=90")
    assert body == b"many" and sum(1 for name, _ in metadata["headers"] if name.startswith("X-H-")) == 90
    for query in ("n=400", "n=100000", "n=60&size=2000"):
        e = yield fetch_error(bus, upstream["url"] + "/headers?" + query)
        assert e.remote_type == "UpstreamError" and "head" in e.message or "header" in e.message, (query, e)
    assert fetcher.active == 0


@pytest_twisted.inlineCallbacks
def test_requests_are_settled_when_the_transfer_ends(make_fetcher: Any, upstream: Any) -> Any:
    """A fetch's request is settled when its transfer is over (a fetcher that
    dies mid-transfer leaves it to the broker), with the summary as the reply;
    the fetcher's consumer takes as many requests at once as it runs transfers."""
    bus, fetcher = yield make_fetcher()
    assert fetcher.prefetch == fetcher.options.max_transfers
    listener = yield bus.listen()
    reply = bus.call("fetcher", "fetch", url=upstream["url"] + "/big?size=30000000", method="GET",
                     address=listener.address, request_id=RID, timeout=30)
    s = yield listener.next_stream(timeout=10)
    assert fetcher.active == 1 and s.bytes_received < 30000000 and not reply.called
    yield s.read_all(limit=64 * 1024 * 1024)
    summary = yield reply
    assert summary["status"] == 200 and summary["bytes"] == 30000000, summary
    assert fetcher.active == 0


@pytest_twisted.inlineCallbacks
def test_gone_listener_stops_the_transfer(make_fetcher: Any, upstream: Any) -> Any:
    """The proxy's address vanishes mid-stream: the fetch ends, nothing is left running."""
    bus, fetcher = yield make_fetcher()
    listener = yield bus.listen()
    result = bus.call("fetcher", "fetch", url=upstream["url"] + "/big?size=50000000", method="GET",
                      address=listener.address, request_id=RID, timeout=30)
    s = yield listener.next_stream(timeout=10)
    yield listener.close()
    summary = yield result
    assert summary["error"] == "UpstreamError"
    assert fetcher.active == 0
    del s


# --------------------------------------------------------------------------- #
# bounded memory


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest_twisted.inlineCallbacks
def test_200_mb_body_streams_in_bounded_memory(make_fetcher: Any, upstream: Any) -> Any:
    size = 200 * 1024 * 1024
    bus, _ = yield make_fetcher(timeout=30)
    listener = yield ask(bus, upstream["url"] + f"/big?size={size}")
    s = yield listener.next_stream(timeout=10)
    baseline = rss()
    peak = [baseline]
    sampler = task.LoopingCall(lambda: peak.append(rss()))
    sampler.start(0.05)
    received = [0]
    first = []

    def sink(data: bytes) -> None:
        if not first:
            first.append(data[:256])
        received[0] += len(data)

    try:
        total = yield s.deliver(sink).addTimeout(300, reactor)
    finally:
        sampler.stop()
    assert total == received[0] == size
    assert first[0] == up.BLOCK[:256]
    growth = max(peak) - baseline
    print(f"streamed {size >> 20} MiB; RSS grew by at most {growth / 2**20:.1f} MiB")
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


@pytest_twisted.inlineCallbacks
def test_slow_reader_pauses_the_upstream(make_fetcher: Any, upstream: Any) -> Any:
    """Backpressure reaches the upstream connection: a slow reader makes the fetcher pause it."""
    size = 40 * 1024 * 1024
    bus, fetcher = yield make_fetcher(timeout=30)
    listener = yield ask(bus, upstream["url"] + f"/big?size={size}")
    s = yield listener.next_stream(timeout=10)
    baseline = rss()
    peak = [baseline]
    received = [0]

    def slow_sink(data: bytes) -> defer.Deferred:
        received[0] += len(data)
        peak.append(rss())
        return task.deferLater(reactor, 0.0005, lambda: None)

    total = yield s.deliver(slow_sink).addTimeout(300, reactor)
    assert total == size
    assert fetcher.pauses > 0
    growth = max(peak) - baseline
    print(f"{fetcher.pauses} pauses; RSS grew by at most {growth / 2**20:.1f} MiB")
    assert growth < 40 * 1024 * 1024


# --------------------------------------------------------------------------- #
# DAP: pydap's server


@pytest.fixture(scope="module")
def dap_upstream(tmp_path_factory: Any) -> Any:
    import netCDF4
    import numpy as np
    from twisted.python.threadpool import ThreadPool
    from twisted.web import server
    from twisted.web.wsgi import WSGIResource
    from pydap.wsgi.app import DapServer

    directory = tmp_path_factory.mktemp("dap")
    with netCDF4.Dataset(directory / "sst.nc", "w") as ds:
        ds.title = "fetcher test"
        ds.createDimension("time", 5)
        ds.createDimension("lat", 4)
        t = ds.createVariable("time", "f8", ("time",))
        t.units = "days since 2000-01-01"
        t[:] = np.arange(5) * 1.5
        lat = ds.createVariable("lat", "f4", ("lat",))
        lat[:] = np.linspace(-30, 30, 4)
        sst = ds.createVariable("sst", "f4", ("time", "lat"))
        sst[:] = np.arange(20, dtype="f4").reshape(5, 4)
    # One thread: netCDF-C / HDF5 are not thread-safe (several threads crash the process).
    pool = ThreadPool(minthreads=1, maxthreads=1, name="pydap")
    pool.start()
    site = server.Site(WSGIResource(reactor, pool, DapServer(str(directory))))
    site.log = lambda *a, **k: None  # type: ignore[assignment]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port
    yield {"url": f"http://127.0.0.1:{number}/sst.nc", "port": number}
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    pool.stop()


@defer.inlineCallbacks
def direct(url: str) -> Any:
    response = yield Agent(reactor).request(b"GET", url.encode())
    body = yield up.read_body(response)
    return response.code, body


@pytest_twisted.inlineCallbacks
def test_dap_responses_equal_direct(make_fetcher: Any, dap_upstream: Any) -> Any:
    bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{dap_upstream['port']}",))
    base = dap_upstream["url"]
    for suffix in (".das", ".dds", ".dods", ".dds?time[0:1:2]", ".dods?time[0:1:2]", ".dods?lat,time",
                   ".dds?sst", ".das?time"):
        metadata, body, _ = yield fetch_body(bus, base + suffix)
        code, expected = yield direct(base + suffix)
        assert metadata["status"] == code == 200, suffix
        assert body == expected, suffix
    dds = (yield direct(base + ".dds"))[1]
    assert b"Float32 sst[time = 5][lat = 4]" in dds


@defer.inlineCallbacks
def _with_pub_sub(bus: Any, *regexes: str) -> Any:
    """A fake pub_sub on the bus's "pub_sub" queue, with subscriptions; (fake, listeners, events)."""
    from tests.ooidx.dissemination_helpers import EventLog, FakePubSub
    fake = FakePubSub(bus)
    yield bus.serve("pub_sub", fake)
    listeners = []
    for i, regex in enumerate(regexes):
        answer = yield bus.call("pub_sub", "subscribe", regex=regex, name=f"s{i}")
        listeners.append((yield bus.listen(name=answer["address"], durable=True)))
    log = yield EventLog.on(bus)
    return fake, listeners, log


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_to_every_routed_address(make_fetcher: Any, dap_upstream: Any) -> Any:
    """.das and .dds whole in the start metadata, .dods streamed to each matching subscription."""
    bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{dap_upstream['port']}",))
    fake, (one, two, other), log = yield _with_pub_sub(bus, r"^dataset\.", r"^dataset\.ss", r"^dataset\.chl")
    base = dap_upstream["url"]
    yield bus.post("fetcher", "fetch_dataset", name="sst", url=base)
    expected = {}
    for part in ("das", "dds", "dods"):
        expected[part] = (yield direct(f"{base}.{part}"))[1]
    for listener in (one, two):
        s = yield listener.next_stream(timeout=10)
        body = yield s.read_all()
        assert body == expected["dods"]
        m = s.metadata
        assert m["topic"] == "dataset.sst" and m["dataset"] == "sst" and m["url"] == base
        assert m["das"] == expected["das"].decode() and m["dds"] == expected["dds"].decode()
        assert m["status"] == 200 and m["length"] == len(expected["dods"])
        assert isinstance(m["fetched"], float) and isinstance(m["headers"], list)
    assert fake.routed == ["dataset.sst"]
    event = yield log.next("fetched", "sst")
    assert event["topic"] == "event.fetched.sst" and event["bytes"] == len(expected["dods"])
    assert event["addresses"] == 2 and event["delivered"] == 2
    with pytest.raises(magnet.Timeout):
        yield other.next_stream(timeout=0.3)


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_to_named_addresses(make_fetcher: Any, dap_upstream: Any) -> Any:
    """C{to}: the dataset goes to those addresses only, without asking pub_sub."""
    bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{dap_upstream['port']}",))
    fake, (everything, chosen), log = yield _with_pub_sub(bus, r"^dataset\.", r"^dataset\.ss")
    base = dap_upstream["url"]
    yield bus.post("fetcher", "fetch_dataset", name="sst", url=base, to=[chosen.address, chosen.address])
    s = yield chosen.next_stream(timeout=10)
    assert (yield s.read_all()) == (yield direct(f"{base}.dods"))[1]
    event = yield log.next("fetched", "sst")
    assert event["addresses"] == 1 and event["delivered"] == 1
    assert fake.routed == []
    with pytest.raises(magnet.Timeout):
        yield everything.next_stream(timeout=0.3)


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_without_subscribers(make_fetcher: Any, dap_upstream: Any) -> Any:
    """No subscription matches: no .dods is fetched, the fetched event still goes out."""
    bus, fetcher = yield make_fetcher(allow_hosts=(f"127.0.0.1:{dap_upstream['port']}",))
    _, _, log = yield _with_pub_sub(bus, r"^dataset\.other$")
    yield bus.post("fetcher", "fetch_dataset", name="sst", url=dap_upstream["url"])
    event = yield log.next("fetched", "sst")
    assert event["addresses"] == 0 and event["bytes"] == 0


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_refusals(make_fetcher: Any, recorder: Any) -> Any:
    """Bad arguments and forbidden upstreams: a failed event, no connection anywhere, no retry."""
    bus, _ = yield make_fetcher()
    _, (listener,), log = yield _with_pub_sub(bus, r"^dataset\.")
    before = len(recorder.connections)
    cases = [(dict(name="../x", url="http://example.org/a.nc"), "InvalidName", None),
             (dict(name="sst", url="file:///etc/passwd"), "InvalidURL", "sst"),
             (dict(name="sst", url="http://example.org/a.nc?x=1"), "InvalidURL", "sst"),
             (dict(name="sst", url=f"http://127.0.0.1:{recorder.port}/sst.nc"), "Forbidden", "sst"),
             (dict(name="sst", url="http://example.org/a.nc", to="persister.x"), "BadArguments", "sst"),
             (dict(name="sst", url="http://example.org/a.nc", to=[]), "BadArguments", "sst"),
             (dict(name="sst", url="http://example.org/a.nc", to=[1]), "BadArguments", "sst"),
             (dict(name="sst", url="http://example.org/a.nc", to=["a"] * 101), "BadArguments", "sst")]
    for n, (kwargs, kind, dataset) in enumerate(cases):
        yield bus.post("fetcher", "fetch_dataset", **kwargs)
        event = yield log.next("failed", timeout=10, skip=n)
        assert event["error"] == kind and event["dataset"] == dataset
    assert len(recorder.connections) == before
    with pytest.raises(magnet.Timeout):
        yield listener.next_stream(timeout=0.2)


@pytest.fixture(scope="module")
def made_datasets() -> Any:
    """A twisted.web upstream of made-up datasets: whole, broken mid-.dods, big, missing .dds."""
    from tests.ooidx.dissemination_helpers import dataset_site
    big = up.pattern(6 * 1024 * 1024)
    site = dataset_site({"whole": {"dods": b"x" * 5000}, "broken": {"dods": b"y" * 400_000, "mode": "broken"},
                         "big": {"dods": big, "mode": "big"}, "nodds": {"dods": b"z", "dds_status": 404}})
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port
    yield {"url": f"http://127.0.0.1:{number}", "port": number, "big": big}
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_broken_dods_aborts_every_stream(make_fetcher: Any, made_datasets: Any) -> Any:
    bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{made_datasets['port']}",))
    _, listeners, log = yield _with_pub_sub(bus, r"^dataset\.", r"broken")
    yield bus.post("fetcher", "fetch_dataset", name="broken", url=made_datasets["url"] + "/broken")
    for listener in listeners:
        s = yield listener.next_stream(timeout=10)
        with pytest.raises(StreamError):
            yield s.read_all()
    event = yield log.next("failed", "broken")
    assert event["stage"] == "dods" and event["error"] == "UpstreamError"
    assert not log.of("fetched", "broken")


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_failed_dds(make_fetcher: Any, made_datasets: Any) -> Any:
    bus, _ = yield make_fetcher(allow_hosts=(f"127.0.0.1:{made_datasets['port']}",))
    fake, (listener,), log = yield _with_pub_sub(bus, r"^dataset\.")
    yield bus.post("fetcher", "fetch_dataset", name="nodds", url=made_datasets["url"] + "/nodds")
    event = yield log.next("failed", "nodds")
    assert event["stage"] == "dds" and "404" in event["reason"]
    assert fake.routed == []  # no route asked, no stream started
    with pytest.raises(magnet.Timeout):
        yield listener.next_stream(timeout=0.2)


@pytest_twisted.inlineCallbacks
def test_fetch_dataset_slowest_subscriber_sets_the_pace(make_fetcher: Any, made_datasets: Any) -> Any:
    """Two subscribers, the broker slow to take one's messages: the upstream is
    paused until both streams have room, so what was sent to the fast address is
    never more than a stream window ahead of the slow one (the fetcher holds a
    bounded amount, whatever the size of the .dods).

    (A stream's backpressure is the broker's confirm: a consumer that is slow
    to read lets its queue grow in the broker, not in the fetcher.)"""
    bus, fetcher = yield make_fetcher(allow_hosts=(f"127.0.0.1:{made_datasets['port']}",))
    _, (fast, slow), log = yield _with_pub_sub(bus, r"^dataset\.", r"^dataset\.big$")
    sent = {fast.address: 0, slow.address: 0}
    lead = [0]
    real_send = bus.send

    def send(address: str, message: Any, **kwargs: Any) -> defer.Deferred:
        if address in sent and message.type == "stream-data":
            sent[address] += len(message.body)
            lead[0] = max(lead[0], sent[fast.address] - sent[slow.address])
        d = real_send(address, message, **kwargs)
        if address == slow.address:
            d.addCallback(lambda r: task.deferLater(reactor, 0.02, lambda: r))
        return d

    bus.send = send  # type: ignore[method-assign]
    yield bus.post("fetcher", "fetch_dataset", name="big", url=made_datasets["url"] + "/big")
    streams = []
    for listener in (fast, slow):
        streams.append((yield listener.next_stream(timeout=10)))
    bodies = yield defer.gatherResults([s.read_all() for s in streams])
    assert bodies[0] == bodies[1] == made_datasets["big"]
    assert fetcher.pauses > 0
    # one stream window plus what one read of the upstream brings
    from ooidx.datapath.fetcher import STREAM_CHUNK_SIZE, STREAM_WINDOW, UPSTREAM_READ_SIZE
    assert lead[0] <= STREAM_WINDOW * STREAM_CHUNK_SIZE + UPSTREAM_READ_SIZE, lead[0]
    event = yield log.next("fetched", "big")
    assert event["bytes"] == len(made_datasets["big"]) and event["delivered"] == 2


# --------------------------------------------------------------------------- #
# RabbitMQ


@pytest_twisted.inlineCallbacks
def test_fetch_over_rabbitmq(broker_url: str, upstream: Any) -> Any:
    """On RabbitMQ, under a queue name of the test's own (the broker is shared)."""
    name = f"test.fetcher.{uuid.uuid4().hex[:10]}"
    bus = magnet.connect(broker_url, reactor, rpc_timeout=10, send_timeout=10, shutdown_timeout=2)
    bus.startService()
    fetcher = Fetcher.from_config(name, bus, make_config(
        allow_hosts=(f"127.0.0.1:{upstream['port']}",)), node="test")
    try:
        yield bus.when_connected(10)
        yield bus.serve(name, fetcher)
        listener = yield bus.listen()
        store = yield bus.listen()
        yield bus.post(name, "fetch", url=upstream["url"] + "/big?size=3000000", method="GET",
                       address=listener.address, request_id=RID, store=store.address)
        s = yield listener.next_stream(timeout=10)
        body = yield s.read_all()
        assert body == up.pattern(3000000)
        assert s.correlation_id == RID and s.metadata["status"] == 200
        stored = yield store.next_stream(timeout=10)
        assert (yield stored.read_all()) == body
        e = yield _rabbit_error(bus, name, upstream["url"] + "/truncated")
        metadata, error = e
        assert metadata["length"] == 1000 and "UpstreamError" in str(error)
    finally:
        yield fetcher.stopService()
        try:
            yield bus.transport.delete_queue(name)
            yield bus.transport.delete_queue(name + ".dead")
        finally:
            yield bus.stopService()


@defer.inlineCallbacks
def _rabbit_error(bus: Any, name: str, url: str) -> Any:
    listener = yield bus.listen()
    yield bus.post(name, "fetch", url=url, method="GET", address=listener.address, request_id=RID)
    s = yield listener.next_stream(timeout=10)
    try:
        yield s.read_all()
    except StreamError as e:
        return s.metadata, e
    raise AssertionError("the stream completed")


# --------------------------------------------------------------------------- #
# HTTPS: the connection goes to the checked address, TLS verifies the host name


def _self_signed(name: str) -> Any:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # Twisted's server side
@pytest_twisted.inlineCallbacks
def test_https_verifies_the_name_and_connects_to_the_checked_address(make_fetcher: Any) -> Any:
    from twisted.internet import ssl
    from twisted.web.client import BrowserLikePolicyForHTTPS

    cert_pem, key_pem = _self_signed("secure.test")
    server_cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    port = reactor.listenSSL(0, up.make_site(), server_cert.options(), interface="127.0.0.1")
    number = port.getHost().port
    try:
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
        resolver = FakeResolver({"secure.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]})
        bus, _ = yield make_fetcher(resolver=resolver, tls_policy=policy,
                                    allow_hosts=(f"secure.test:{number}", f"wrong.test:{number}"))
        metadata, body, _ = yield fetch_body(bus, f"https://secure.test:{number}/host")
        assert metadata["status"] == 200 and body == f"secure.test:{number}".encode()
        e = yield fetch_error(bus, f"https://wrong.test:{number}/host")  # the certificate is not for it
        assert e.remote_type == "UpstreamError"
        e = yield fetch_error(bus, f"https://127.0.0.1:{number}/host")  # loopback without an entry
        assert e.remote_type == "Forbidden"
    finally:
        yield port.stopListening()
