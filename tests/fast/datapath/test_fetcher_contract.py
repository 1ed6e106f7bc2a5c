"""The fetcher's transfers (ooidx.datapath.transfer) and fetch_dataset
(ooidx.datapath.dataset_fetch) with a fake Agent and a fake bus on a Clock:
what goes to the client's address and to the store, redirects one checked hop
at a time, 304 revalidation, limits, an upstream that breaks off or stalls,
backpressure, refusals; the dataset's .das/.dds/.dods to its subscribers.
Real sockets stay in tests/ooidx/test_fetcher.py."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from magnet import Unroutable, RemoteError
from magnet.rpc import decode_reply

from ooidx import events
from ooidx.config import FetcherOptions, SecurityConfig
from ooidx.datapath import upstream
from ooidx.datapath.fetcher import Fetcher
from ooidx.errors import Forbidden, UpstreamError, UpstreamTimeout

from tests.fast.core.support import cases, expand

HOST = "data.example.org"
URL = f"http://{HOST}/opendap/sst.nc.dods?time"
BASE = f"http://{HOST}/opendap/sst.nc"


class FakeTransport:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """An answer whose body is C{chunks} then C{end} (None: the test ends it)."""

    def __init__(self, code: int = 200, chunks: Any = (b"abc", b"def"), headers: Optional[Dict[str, Any]] = None,
                 length: Any = "auto", end: Any = "done", phrase: bytes = b"OK") -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers({k: v if isinstance(v, list) else [v] for k, v in (headers or {}).items()})
        self.chunks = list(chunks)
        self.length = sum(len(c) for c in self.chunks) if length == "auto" else length
        self.end = end
        self.protocol: Any = None
        self.transport = FakeTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            if self.transport.stopped:
                break
            protocol.dataReceived(chunk)
        if self.end == "done":
            protocol.connectionLost(Failure(ResponseDone()))
        elif self.end == "loss":
            protocol.connectionLost(Failure(PotentialDataLoss()))
        elif self.end == "broken":
            protocol.connectionLost(Failure(ConnectionLost("reset")))


class FakeAgent:
    def __init__(self, answers: Dict[str, Any]) -> None:
        self.answers = answers
        self.requests: List[Any] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred:
        self.requests.append((method, uri.decode(), headers))
        answer = self.answers.get(uri.decode())
        if isinstance(answer, list):
            answer = answer.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return fail(answer)
        if answer is None:
            return fail(ConnectionRefusedError())
        return succeed(answer)


class FakeWriter:
    def __init__(self, address: str, metadata: Dict[str, Any], correlation_id: Any, room: Any) -> None:
        self.address = address
        self.metadata = metadata
        self.correlation_id = correlation_id
        self.chunks: List[bytes] = []
        self.finished = False
        self.aborted: Optional[BaseException] = None
        self.room = room

    def write(self, data: bytes) -> Deferred:
        self.chunks.append(data)
        return self.room(self) if self.room else succeed(None)

    def finish(self) -> Deferred:
        self.finished = True
        return succeed(None)

    def abort(self, exc: BaseException) -> Deferred:
        self.aborted = exc
        return succeed(None)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class FakeBus:
    node = "n"

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.sent: List[Any] = []
        self.posted: List[Any] = []
        self.writers: List[FakeWriter] = []
        self.room: Any = None
        self.routes: Any = ["sub.a", "sub.b", "sub.a"]
        self.unroutable: set = set()

    def send(self, address: str, message: Any, **kwargs: Any) -> Deferred:
        self.sent.append((address, message))
        return succeed(None)

    def post(self, address: str, op: str, /, **kwargs: Any) -> Deferred:
        if address in self.unroutable:
            return fail(Unroutable(address))
        self.posted.append((address, op, kwargs))
        return succeed(None)

    def call(self, address: str, op: str, **kwargs: Any) -> Deferred:
        if isinstance(self.routes, Exception):
            return fail(self.routes)
        return succeed(self.routes)

    def open_stream(self, address: str, metadata: Dict[str, Any], *, correlation_id: Any = None,
                    **kwargs: Any) -> FakeWriter:
        writer = FakeWriter(address, metadata, correlation_id, self.room)
        self.writers.append(writer)
        return writer

    def errors_to(self, address: str) -> List[RemoteError]:
        out = []
        for a, message in self.sent:
            if a == address:
                try:
                    decode_reply(message)
                except RemoteError as e:
                    out.append(e)
        return out

    def events(self) -> List[Dict[str, Any]]:
        return [m.json() for a, m in self.sent if a == events.NOTIFICATION]


class Case(SynchronousTestCase):
    def make(self, answers: Dict[str, Any], **options: Any) -> Any:
        self.clock = task.Clock()
        self.bus = FakeBus(self.clock)
        options.setdefault("timeout", 30.0)
        self.fetcher = Fetcher("fetcher", self.bus, node="n", clock=self.clock, options=FetcherOptions(**options),
                               security=SecurityConfig(allow_hosts=(HOST,)))
        self.agent = FakeAgent(answers)
        self.fetcher._agent = self.agent
        return self.fetcher

    def fetch(self, url: str = URL, **kwargs: Any) -> Deferred:
        kwargs.setdefault("address", "client")
        kwargs.setdefault("request_id", "r1")
        return self.fetcher.fetch(url=url, **kwargs)

    def writer(self, address: str) -> FakeWriter:
        found = [w for w in self.bus.writers if w.address == address]
        self.assertEqual(len(found), 1, address)
        return found[0]


@expand
class TransferTests(Case):
    def test_a_200_goes_to_the_client_and_the_store(self) -> None:
        self.make({URL: FakeResponse(headers={"Content-Type": "application/octet-stream", "ETag": '"e1"',
                                              "Keep-Alive": "x", "Proxy-Foo": "y", "Connection": "X-Private",
                                              "X-Private": "z"})})
        summary = self.successResultOf(self.fetch(store="cache.node.n", validators={"etag": None}))
        self.assertEqual(summary, {"status": 200, "bytes": 6})
        client, store = self.writer("client"), self.writer("cache.node.n")
        self.assertEqual((client.body, client.finished, client.correlation_id), (b"abcdef", True, "r1"))
        names = [h[0].lower() for h in client.metadata["headers"]]
        self.assertIn("content-type", names)
        self.assertIn("content-length", names)  # the upstream's length passed on
        for hop in ("keep-alive", "proxy-foo", "x-private", "connection"):
            self.assertNotIn(hop, names)
        self.assertEqual((client.metadata["source"], client.metadata["length"]), ("fetcher", 6))
        self.assertEqual((store.body, store.metadata["store"], store.metadata["validators"]["etag"]),
                         (b"abcdef", True, '"e1"'))
        self.assertEqual(self.bus.posted[-1][:2], ("controller", "record"))
        self.assertEqual(self.fetcher.active, 0)
        method, uri, headers = self.agent.requests[0]
        self.assertEqual((method, headers.getRawHeaders(b"user-agent")), (b"GET", [upstream.USER_AGENT]))

    def test_head_and_errors_are_not_stored(self) -> None:
        self.make({URL: FakeResponse(chunks=[], headers={"Content-Length": "99"}),
                   URL + "x": FakeResponse(code=404, chunks=[b"no"], phrase=b"Not Found")})
        self.assertEqual(self.successResultOf(self.fetch(method="head", store="s"))["status"], 200)
        self.assertEqual(self.writer("client").metadata["length"], 99)
        self.assertEqual(self.successResultOf(self.fetch(URL + "x", address="c2", store="s")),
                         {"status": 404, "bytes": 2})
        self.assertEqual(self.writer("c2").metadata["reason"], "Not Found")
        self.assertEqual([w.address for w in self.bus.writers], ["client", "c2"])

    def test_store_limit(self) -> None:
        self.make({URL: FakeResponse(), URL + "u": FakeResponse(length=UNKNOWN_LENGTH)})
        self.successResultOf(self.fetch(store="s", store_limit=5))  # declared 6 > 5: no store stream
        self.assertEqual([w.address for w in self.bus.writers], ["client"])
        self.successResultOf(self.fetch(URL + "u", address="c2", store="s2", store_limit=4))
        store = self.writer("s2")
        self.assertIsInstance(store.aborted, UpstreamError)  # passed the limit as it came
        self.assertEqual(self.writer("c2").body, b"abcdef")

    def test_redirects_are_followed_and_checked(self) -> None:
        there = f"http://{HOST}/elsewhere.dods"
        self.make({URL: FakeResponse(code=302, headers={"Location": "/elsewhere.dods"}, chunks=[]),
                   there: FakeResponse(chunks=[b"x"])})
        self.assertEqual(self.successResultOf(self.fetch()), {"status": 200, "bytes": 1})
        self.assertEqual([r[1] for r in self.agent.requests], [URL, there])

    @cases("location, kind", [("http://127.0.0.1/x", "Forbidden"), ("ftp://x/y", "UpstreamError")])
    def test_bad_redirects(self, location: str, kind: str) -> None:
        self.make({URL: FakeResponse(code=301, headers={"Location": location}, chunks=[])})
        self.assertEqual(self.successResultOf(self.fetch())["error"], kind)
        self.assertEqual(self.bus.errors_to("client")[0].remote_type, kind)

    def test_too_many_redirects(self) -> None:
        self.make({URL: FakeResponse(code=307, headers={"Location": URL}, chunks=[])}, max_redirects=2)
        self.agent.answers[URL] = [FakeResponse(code=307, headers={"Location": URL}, chunks=[]) for _ in range(3)]
        self.assertEqual(self.successResultOf(self.fetch())["error"], "UpstreamError")
        self.assertEqual(len(self.agent.requests), 3)

    def test_a_303_keeps_head_and_get(self) -> None:
        there = f"http://{HOST}/b"
        self.make({URL: FakeResponse(code=303, headers={"Location": there}, chunks=[]), there: FakeResponse()})
        self.successResultOf(self.fetch(method="HEAD"))
        self.assertEqual([r[0] for r in self.agent.requests], [b"HEAD", b"HEAD"])

    def test_304_serves_from_the_store(self) -> None:
        self.make({URL: FakeResponse(code=304, chunks=[])})
        summary = self.successResultOf(self.fetch(store="cache.node.n",
                                                  validators={"etag": '"e1"', "last_modified": "Mon"}))
        self.assertEqual(summary, {"status": 304, "bytes": 0, "revalidated": True})
        self.assertEqual(self.bus.posted[0][:2], ("cache.node.n", "serve"))
        self.assertTrue(self.bus.posted[0][2]["revalidated"])
        headers = self.agent.requests[0][2]
        self.assertEqual((headers.getRawHeaders(b"if-none-match"), headers.getRawHeaders(b"if-modified-since")),
                         ([b'"e1"'], [b"Mon"]))
        self.assertEqual(len(self.bus.posted), 1)  # a revalidation is not recorded again

    def test_304_with_the_cache_gone(self) -> None:
        self.make({URL: FakeResponse(code=304, chunks=[])})
        self.bus.unroutable.add("cache.node.n")
        self.assertEqual(self.successResultOf(self.fetch(store="cache.node.n", validators={"etag": "e"}))["error"],
                         "UpstreamError")

    @cases("error, kind", [(ConnectionRefusedError(), "UpstreamError"), (DNSLookupError("x"), "UpstreamError"),
                           (ResponseFailed([Failure(UpstreamError("too many headers"))]), "UpstreamError"),
                           (ResponseFailed([Failure(ConnectionLost())]), "UpstreamError"),
                           (OSError("x"), "UpstreamError"), (ValueError("odd"), "UpstreamError"),
                           (Forbidden("private"), "Forbidden")])
    def test_failures_before_the_answer(self, error: Exception, kind: str) -> None:
        self.make({URL: error})
        summary = self.successResultOf(self.fetch())
        self.assertEqual((summary["error"], summary["bytes"]), (kind, 0))
        self.assertEqual(self.bus.errors_to("client")[0].remote_type, kind)

    def test_no_answer_in_time(self) -> None:
        self.make({URL: Deferred()}, timeout=5.0)
        d = self.fetch()
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d)["error"], "UpstreamTimeout")

    def test_a_body_that_stalls(self) -> None:
        response = FakeResponse(end=None)
        self.make({URL: response}, timeout=5.0)
        d = self.fetch(store="s")
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d)["error"], "UpstreamTimeout")
        self.assertIsInstance(self.writer("client").aborted, UpstreamTimeout)
        self.assertTrue(response.transport.stopped)

    def test_a_body_that_breaks_off(self) -> None:
        self.make({URL: FakeResponse(end="broken")})
        summary = self.successResultOf(self.fetch(store="s"))
        self.assertEqual((summary["error"], summary["bytes"]), ("UpstreamError", 6))
        self.assertIsNotNone(self.writer("client").aborted)
        self.assertIsNotNone(self.writer("s").aborted)

    def test_a_body_ended_by_close_is_not_stored(self) -> None:
        self.make({URL: FakeResponse(end="loss", length=UNKNOWN_LENGTH)})
        self.assertEqual(self.successResultOf(self.fetch(store="s")), {"status": 200, "bytes": 6})
        self.assertTrue(self.writer("client").finished)
        self.assertIsNotNone(self.writer("s").aborted)

    def test_size_limits(self) -> None:
        self.make({URL: FakeResponse(), URL + "u": FakeResponse(length=UNKNOWN_LENGTH)}, max_bytes=4)
        self.assertEqual(self.successResultOf(self.fetch())["error"], "UpstreamError")  # declared: refused
        self.assertEqual(self.bus.writers, [])
        self.assertEqual(self.successResultOf(self.fetch(URL + "u", address="c2"))["error"], "UpstreamError")
        self.assertIsNotNone(self.writer("c2").aborted)

    def test_backpressure_pauses_the_upstream(self) -> None:
        response = FakeResponse(end=None)
        self.make({URL: response})
        waiting: List[Deferred] = []

        def room(writer: FakeWriter) -> Deferred:
            d: Deferred = Deferred()
            waiting.append(d)
            return d

        self.bus.room = room
        d = self.fetch()
        self.assertEqual(response.transport.paused, 1)
        self.assertEqual(self.fetcher.pauses, 1)
        for w in waiting:
            w.callback(None)
        self.assertEqual(response.transport.resumed, 1)
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(d), {"status": 200, "bytes": 6})

    def test_a_client_stream_that_breaks(self) -> None:
        response = FakeResponse(end=None)
        self.make({URL: response})
        self.bus.room = lambda writer: fail(Unroutable("client gone"))
        summary = self.successResultOf(self.fetch())
        self.assertEqual(summary["error"], "UpstreamError")
        self.assertTrue(response.transport.stopped)

    @cases("kwargs, kind", [({"url": "ftp://x/y"}, "InvalidURL"), ({"url": ""}, "InvalidURL"),
                            ({"method": "POST"}, "BadArguments"), ({"request_id": 3}, "BadArguments"),
                            ({"store": ""}, "BadArguments"), ({"validators": []}, "BadArguments"),
                            ({"validators": {"etag": "a\nb"}}, "BadArguments"),
                            ({"store_limit": -1}, "BadArguments"), ({"store_limit": True}, "BadArguments")])
    def test_refusals(self, kwargs: Dict[str, Any], kind: str) -> None:
        self.make({})
        self.assertEqual(self.successResultOf(self.fetch(**kwargs))["error"], kind)
        self.assertEqual(self.bus.errors_to("client")[0].remote_type, kind)
        self.assertEqual(self.agent.requests, [])

    def test_without_an_address_it_is_dropped(self) -> None:
        self.make({})
        self.assertEqual(self.successResultOf(self.fetcher.fetch(url=URL))["error"], "BadArguments")
        self.assertEqual(self.bus.sent, [])
        self.flushLoggedErrors()

    def test_stop_waits_for_transfers_then_closes(self) -> None:
        self.make({URL: FakeResponse(end=None)}, timeout=30.0)
        self.fetcher.shutdown_timeout = 2.0
        d = self.fetch()
        stopped = self.fetcher.tearDown()
        self.assertNoResult(stopped)
        self.clock.advance(2)
        self.successResultOf(stopped)
        self.clock.advance(30)
        self.assertEqual(self.successResultOf(d)["error"], "UpstreamTimeout")


DAS, DDS, DODS = BASE + ".das", BASE + ".dds", BASE + ".dods"


@expand
class DatasetFetchTests(Case):
    def answers(self, **over: Any) -> Dict[str, Any]:
        answers = {DAS: FakeResponse(chunks=[b"Attributes {}"]), DDS: FakeResponse(chunks=[b"Dataset {}"]),
                   DODS: FakeResponse(chunks=[b"\x00" * 10, b"\x01" * 5])}
        answers.update(over)
        return answers

    def test_to_every_routed_subscriber(self) -> None:
        self.make(self.answers())
        summary = self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))
        self.assertEqual((summary["addresses"], summary["delivered"], summary["bytes"]),
                         (["sub.a", "sub.b"], ["sub.a", "sub.b"], 15))
        for address in ("sub.a", "sub.b"):
            writer = self.writer(address)
            self.assertEqual((writer.metadata["das"], writer.metadata["dds"]), ("Attributes {}", "Dataset {}"))
            self.assertEqual((writer.metadata["topic"], writer.body, writer.finished), ("dataset.sst", b"\x00" * 10 + b"\x01" * 5, True))
        self.assertEqual([(e["kind"], e["dataset"], e["delivered"]) for e in self.bus.events()], [("fetched", "sst", 2)])

    def test_to_named_addresses_only(self) -> None:
        self.make(self.answers())
        self.bus.routes = RemoteError("ShouldNotRoute", "x")
        summary = self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE, to=["p.1", "p.1"]))
        self.assertEqual(summary["delivered"], ["p.1"])

    def test_nobody_subscribed(self) -> None:
        self.make(self.answers())
        self.bus.routes = []
        summary = self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))
        self.assertEqual(summary["addresses"], [])
        self.assertEqual([r[1] for r in self.agent.requests], [DAS, DDS])  # no .dods fetched

    @cases("over, routes, stage, kind", [
        ({DAS: FakeResponse(code=404)}, None, "das", "UpstreamError"),
        ({DDS: FakeResponse(chunks=[b"x" * 20], length=UNKNOWN_LENGTH)}, None, "dds", "UpstreamError"),
        ({DDS: FakeResponse(end="broken")}, None, "dds", "UpstreamError"),
        ({}, RemoteError("Timeout", "slow"), "route", "RemoteError"),
        ({}, "not a list", "route", "UpstreamError"),
        ({DODS: FakeResponse(code=500)}, None, "dods", "UpstreamError"),
        ({DODS: FakeResponse(end="loss")}, None, "dods", "UpstreamError"),
        ({DODS: ConnectionRefusedError()}, None, "dods", "UpstreamError"),
    ])
    def test_failures_are_events(self, over: Dict[str, Any], routes: Any, stage: str, kind: str) -> None:
        self.make(self.answers(**over), max_bytes=16)
        if routes is not None:
            self.bus.routes = routes
        summary = self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))
        self.assertEqual((summary["stage"], summary["error"]), (stage, kind))
        event = self.bus.events()[-1]
        self.assertEqual((event["kind"], event["stage"], event["error"]), ("failed", stage, kind))

    def test_over_the_size_limit(self) -> None:
        self.make(self.answers(), max_bytes=14)  # .das 13 and .dds 10 bytes fit, .dods 15 does not
        self.assertEqual(self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))["stage"], "dods")
        self.make(self.answers(**{DODS: FakeResponse(chunks=[b"x" * 20], length=UNKNOWN_LENGTH)}), max_bytes=16)
        self.assertEqual(self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))["error"],
                         "UpstreamError")

    def test_a_stalled_dds(self) -> None:
        self.make(self.answers(**{DDS: FakeResponse(end=None)}), timeout=5.0)
        d = self.fetcher.fetch_dataset(name="sst", url=BASE)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d)["error"], "UpstreamTimeout")

    def test_one_broken_subscriber_stream_the_others_go_on(self) -> None:
        self.make(self.answers())
        self.bus.room = lambda writer: fail(Unroutable("gone")) if writer.address == "sub.b" else succeed(None)
        summary = self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))
        self.assertEqual(summary["delivered"], ["sub.a"])
        self.bus.room = lambda writer: fail(Unroutable("gone"))
        self.make(self.answers())
        self.bus.room = lambda writer: fail(Unroutable("gone"))
        self.assertEqual(self.successResultOf(self.fetcher.fetch_dataset(name="sst", url=BASE))["error"],
                         "UpstreamError")

    @cases("kwargs, kind", [({"name": "-x"}, "InvalidName"), ({"url": 3}, "InvalidURL"),
                            ({"url": BASE + "?q"}, "InvalidURL"), ({"request_id": 3}, "BadArguments"),
                            ({"to": []}, "BadArguments"), ({"to": [""]}, "BadArguments")])
    def test_refusals_are_failed_events(self, kwargs: Dict[str, Any], kind: str) -> None:
        self.make({})
        args = {"name": "sst", "url": BASE, **kwargs}
        self.assertEqual(self.successResultOf(self.fetcher.fetch_dataset(**args))["error"], kind)
        self.assertEqual(self.bus.events()[-1]["kind"], "failed")
        self.assertEqual(self.agent.requests, [])
