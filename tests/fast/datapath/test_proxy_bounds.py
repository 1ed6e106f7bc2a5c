"""The proxy's bounds on what one client, and one answer, may hold (no broker,
no port, time on a task.Clock): requests in progress per client address
(max_per_client), a client that reads nothing cut off (stall_timeout), the
answer headers passed on (count, bytes, control characters, cookies), the
held ("hot") answers counting their headers and sweeping expired entries,
and a client that leaves before its answer is relayed."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from ooidx.datapath.hot import Held, HotResponses
from ooidx.datapath.proxy import Proxy, ProxyError
from ooidx.datapath.relay import MAX_HEADERS, ClientGone, Pump, passed_on_headers


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = 0
        self.lost = 0

    def abortConnection(self) -> None:
        self.aborted += 1

    def loseConnection(self) -> None:
        self.lost += 1


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class Request(DummyRequest):
    """A DummyRequest with what the proxy looks at: a channel, startedWriting."""

    startedWriting = False

    def __init__(self, uri: bytes, host: str = "192.0.2.1") -> None:
        super().__init__([b""])
        self.uri = uri
        self.method = b"GET"
        self.client = IPv4Address("TCP", host, 40000)
        self.channel: Any = FakeChannel()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        if self.channel is None:
            raise AttributeError("'NoneType' object has no attribute 'unregisterProducer'")
        self.producer = None


class FakeTransportOfBus:
    def add_link_listener(self, listener: Any) -> None:
        pass


class FakeBus:
    """listen() that never answers: a request stays in progress until its timeout."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.transport = FakeTransportOfBus()
        self.listens: List[Deferred] = []

    def listen(self, *args: Any, **kwargs: Any) -> Deferred:
        d: Deferred = Deferred()
        self.listens.append(d)
        return d

    def post(self, *args: Any, **kwargs: Any) -> Deferred:
        return succeed(None)


def make_proxy(clock: task.Clock, **kwargs: Any) -> Proxy:
    return Proxy("proxyng", FakeBus(clock), node="n", clock=clock, port=0, interface="127.0.0.1",
                 lookup_timeout=10.0, hot_ttl=0, **kwargs)


URL = b"http://data.example.org/x.dods"


class PerClientTests(SynchronousTestCase):
    def test_requests_in_progress_are_bounded_per_address(self) -> None:
        clock = task.Clock()
        proxy = make_proxy(clock, max_per_client=2)
        first = [Request(URL), Request(URL)]
        for request in first:
            self.assertIs(proxy.render(request), server.NOT_DONE_YET)
        refused = Request(URL)
        body = proxy.render(refused)
        self.assertEqual(refused.responseCode, 429)
        self.assertIn(b"TooManyRequests", body)
        self.assertEqual(refused.responseHeaders.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(proxy.refused, 1)
        # another address is not held back by this one's requests
        self.assertIs(proxy.render(Request(URL, host="192.0.2.2")), server.NOT_DONE_YET)
        # the requests end (here: no listen address within the lookup timeout): room again
        clock.advance(10.0)
        self.assertEqual([r.responseCode for r in first], [504, 504])
        self.assertEqual(proxy._per_client, {})
        self.assertIs(proxy.render(Request(URL)), server.NOT_DONE_YET)

    def test_options_come_from_the_config(self) -> None:
        from ooidx.config import parse

        config = parse("components: {proxyng: {max_per_client: 3, stall_timeout: 1.5}}\n", "dx.yaml", environ={})
        clock = task.Clock()
        proxy = Proxy.from_config("proxyng", FakeBus(clock), config, node="n", clock=clock, port=0,
                                  interface="127.0.0.1")
        self.assertEqual((proxy.max_per_client, proxy.stall_timeout), (3, 1.5))


class StallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.proxy = make_proxy(self.clock, stall_timeout=5.0)
        self.request = Request(URL)
        self.pump = Pump(self.request, self.proxy)

    def test_a_client_that_reads_nothing_is_cut_off(self) -> None:
        self.pump.pauseProducing()
        waiting = self.pump.sink(b"x" * 10)
        self.assertIsInstance(waiting, Deferred)
        self.clock.advance(4.9)
        self.assertEqual(self.request.channel.transport.aborted, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.request.channel.transport.aborted, 1)  # a reset, not a graceful close
        self.assertEqual(self.proxy.stalled, 1)
        failure = self.failureResultOf(waiting, ClientGone)
        self.assertIn("read nothing for 5 s", failure.getErrorMessage())
        self.assertRaises(ClientGone, self.pump.sink, b"more")

    def test_a_client_that_reads_is_not_cut(self) -> None:
        for _ in range(10):
            self.pump.pauseProducing()
            self.clock.advance(4.0)
            self.pump.resumeProducing()  # it read something: the clock starts again
        self.assertEqual(self.request.channel.transport.aborted, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timer_left_after_the_client_left(self) -> None:
        self.pump.pauseProducing()
        self.pump.stopProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FakeStream:
    def __init__(self, metadata: Any, chunks: Optional[List[bytes]] = None) -> None:
        self.metadata = metadata
        self.chunks = chunks or []
        self.delivered: Optional[Deferred] = None

    def deliver(self, sink: Any) -> Deferred:
        for chunk in self.chunks:
            sink(chunk)
        return succeed(sum(len(c) for c in self.chunks))


class RelayTests(SynchronousTestCase):
    def test_client_gone_before_the_relay(self) -> None:
        """The client left while the answer was on its way: no AttributeError
        from registerProducer / unregisterProducer on a request without a channel."""
        clock = task.Clock()
        proxy = make_proxy(clock)
        request = Request(URL)
        request.channel = None
        stream = FakeStream({"status": 200, "headers": [["Content-Length", "3"]]}, [b"abc"])
        d = proxy._relay(request, stream, "GET", None, 0.0)
        self.successResultOf(d)
        self.assertIsNone(request.producer)

    def test_client_gone_during_the_relay(self) -> None:
        clock = task.Clock()
        proxy = make_proxy(clock)
        request = Request(URL)

        class Leaving(FakeStream):
            def deliver(self, sink: Any) -> Deferred:
                d: Deferred = Deferred()
                request.channel = None  # the connection is lost meanwhile
                d.errback(ClientGone("the client went away"))
                return d

        d = proxy._relay(request, Leaving({"status": 200, "headers": []}), "GET", None, 0.0)
        self.successResultOf(d)
        self.assertIsNone(request.producer)


class HeaderTests(SynchronousTestCase):
    def test_control_characters_cookies_and_bad_names(self) -> None:
        grouped = passed_on_headers([["X-Odd", "a\x00b\x0bc\x1bd\x7f\te"], ["Set-Cookie", "a=1"],
                                     ["SET-COOKIE2", "b=2"], ["X-Split", "a\r\nSet-Cookie: c=3"],
                                     ["Bad Name", "x"], ["X:Colon", "y"], ["Connection", "close"],
                                     ["Content-Type", "text/html"]])
        self.assertEqual(grouped, {b"x-odd": [b"abcd\te"], b"content-type": [b"text/html"]})

    def test_too_many_fields_or_bytes(self) -> None:
        passed_on_headers([[f"X-{i}", "v"] for i in range(MAX_HEADERS)])
        with self.assertRaises(ProxyError) as caught:
            passed_on_headers([[f"X-{i}", "v"] for i in range(MAX_HEADERS + 1)])
        self.assertEqual(caught.exception.status, 502)
        with self.assertRaises(ProxyError):
            passed_on_headers([["X-Big", "v" * 70_000]])

    def test_relayed_answers_are_sandboxed_with_the_standard_reason(self) -> None:
        clock = task.Clock()
        proxy = make_proxy(clock)
        request = Request(URL)
        stream = FakeStream({"status": 200, "reason": "OK\rSet-Cookie: injected=1",
                             "headers": [["Set-Cookie", "a=1"], ["Content-Length", "3"]]}, [b"abc"])
        self.successResultOf(proxy._relay(request, stream, "GET", None, 0.0))
        self.assertEqual(request.responseCode, 200)
        self.assertIsNone(request.responseMessage)  # None: Twisted writes the standard phrase
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-security-policy"), [b"sandbox"])
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"set-cookie"))


class HotTests(SynchronousTestCase):
    def held(self, headers: Any, body: bytes = b"b", expires: float = 10.0) -> Held:
        return Held(200, None, headers, body, None, "http://x/y", expires)

    def test_headers_count_against_the_bound(self) -> None:
        hot = HotResponses(max_bytes=100_000)
        fat = [(b"x-h-%d" % i, [b"v" * 500]) for i in range(90)]
        hot.put(b"GET", "http://x/1", self.held(fat))
        self.assertGreater(hot.size, 90 * 500)
        hot.put(b"GET", "http://x/2", self.held(fat))
        hot.put(b"GET", "http://x/3", self.held(fat))
        self.assertLessEqual(hot.size, 100_000)
        self.assertEqual(len(hot), 2)

    def test_expired_answers_are_swept(self) -> None:
        hot = HotResponses()
        hot.put(b"GET", "http://x/old", self.held([], expires=5.0))
        hot.put(b"GET", "http://x/new", self.held([], expires=50.0))
        self.assertEqual(hot.sweep(10.0), 1)
        self.assertEqual(len(hot), 1)
        self.assertEqual(hot.size, hot.get(b"GET", "http://x/new", 10.0).size)

    def test_the_proxy_sweeps_on_its_timer(self) -> None:
        clock = task.Clock()
        proxy = Proxy("proxyng", FakeBus(clock), node="n", clock=clock, port=0, interface="127.0.0.1",
                      hot_ttl=2.0, record_interval=1.0)
        proxy.hot.put(b"GET", "http://x/y", self.held([], expires=2.0))
        proxy._record_answered()
        self.assertEqual(len(proxy.hot), 1)
        clock.advance(3.0)
        proxy._record_answered()
        self.assertEqual(len(proxy.hot), 0)
