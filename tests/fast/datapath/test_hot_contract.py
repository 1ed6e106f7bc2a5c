"""Hot answers (ooidx.datapath.hot): bounded by bytes, least recently used out
first, expired on the clock's time, dropped on dataset events and purge
broadcasts; held from and answered to a DummyRequest; counts posted in batches."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from magnet import Message, Timeout
from magnet.rpc import request as rpc_request

from ooidx import events
from ooidx.datapath.hot import (MAX_HELD_HEAD, AnsweredCounts, Held, HotResponses, answer_held, drop_on_event,
                                drop_on_purge, held_from)


def held(url: str, body: bytes = b"x", dataset: Any = None, expires: float = 100.0, headers: Any = None) -> Held:
    return Held(200, b"OK", headers or [(b"content-type", [b"text/plain"])], body, dataset, url, expires)


def event(kind: str, name: Any, body: Any = None) -> Message:
    topic = f"{events.EVENT}.{kind}.{name if name else '-'}"
    return Message.of_json(body if body is not None else {}, type=events.EVENT, headers={events.TOPIC_HEADER: topic})


class HotResponsesTests(SynchronousTestCase):
    def test_get_put_expire(self) -> None:
        hot = HotResponses()
        h = held("http://h/a.dds", expires=10.0)
        hot.put(b"GET", h.url, h)
        self.assertEqual((len(hot), hot.size), (1, h.size))
        self.assertIsNone(hot.get(b"HEAD", h.url, 0.0))  # keyed by method too
        self.assertIs(hot.get(b"GET", h.url, 9.9), h)
        self.assertEqual(hot.hits, 1)
        self.assertIsNone(hot.get(b"GET", h.url, 10.0))  # expired: dropped
        self.assertEqual((len(hot), hot.size), (0, 0))

    def test_replacing_counts_once(self) -> None:
        hot = HotResponses()
        hot.put(b"GET", "u", held("u", b"a" * 10))
        hot.put(b"GET", "u", held("u", b"b" * 20))
        self.assertEqual(len(hot), 1)
        self.assertEqual(hot.size, held("u", b"b" * 20).size)

    def test_too_big_is_not_held(self) -> None:
        hot = HotResponses(max_entry=4)
        hot.put(b"GET", "u", held("u", b"12345"))
        hot.put(b"GET", "v", held("v", b"1", headers=[(b"x-big", [b"h" * (MAX_HELD_HEAD + 1)])]))
        self.assertEqual(len(hot), 0)

    def test_least_recently_used_go_first(self) -> None:
        one = held("a", b"1" * 100).size
        hot = HotResponses(max_bytes=one * 2)
        hot.put(b"GET", "a", held("a", b"1" * 100))
        hot.put(b"GET", "b", held("b", b"2" * 100))
        hot.get(b"GET", "a", 0.0)  # a is used: b is now the oldest
        hot.put(b"GET", "c", held("c", b"3" * 100))
        self.assertIsNotNone(hot.get(b"GET", "a", 0.0))
        self.assertIsNone(hot.get(b"GET", "b", 0.0))
        self.assertIsNotNone(hot.get(b"GET", "c", 0.0))
        self.assertLessEqual(hot.size, one * 2)

    def test_sweep_drop_clear(self) -> None:
        hot = HotResponses()
        for url, dataset, expires in [("http://h/sst.dds", "sst", 5.0), ("http://h/sst.das?x", None, 50.0),
                                      ("http://h/sstx.dds", None, 50.0), ("http://h/sst", None, 50.0),
                                      ("http://h/other.dds", "other", 50.0)]:
            hot.put(b"GET", url, held(url, dataset=dataset, expires=expires))
        self.assertEqual(hot.sweep(5.0), 1)
        self.assertEqual(hot.drop_dataset("sst", "http://h/sst"), 2)  # sst.das?x and sst itself, not sstx
        self.assertEqual(hot.drop_url("http://h/sstx.dds"), 1)
        self.assertEqual(hot.drop_dataset(None, None), 0)
        self.assertEqual(hot.drop_dataset("other", None), 1)
        hot.put(b"GET", "u", held("u"))
        hot.clear()
        self.assertEqual((len(hot), hot.size), (0, 0))


class RequestTests(SynchronousTestCase):
    def test_held_from_and_answered(self) -> None:
        served = DummyRequest([b"x"])
        served.code, served.code_message = 200, b"OK"  # what server.Request keeps (DummyRequest has neither)
        served.responseHeaders.setRawHeaders(b"content-type", [b"application/octet-stream"])
        served.responseHeaders.setRawHeaders(b"connection", [b"close"])
        served.responseHeaders.setRawHeaders(b"date", [b"today"])
        h = held_from(served, "sst", "http://h/sst.dods", b"body", 10.0)
        self.assertEqual(h.headers, [(b"Content-Type", [b"application/octet-stream"])])
        self.assertEqual((h.status, h.dataset, h.body), (200, "sst", b"body"))
        again = DummyRequest([b"x"])
        self.assertEqual(answer_held(again, h), b"body")
        self.assertEqual(again.responseCode, 200)
        self.assertEqual(again.responseHeaders.getRawHeaders(b"content-type"), [b"application/octet-stream"])


class FakeBus:
    def __init__(self, failing: bool = False) -> None:
        self.posted: List[Any] = []
        self.failing = failing

    def post(self, address: str, op: str, **kwargs: Any) -> Any:
        self.posted.append((address, op, kwargs))
        return fail(Timeout("slow")) if self.failing else succeed(None)


class FakeLog:
    def __init__(self) -> None:
        self.lines: List[Any] = []

    def debug(self, fmt: str, **kw: Any) -> None:
        self.lines.append(kw)


class AnsweredCountsTests(SynchronousTestCase):
    def test_counted_and_posted_in_one_record_each(self) -> None:
        counts = AnsweredCounts()
        counts.add("sst", "http://h/sst.dds", 10)
        counts.add("sst", "http://h/sst.dds", 5)
        counts.add(None, "http://h/x", 1)
        self.assertEqual(len(counts), 2)
        bus = FakeBus()
        counts.post(bus, FakeLog(), "proxyng")
        self.assertEqual(len(counts), 0)
        records = sorted((kw["url"], kw["count"], kw["bytes"], kw["requests"]) for _, _, kw in bus.posted)
        self.assertEqual(records, [("http://h/sst.dds", 2, 15, 2), ("http://h/x", 1, 1, 1)])
        self.assertEqual({(a, op) for a, op, _ in bus.posted}, {("controller", "record")})

    def test_an_undelivered_record_is_logged(self) -> None:
        counts = AnsweredCounts()
        counts.add("sst", "u", 1)
        log = FakeLog()
        counts.post(FakeBus(failing=True), log, "proxyng")
        self.assertEqual(len(log.lines), 1)


class DropTests(SynchronousTestCase):
    def filled(self) -> HotResponses:
        hot = HotResponses()
        for url, dataset in [("http://h/sst.dds", "sst"), ("http://h/sst.das", None), ("http://h/o.dds", "o")]:
            hot.put(b"GET", url, held(url, dataset=dataset))
        return hot

    def test_events(self) -> None:
        hot = self.filled()
        self.assertEqual(drop_on_event(hot, event("purged", "sst", {"url": "http://h/sst"})), "sst")
        self.assertEqual(len(hot), 1)
        hot = self.filled()
        self.assertIsNone(drop_on_event(hot, event("cached", "sst", {"url": "http://h/sst.das"})))
        self.assertEqual(len(hot), 2)  # that URL only
        self.assertIsNone(drop_on_event(hot, event("cached", "sst", {})))
        self.assertIsNone(drop_on_event(hot, event("registered", None, {})))
        self.assertEqual(len(hot), 2)
        bad = Message(body=b"{", type=events.EVENT, headers={events.TOPIC_HEADER: "event.fetched.o"})
        self.assertEqual(drop_on_event(hot, bad), "o")
        self.assertEqual(len(hot), 1)

    def test_events_that_change_nothing(self) -> None:
        hot = self.filled()
        for message in [event("saved", "sst"), Message(type="call", headers={}),
                        Message(type=events.EVENT, headers={events.TOPIC_HEADER: 3}),
                        Message(type=events.EVENT, headers={events.TOPIC_HEADER: "event.purged"})]:
            self.assertIsNone(drop_on_event(hot, message))
        self.assertEqual(len(hot), 3)

    def test_purge_broadcasts(self) -> None:
        hot = self.filled()
        self.assertEqual(drop_on_purge(hot, rpc_request("purge", {"name": "sst", "base_url": "http://h/sst"})), "sst")
        self.assertEqual(len(hot), 1)
        self.assertIsNone(drop_on_purge(hot, rpc_request("stats", {})))
        self.assertEqual(len(hot), 1)
        self.assertIsNone(drop_on_purge(hot, Message(body=b"{", type="call")))
        self.assertEqual(len(hot), 0)  # unreadable: all of it goes
