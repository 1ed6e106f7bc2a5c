"""The proxy's request targets (ooidx.datapath.proxy_url.parse_target) on good
and bad request lines, the by-name base URLs (bases.BaseURLs) on a Clock, and
how an exchange's failures become HTTP errors (exchange). No bus, no socket."""
from __future__ import annotations

import json
from typing import Any, List

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from magnet import ConnectionLost, Message, RemoteError, StreamError, Timeout, Unroutable
from magnet.rpc import ERROR, REPLY, error_reply, reply
from twisted.python.failure import Failure

from ooidx.datapath import bases as bases_module
from ooidx.datapath.bases import BaseURLs
from ooidx.datapath.exchange import Exchange, as_http_error
from ooidx.datapath.proxy_url import MAX_URI, ProxyError, Target, parse_target, printable

from tests.fast.core.support import cases, expand

OWN = ("proxy.example.org:8080", "localhost:8080")


@expand
class ParseTargetTests(SynchronousTestCase):
    @cases("uri, name, suffix, query", [
        (b"/datasets/sst.dods", "sst", ".dods", None),
        (b"/datasets/sst.dods?", "sst", ".dods", ""),
        (b"/datasets/sst.dods?time,lat", "sst", ".dods", "time,lat"),
        (b"/datasets/a.b-c_1.ascii", "a.b-c_1", ".ascii", None),
        (b"/datasets/sst.asc", "sst", ".asc", None),
        (b"/datasets/sst.csv?x", "sst", ".csv", "x"),
        (b"/datasets/sst", "sst", "", None),
        (b"/datasets/x.nc.dds", "x.nc", ".dds", None),
        (b"http://proxy.example.org:8080/datasets/sst.das", "sst", ".das", None),
        (b"HTTP://LOCALHOST:8080/datasets/sst.info?a", "sst", ".info", "a"),
    ])
    def test_by_name(self, uri: bytes, name: str, suffix: str, query: Any) -> None:
        target = parse_target(uri, OWN)
        self.assertEqual((target.url, target.name, target.suffix, target.query), (None, name, suffix, query))
        self.assertEqual(target.csv, suffix == ".csv")
        self.assertIn(name, repr(target))

    @cases("uri", [b"http://data.example.org/x.dods?a,b", b"https://data.example.org:8443/y.das",
                   b"http://data.example.org"])
    def test_forward_proxy_url(self, uri: bytes) -> None:
        target = parse_target(uri, OWN)
        self.assertEqual((target.url, target.name), (uri.decode(), None))

    @cases("uri, status, kind", [
        (b"/" + b"a" * MAX_URI, 414, "URITooLong"),
        (b"data.example.org/x", 400, "InvalidURL"),
        (b"ftp://data.example.org/x", 400, "InvalidURL"),
        (b"http:///x", 400, "InvalidURL"),
        (b"http://:80/x", 400, "InvalidURL"),
        (b"http://user:pw@data.example.org/x", 400, "InvalidURL"),
        (b"http://data.example.org/a b", 400, "InvalidURL"),
        (b"http://data.example.org/\xff", 400, "InvalidURL"),
        (b"/other/sst.dods", 404, "NotFound"),
        (b"/datasets/", 400, "InvalidName"),
        (b"/datasets/.dods", 400, "InvalidName"),
        (b"/datasets/_x.dods", 400, "InvalidName"),
        (b"/datasets/\xc3\xa9.dods", 400, "InvalidName"),
        (b"/datasets/" + b"a" * 65 + b".dods", 400, "InvalidName"),
        (b"/datasets/sst.dods?a\x00b", 400, "InvalidURL"),
        (b"http://localhost:8080/nowhere", 404, "NotFound"),
    ])
    def test_refused(self, uri: bytes, status: int, kind: str) -> None:
        with self.assertRaises(ProxyError) as caught:
            parse_target(uri, OWN)
        self.assertEqual((caught.exception.status, caught.exception.kind), (status, kind))
        self.assertTrue(caught.exception.message)
        self.assertEqual(caught.exception.headers, {})

    def test_printable(self) -> None:
        self.assertEqual(printable(b"a\x01b"), "a?b")  # control bytes shown as ?
        self.assertEqual(printable(b"x" * 130, limit=4), "xxxx...")
        self.assertEqual(printable("é".encode()), "\\xc3\\xa9")


class FakeStoreBus:
    def __init__(self, answers: Any) -> None:
        self.answers = answers
        self.calls: List[Any] = []

    def call(self, address: str, op: str, **kwargs: Any) -> Deferred:
        self.calls.append((address, op, kwargs))
        answer = self.answers(kwargs["key"]) if callable(self.answers) else self.answers
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


class BaseURLsTests(SynchronousTestCase):
    def make(self, answers: Any, **kw: Any) -> Any:
        clock = task.Clock()
        bus = FakeStoreBus(answers)
        return BaseURLs(bus, clock, **kw), bus, clock

    def test_a_url_target_is_as_given(self) -> None:
        bases, bus, _ = self.make(None)
        self.assertEqual(self.successResultOf(bases.url_of(Target(url="http://h/x.dods"))), "http://h/x.dods")
        self.assertEqual(bus.calls, [])

    def test_by_name_and_remembered_for_ttl(self) -> None:
        bases, bus, clock = self.make({"url": "http://h/sst", "status": "registered"}, ttl=5.0)
        target = Target(name="sst", suffix=".dds", query="a")
        self.assertIsNone(bases.remembered_url(target))
        self.assertEqual(self.successResultOf(bases.url_of(target)), "http://h/sst.dds?a")
        self.assertEqual(bus.calls[0][:2], ("attribute_store", "get"))
        self.assertEqual(bus.calls[0][2]["key"], "dataset:sst")
        self.assertEqual(bases.remembered_url(target), "http://h/sst.dds?a")
        self.assertEqual(bases.remembered_url(Target(name="sst", suffix=".das")), "http://h/sst.das")
        self.successResultOf(bases.lookup("sst"))
        self.assertEqual(len(bus.calls), 1)  # remembered
        clock.advance(5.0)
        self.assertIsNone(bases.remembered_url(target))
        self.successResultOf(bases.lookup("sst"))
        self.assertEqual(len(bus.calls), 2)  # expired: asked again

    def test_csv_asks_for_dods(self) -> None:
        bases, _, _ = self.make(json.dumps({"url": "http://h/sst"}))  # a JSON string record is read too
        self.assertEqual(self.successResultOf(bases.url_of(Target(name="sst", suffix=".csv"))), "http://h/sst.dods")

    def test_forget(self) -> None:
        bases, bus, _ = self.make({"url": "http://h/sst"})
        for name in ("a", "b"):
            self.successResultOf(bases.lookup(name))
        bases.forget("a")
        self.assertIsNone(bases.remembered_url(Target(name="a")))
        self.assertIsNotNone(bases.remembered_url(Target(name="b")))
        bases.forget()
        self.assertIsNone(bases.remembered_url(Target(name="b")))

    def test_unknown_datasets_are_404(self) -> None:
        for answer in (RemoteError("KeyError", "dataset:x"), RemoteError("UnknownDataset", "x"),
                       {"url": "http://h/x", "status": "purged"}, {"nourl": 1}, "not json", 17):
            bases, _, _ = self.make(answer)
            error = self.failureResultOf(bases.lookup("x"), ProxyError).value
            self.assertEqual((error.status, error.kind), (404, "UnknownDataset"), answer)

    def test_other_store_errors_pass_through(self) -> None:
        bases, _, _ = self.make(RemoteError("Timeout", "slow"))
        self.assertEqual(self.failureResultOf(bases.lookup("x"), RemoteError).value.remote_type, "Timeout")

    def test_expired_names_dropped_past_the_bound(self) -> None:
        self.patch(bases_module, "MAX_REMEMBERED", 3)
        bases, _, clock = self.make({"url": "http://h/d"}, ttl=1.0)
        for name in ("a", "b", "c"):
            self.successResultOf(bases.lookup(name))
        clock.advance(2.0)
        self.successResultOf(bases.lookup("d"))
        self.assertEqual(set(bases._known), {"d"})


class FakeProxy:
    name = "proxyng"

    def __init__(self) -> None:
        self.lines: List[str] = []
        proxy = self

        class Log:
            def info(self, fmt: str, **kw: Any) -> None:
                proxy.lines.append(fmt)

            debug = info

        self.log = Log()


class FakeStream:
    def __init__(self, correlation_id: str) -> None:
        self.correlation_id = correlation_id
        self.delivered: List[Any] = []
        self.failed: List[Exception] = []

    def deliver(self, sink: Any) -> Deferred:
        self.delivered.append(sink)
        return succeed(None)

    def fail(self, error: Exception) -> None:
        self.failed.append(error)


class ExchangeTests(SynchronousTestCase):
    def test_an_error_reply_fails_the_answer_with_its_http_status(self) -> None:
        exchange = Exchange(FakeProxy(), "r1")
        try:
            raise KeyError("nope")
        except KeyError:
            message = error_reply(Failure(), "r1")
        exchange.on_message(message)
        error = self.failureResultOf(exchange.answer, ProxyError).value
        self.assertEqual(error.kind, "KeyError")
        exchange.on_message(message)  # a second one changes nothing

    def test_a_bad_error_reply_is_502(self) -> None:
        exchange = Exchange(FakeProxy(), "r1")
        exchange.on_message(Message(body=b"{not json", type=ERROR, correlation_id="r1"))
        self.assertEqual(self.failureResultOf(exchange.answer, ProxyError).value.status, 502)

    def test_the_route_reply_and_other_messages(self) -> None:
        proxy = FakeProxy()
        exchange = Exchange(proxy, "r1")
        exchange.on_message(reply({"via": "cache"}, "r1"))
        self.assertEqual(exchange.via, "cache")
        exchange.on_message(Message(body=b"{bad", type=REPLY, correlation_id="r1"))
        exchange.on_message(reply({"via": "x"}, "other"))  # another request's: dropped
        exchange.on_message(Message(body=b"", type="event", correlation_id="r1"))
        self.assertEqual(exchange.via, "cache")
        self.assertNoResult(exchange.answer)
        self.assertEqual(len(proxy.lines), 4)

    def test_streams(self) -> None:
        exchange = Exchange(FakeProxy(), "r1")
        other = FakeStream("r2")
        exchange.on_stream(other)
        self.assertEqual(len(other.delivered), 1)  # taken and dropped
        self.assertNoResult(exchange.answer)
        first = FakeStream("r1")
        exchange.on_stream(first)
        self.assertIs(self.successResultOf(exchange.answer), first)
        again = FakeStream("r1")
        exchange.on_stream(again)  # delivered again: the first sender is gone
        self.assertEqual(len(again.delivered), 1)
        self.assertEqual(len(first.failed), 1)
        self.assertIsInstance(first.failed[0], StreamError)


@expand
class AsHttpErrorTests(SynchronousTestCase):
    @cases("error, status", [
        (ProxyError(418, "Teapot", "short"), 418),
        (RemoteError("UnknownDataset", "x"), 404),
        (Unroutable("nobody"), 503),
        (ConnectionLost("gone"), 503),
        (Timeout("slow"), 504),
        (CancelledError(), 503),
    ])
    def test_known(self, error: BaseException, status: int) -> None:
        self.assertEqual(as_http_error(error).status, status)

    def test_unexpected_is_502_and_logged(self) -> None:
        error = as_http_error(ZeroDivisionError("boom"))
        self.assertEqual((error.status, error.kind), (502, "ZeroDivisionError"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
