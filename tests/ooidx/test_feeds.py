"""Atom feeds on the real web port, read by feedparser: a memory:// bus, the
real Notification (its ring is what the feeds show) and Web on port 0, a
stand-in controller that knows which datasets are registered."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, Optional

import feedparser
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.web.client import HTTPConnectionPool

import magnet
from magnet import operation

from ooidx.config import parse
from ooidx import events
from ooidx.dissemination.notification import Notification
from ooidx.errors import UnknownDataset
from ooidx.node.bootstrap import declare_topology
from ooidx.node.metrics import renderer_for
from ooidx.web.app import Web

TOKEN = "operator-token-" + "f" * 20
#: Shaped as ooidx.dissemination.changes.summarize makes it (the versions branch); only "text" is read by name.
CHANGES = {"from": "20240102T000000Z-aaaaaaaaaaaa", "to": "20240103T000000Z-bbbbbbbbbbbb", "first": False,
           "text": "time 2024-01-01T00:00:00 → 2024-01-03T00:00:00 (was → 2024-01-02T00:00:00); "
                   "variable added: salinity",
           "coverage": {"time": {"units": "days since 2024-01-01", "before": {"end": "2024-01-02T00:00:00"},
                                 "after": {"end": "2024-01-03T00:00:00"}}},
           "variables": {"added": ["salinity"], "removed": [], "more": 0},
           "shapes": [{"variable": "sst", "before": [2, 4], "after": [3, 4]}]}


class FakeController:
    def __init__(self, names: Any) -> None:
        self.names = set(names)

    @operation
    def get(self, name: str) -> Dict[str, Any]:
        if name not in self.names:
            raise UnknownDataset(f"no dataset {name!r}")
        return {"name": name, "status": "fetched"}

    @operation
    def get_stats(self) -> Dict[str, Any]:
        return {"requests": 9, "datasets": {"sst": {"requests": 7, "hits": 5, "misses": 2, "bytes": 700},
                                            "quiet": {"requests": 2, "hits": 0, "misses": 2, "bytes": 20}}}

    @operation
    def list(self, pattern: Any = None) -> Any:
        return [{"name": "sst", "versions": 3, "last_fetch": time.time() - 60, "status": "fetched"},
                {"name": "quiet", "versions": 0, "status": "registered"},
                {"name": "sea-ice.v2", "versions": 1, "last_fetch": time.time() - 3600}]


class Stack:
    def __init__(self, read_token: Optional[bool] = None) -> None:
        self.bus = magnet.connect(f"memory://feeds-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
        self.notification = Notification("notification", self.bus, node="n")
        token_line = "" if read_token is None else f"security: {{read_token: {str(read_token).lower()}}}\n"
        config = parse("http: {web_port: 0, metrics_datasets: 1}\ncomponents: {web: }\n" + token_line,
                       "feeds.yaml", environ={})
        self.web = Web.from_config("web", self.bus, config, node="n", token=TOKEN,
                                   metrics=renderer_for(self.bus, config))
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.bus.serve("controller", FakeController({"sst", "sea-ice.v2", "quiet"}))
        for component in (self.notification, self.web):
            yield component.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for component in (self.web, self.notification):
            yield component.stopService()
        yield self.bus.stopService()
        yield self.pool.closeCachedConnections()

    @defer.inlineCallbacks
    def get(self, path: str, token: Optional[str] = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = yield treq.get(self.web.url + path, headers=headers, pool=self.pool)
        body = yield response.content()
        return response.code, response.headers.getRawHeaders(b"content-type", [b""])[0], body

    @defer.inlineCallbacks
    def emit(self, kind: str, dataset: Optional[str], **details: Any) -> Any:
        before = len(self.notification.ring)
        yield events.emit(self.bus, kind, dataset, **details)
        waited = 0.0
        while len(self.notification.ring) <= before and waited < 5:
            yield task.deferLater(reactor, 0.01, lambda: None)
            waited += 0.01


@pytest_twisted.async_yield_fixture
async def stack() -> Any:
    s = Stack()
    await s.start()
    yield s
    await s.stop()


def error(body: bytes) -> str:
    answer = json.loads(body)
    assert set(answer) == {"error"} and answer["error"]["message"]
    return answer["error"]["type"]


@pytest_twisted.inlineCallbacks
def test_a_dataset_feed_read_by_feedparser(stack: Stack) -> Any:
    yield stack.emit("registered", "sst", url="https://up.example/sst.nc")
    yield stack.emit("fetched", "other", bytes=10)
    yield stack.emit("saved", "sst", version=2, versions=2, changes=CHANGES)
    yield stack.emit("failed", "sst", reason="upstream said \x00\x07 no")  # XML cannot carry these
    yield stack.emit("saved", "sea-ice.v2", version=1, versions=1)
    code, content_type, body = yield stack.get("/feeds/datasets/sst.atom")
    assert code == 200 and content_type.startswith(b"application/atom+xml"), body[:300]
    feed = feedparser.parse(body)
    assert not feed.bozo, feed.bozo_exception
    assert feed.version == "atom10" and feed.feed.title == "ooidx dataset sst"
    assert feed.feed.id == "urn:ooidx:feed:dataset:sst"
    titles = [e.title for e in feed.entries]
    assert titles == ["failed sst", "saved sst: " + CHANGES["text"], "registered sst"]  # newest first, this one only
    saved = feed.entries[1]
    assert "changes:" in saved.summary and "variable added: salinity" in saved.summary
    assert "2024-01-03T00:00:00" in saved.summary and "[3, 4]" in saved.summary
    assert json.loads(saved.content[0].value)["changes"] == CHANGES
    assert saved.id.startswith("urn:sha256:") and saved.updated_parsed
    assert "\ufffd" in feed.entries[0].summary
    # the same events are the same entries when polled again
    code, _, again = yield stack.get("/feeds/datasets/sst.atom")
    assert [e.id for e in feedparser.parse(again).entries] == [e.id for e in feed.entries]
    # a dotted name is itself, not a regex
    code, _, body = yield stack.get("/feeds/datasets/sea-ice.v2.atom")
    assert [e.title for e in feedparser.parse(body).entries] == ["saved sea-ice.v2"]
    # a registered dataset without events: an empty feed
    code, _, body = yield stack.get("/feeds/datasets/quiet.atom")
    assert code == 200 and feedparser.parse(body).entries == []
    # limit
    code, _, body = yield stack.get("/feeds/datasets/sst.atom?limit=1")
    assert [e.title for e in feedparser.parse(body).entries] == ["failed sst"]


@pytest_twisted.inlineCallbacks
def test_an_events_feed_by_regex(stack: Stack) -> Any:
    yield stack.emit("saved", "sst", version=2, changes=CHANGES)
    yield stack.emit("fetched", "sst")
    yield stack.emit("saved", "chl", version=1)
    code, _, body = yield stack.get("/feeds/events.atom?regex=" + "%5Eevent%5C.saved%5C.")
    assert code == 200, body
    feed = feedparser.parse(body)
    assert not feed.bozo and [e.title.split(":")[0] for e in feed.entries] == ["saved chl", "saved sst"]
    assert "salinity" in feed.entries[1].summary
    code, _, body = yield stack.get("/feeds/events.atom")
    assert len(feedparser.parse(body).entries) == 3


@pytest_twisted.inlineCallbacks
def test_bad_feed_requests_are_a_clear_4xx(stack: Stack) -> Any:
    for path, status, kind in (
            ("/feeds/events.atom?regex=(", 400, "InvalidRegex"),
            ("/feeds/events.atom?regex=" + "a" * 1025, 400, "InvalidRegex"),
            ("/feeds/events.atom?regex=%FF", 400, "InvalidRegex"),
            ("/feeds/events.atom?regex=a&regex=b", 400, "InvalidRegex"),
            ("/feeds/events.atom?limit=0", 400, "BadRequest"),
            ("/feeds/events.atom?limit=abc", 400, "BadRequest"),
            ("/feeds/events.atom?since=1", 400, "BadRequest"),
            ("/feeds/datasets/..atom", 400, "InvalidName"),
            ("/feeds/datasets/%2e%2e%2fetc.atom", 404, "NotFound"),
            ("/feeds/datasets/" + "x" * 80 + ".atom", 400, "InvalidName"),
            ("/feeds/datasets/s%20st.atom", 400, "InvalidName"),
            ("/feeds/datasets/sst.rss", 404, "NotFound"),
            ("/feeds/datasets/nope.atom", 404, "UnknownDataset"),
            ("/feeds/nothing", 404, "NotFound")):
        code, content_type, body = yield stack.get(path)
        assert code == status and content_type.startswith(b"application/json"), (path, code, body[:200])
        assert error(body) == kind, (path, body)
    response = yield treq.post(stack.web.url + "/feeds/events.atom", pool=stack.pool)
    assert response.code == 405
    yield response.content()


@pytest_twisted.inlineCallbacks
def test_feeds_follow_read_token() -> Any:
    s = Stack(read_token=True)
    yield s.start()
    try:
        yield s.emit("saved", "sst", version=1)
        for path in ("/feeds/events.atom", "/feeds/datasets/sst.atom"):
            code, _, body = yield s.get(path)
            assert code == 401 and error(body) == "Unauthorized"
            code, _, body = yield s.get(path, token="wrong-token-" + "x" * 20)
            assert code == 401
            code, _, body = yield s.get(path, token=TOKEN)
            assert code == 200 and feedparser.parse(body).entries
    finally:
        yield s.stop()


def test_summary_without_changes_and_with_odd_ones() -> None:
    from ooidx.web.feeds import summary_of
    assert summary_of({"kind": "fetched", "dataset": "sst", "time": time.time()}) == "fetched sst"
    text = summary_of({"kind": "saved", "dataset": "sst", "changes": "x" * 10_000})
    assert len(text) <= 4000
    assert "- a" in summary_of({"kind": "saved", "dataset": "sst", "changes": ["a", {"b": 1}]})


@pytest_twisted.inlineCallbacks
def test_metrics_per_dataset_on_the_web_port(stack: Stack) -> Any:
    from prometheus_client.parser import text_string_to_metric_families
    code, content_type, body = yield stack.get("/metrics")
    assert code == 200 and content_type.startswith(b"text/plain"), body[:200]
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    # metrics_datasets: 1 -> the most requested by name, the rest under "other"
    assert got[("ooidx_dataset_requests_total", (("dataset", "sst"),))] == 7
    assert got[("ooidx_dataset_bytes_total", (("dataset", "sst"),))] == 700
    assert got[("ooidx_dataset_hits_total", (("dataset", "sst"),))] == 5
    assert got[("ooidx_dataset_misses_total", (("dataset", "other"),))] == 2
    assert 55 <= got[("ooidx_dataset_age_seconds", (("dataset", "sst"),))] < 120
    assert got[("ooidx_dataset_age_seconds", (("dataset", "other"),))] >= 3600
    assert got[("ooidx_dataset_metrics_up", ())] == 1
    assert not [k for k in got if ("dataset", "quiet") in k[1] or ("dataset", "sea-ice.v2") in k[1]]
