"""The management page's API over real HTTP on loopback: a memory:// bus with
the topology declared, a real attribute store (SQLite in tmp_path) and
controller, fakes for the fetcher, pub_sub, notification.api and the people's
components where a test wants them, and the web edge on port 0."""
from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool

import magnet
from magnet import operation

from ooidx.attribute_store import AttributeStore
from ooidx.node.bootstrap import declare_topology
from ooidx.config import parse
from ooidx.datapath.controller import Controller
from ooidx.web.app import Web
from ooidx.web.page import STATIC_FILES

from tests.support.doubles import FakeNotificationApi, PubSubListing

TOKEN = "webpage-test-token-" + "q" * 16
BASE = "http://data.example.org/opendap/sst.nc"


class FakeFetcher:
    def __init__(self) -> None:
        self.datasets: List[Dict[str, Any]] = []

    @operation
    def fetch_dataset(self, **kwargs: Any) -> None:
        self.datasets.append(kwargs)


class FakeUserPubSub:
    @operation
    def list(self, person: Optional[str] = None) -> List[Dict[str, Any]]:
        return [{"id": "0123456789ab", "person": "ann", "kind": "datasets", "regex": "^dataset\\.sst$",
                 "webhook": None, "queue": "user.ann.0123456789ab", "max_length": 10, "created": 2.0}]


class Stack:
    def __init__(self, db: str, security: str = "") -> None:
        self.bus = magnet.connect(f"memory://webpage-{uuid.uuid4().hex}", reactor, node="n1", rpc_timeout=5)
        config = parse("node: n1\n" + security, "dx.yaml")
        self.store = AttributeStore("attribute_store", self.bus, node="n1", url=db, clock=reactor)
        self.controller = Controller.from_config("controller", self.bus, config, node="n1", clock=reactor)
        self.fetcher = FakeFetcher()
        self.web = Web.from_config("web", self.bus, config, node="n1", port=0, interface="127.0.0.1", token=TOKEN)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.served: List[Any] = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.store.start()
        yield self.controller.start()
        self.served.append((yield self.bus.serve("fetcher", self.fetcher)))
        yield self.web.start()

    @defer.inlineCallbacks
    def serve(self, address: str, service: Any) -> Any:
        yield self.bus.declare_worker_queue(address)
        self.served.append((yield self.bus.serve(address, service)))

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.web.stopService()
        for s in self.served:
            yield s.cancel()
        yield self.controller.stopService()
        yield self.store.stopService()
        yield self.bus.stopService()
        yield self.pool.closeCachedConnections()

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, *, token: Optional[str] = None,
                raw: bool = False) -> Any:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        response = yield treq.request(method, self.web.url + path, data=body, headers=headers, pool=self.pool)
        content = yield response.content()
        if raw:
            return response.code, response.headers, content
        assert response.headers.getRawHeaders("Content-Type") == ["application/json"], content
        return response.code, json.loads(content)


@pytest_twisted.async_yield_fixture
async def stack(tmp_path: Any) -> Any:
    s = Stack(str(tmp_path / "attributes.sqlite3"))
    await s.start()
    yield s
    await s.stop()


def error_of(answer: Any) -> tuple:
    assert set(answer) == {"error"}, answer
    return answer["error"]["type"], answer["error"]["message"]


# --------------------------------------------------------------------------- #
# the page itself


@pytest_twisted.ensureDeferred
async def test_the_page_and_its_files(stack: Stack) -> None:
    code, headers, body = await stack.request("GET", "/", raw=True)
    assert code == 200
    assert headers.getRawHeaders("Content-Type") == ["text/html; charset=utf-8"]
    assert b"<title>ooidx" in body and b'src="/static/app.js"' in body
    csp = headers.getRawHeaders("Content-Security-Policy")[0]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers.getRawHeaders("X-Frame-Options") == ["DENY"]
    for name, kind in STATIC_FILES.items():
        if name == "index.html":
            continue
        code, headers, body = await stack.request("GET", f"/static/{name}", raw=True)
        assert code == 200 and body, name
        assert headers.getRawHeaders("Content-Type") == [kind.decode()]
    code, headers, body = await stack.request("HEAD", "/static/app.js", raw=True)
    assert code == 200 and body == b""


@pytest.mark.parametrize("path", ["/static/", "/static/nope.js", "/static/../webpage.py", "/static/%2e%2e/web.py",
                                  "/static/app.js/x", "/index.htm", "/api/datasets/sst/x", "/api/datasets//refresh"])
@pytest_twisted.ensureDeferred
async def test_nothing_else_is_served(stack: Stack, path: str) -> None:
    code, answer = await stack.request("GET", path)
    assert code == 404 and error_of(answer)[0] == "NotFound"


# --------------------------------------------------------------------------- #
# datasets


@pytest_twisted.ensureDeferred
async def test_register_list_get_refresh_purge(stack: Stack) -> None:
    assert await stack.request("GET", "/api/datasets") == (200, {"datasets": []})
    code, answer = await stack.request("POST", "/api/datasets", {"name": "sst", "url": BASE + ".dds",
                                                                 "refresh": 3600, "check": False}, token=TOKEN)
    assert code == 201, answer
    record = answer["dataset"]
    assert record["name"] == "sst" and record["url"] == BASE and record["status"] == "registered"
    assert record["refresh"] == 3600.0
    code, answer = await stack.request("GET", "/api/datasets")
    assert code == 200 and [d["name"] for d in answer["datasets"]] == ["sst"]
    code, answer = await stack.request("GET", "/api/datasets/sst")
    assert code == 200 and answer["dataset"]["url"] == BASE

    code, answer = await stack.request("POST", "/api/datasets/sst/refresh", token=TOKEN)
    assert code == 202, answer
    assert answer["refresh"] == {"name": "sst", "url": BASE, "address": "pub_sub"}
    for _ in range(50):
        if stack.fetcher.datasets:
            break
        await _later(0.02)
    assert stack.fetcher.datasets[0]["name"] == "sst"

    code, answer = await stack.request("DELETE", "/api/datasets/sst", token=TOKEN)
    assert code == 200 and answer["dataset"]["status"] == "purged"
    code, answer = await stack.request("DELETE", "/api/datasets/sst", token=TOKEN)
    assert code == 404 and error_of(answer)[0] == "UnknownDataset"
    code, answer = await stack.request("POST", "/api/datasets/sst/refresh", token=TOKEN)
    assert code == 404 and "no dataset 'sst'" in error_of(answer)[1]


def _later(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater
    return deferLater(reactor, seconds, lambda: None)


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/datasets", {"name": "sst", "url": BASE}),
    ("DELETE", "/api/datasets/sst", None),
    ("POST", "/api/datasets/sst/refresh", None),
    ("GET", "/api/user_subscriptions", None),
])
@pytest.mark.parametrize("token", [None, "wrong-token-but-long-enough"])
@pytest_twisted.ensureDeferred
async def test_changes_need_the_token(stack: Stack, method: str, path: str, body: Any, token: Any) -> None:
    code, answer = await stack.request(method, path, body, token=token)
    assert code == 401
    kind, message = error_of(answer)
    assert kind == "Unauthorized" and "token" in message
    assert (await stack.request("GET", "/api/datasets"))[1] == {"datasets": []}


@pytest.mark.parametrize("body, kind, words", [
    ({"name": "bad name", "url": BASE}, "InvalidName", "is not a dataset name"),
    ({"name": "../etc", "url": BASE}, "InvalidName", "is not a dataset name"),
    ({"name": "", "url": BASE}, "InvalidName", "needs a name"),
    ({"name": "x" * 65, "url": BASE}, "InvalidName", "is not a dataset name"),
    ({"name": 7, "url": BASE}, "InvalidName", "needs a name"),
    ({"url": BASE}, "InvalidName", "needs a name"),
    ({"name": "sst"}, "InvalidURL", "needs its base URL"),
    ({"name": "sst", "url": "ftp://data.example.org/sst.nc"}, "InvalidURL", "http:// or https://"),
    ({"name": "sst", "url": "file:///etc/passwd"}, "InvalidURL", "http:// or https://"),
    ({"name": "sst", "url": "javascript:alert(1)"}, "InvalidURL", "http:// or https://"),
    ({"name": "sst", "url": "http:///nohost"}, "InvalidURL", "no host"),
    ({"name": "sst", "url": "http://u:p@data.example.org/sst.nc"}, "InvalidURL", "user name or password"),
    ({"name": "sst", "url": BASE + ".dds?time"}, "InvalidURL", "without a query"),
    ({"name": "sst", "url": "http://data.example.org/a b"}, "InvalidURL", "spaces"),
    ({"name": "sst", "url": "http://data.example.org:99999/"}, "InvalidURL", "not a URL"),
    ({"name": "sst", "url": "http://x.org/" + "a" * 3000}, "InvalidURL", "longer than"),
    ({"name": "sst", "url": "http://127.0.0.1:9/sst.nc"}, "Forbidden", ""),
    ({"name": "sst", "url": BASE, "refresh": 0}, "BadRequest", "refresh is a number of seconds"),
    ({"name": "sst", "url": BASE, "refresh": "hourly"}, "BadRequest", "refresh is a number of seconds"),
    ({"name": "sst", "url": BASE, "refresh": True}, "BadRequest", "refresh is a number of seconds"),
    ({"name": "sst", "url": BASE, "colour": "red"}, "BadRequest", "unknown field(s): colour"),
    ({}, "BadRequest", "JSON object"),
    ([1, 2], "BadRequest", "JSON object"),
])
@pytest_twisted.ensureDeferred
async def test_register_refuses_bad_input_in_words(stack: Stack, body: Any, kind: str, words: str) -> None:
    code, answer = await stack.request("POST", "/api/datasets", body, token=TOKEN)
    assert 400 <= code < 500, answer
    got_kind, message = error_of(answer)
    assert got_kind == kind, answer
    assert words in message
    assert (await stack.request("GET", "/api/datasets"))[1] == {"datasets": []}


@pytest_twisted.ensureDeferred
async def test_register_bad_json_is_400(stack: Stack) -> None:
    code, answer = await stack.request("POST", "/api/datasets", b"{not json", token=TOKEN)
    assert code == 400 and "not valid JSON" in error_of(answer)[1]


@pytest.mark.parametrize("path", ["/api/datasets/bad%20name", "/api/datasets/%2e%2e", "/api/datasets/-x",
                                  "/api/datasets/%ff"])
@pytest_twisted.ensureDeferred
async def test_bad_names_in_paths_are_400(stack: Stack, path: str) -> None:
    code, answer = await stack.request("GET", path)
    assert code == 400 and error_of(answer)[0] == "InvalidName"


@pytest_twisted.ensureDeferred
async def test_unknown_dataset_is_404(stack: Stack) -> None:
    code, answer = await stack.request("GET", "/api/datasets/nothere")
    assert code == 404
    assert error_of(answer) == ("UnknownDataset", "no dataset 'nothere' is registered")


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/api/datasets", "GET, POST"),
    ("POST", "/api/datasets/sst", "DELETE, GET"),
    ("GET", "/api/datasets/sst/refresh", "POST"),
    ("POST", "/api/stats", "GET"),
    ("DELETE", "/api/events", "GET"),
    ("POST", "/", "GET, HEAD"),
])
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405(stack: Stack, method: str, path: str, allow: str) -> None:
    code, headers, content = await stack.request(method, path, raw=True)
    assert code == 405
    assert headers.getRawHeaders("Allow") == [allow]
    assert error_of(json.loads(content))[0] == "MethodNotAllowed"


# --------------------------------------------------------------------------- #
# statistics, subscriptions, events


@pytest_twisted.ensureDeferred
async def test_stats(stack: Stack) -> None:
    await stack.bus.post("controller", "record", dataset="sst", hit=True, bytes=10, status=200)
    for _ in range(50):
        code, stats = await stack.request("GET", "/api/stats")
        if stats.get("hits"):
            break
        await _later(0.02)
    assert code == 200
    assert set(stats) >= {"requests", "hits", "misses", "bytes", "errors", "datasets", "since", "time"}
    assert stats["hits"] == 1 and stats["bytes"] == 10
    assert stats["datasets"]["sst"] == {"requests": 0, "hits": 1, "misses": 0, "bytes": 10}
    assert stats["time"] >= stats["since"]


@pytest.mark.parametrize("path, words", [
    # pub_sub's queue is declared (the component table) but nobody consumes it: a short wait
    ("/api/pub_sub/subscriptions", "Subscriptions (pub_sub) are not available on this node: pub_sub did not "
                                   "answer within 3 seconds."),
    # notification.api is not declared at all: unroutable at once
    ("/api/events", "Recent events are not available on this node: no notification is running."),
])
@pytest_twisted.ensureDeferred
async def test_a_service_not_running_is_unavailable_in_words(stack: Stack, path: str, words: str) -> None:
    code, answer = await stack.request("GET", path)
    assert code == 503
    assert error_of(answer) == ("Unavailable", words)


@pytest_twisted.ensureDeferred
async def test_people_unavailable(stack: Stack) -> None:
    code, answer = await stack.request("GET", "/api/user_subscriptions", token=TOKEN)
    assert code == 503 and "People's subscriptions are not available on this node" in error_of(answer)[1]


@pytest_twisted.ensureDeferred
async def test_subscriptions_when_served(stack: Stack) -> None:
    await stack.serve("pub_sub", PubSubListing())
    await stack.serve("user_pub_sub", FakeUserPubSub())
    code, answer = await stack.request("GET", "/api/pub_sub/subscriptions")
    assert code == 200 and answer["subscriptions"][0]["name"] == "persister"
    code, answer = await stack.request("GET", "/api/user_subscriptions", token=TOKEN)
    assert code == 200, answer
    assert answer["unavailable"] == ["user_notification"]
    assert answer["subscriptions"] == [{"person": "ann", "id": "0123456789ab", "kind": "datasets",
                                        "regex": "^dataset\\.sst$", "webhook": None, "max_length": 10,
                                        "created": 2.0}]


@pytest_twisted.ensureDeferred
async def test_peoples_pub_sub_subscriptions_only_with_the_token(stack: Stack) -> None:
    """The attack: anyone reads GET /api/pub_sub/subscriptions and learns every
    person's name and regex (their pub_sub subscriptions are user.PERSON.ID)."""
    await stack.serve("pub_sub", PubSubListing())
    code, answer = await stack.request("GET", "/api/pub_sub/subscriptions")
    assert code == 200 and "ann" not in json.dumps(answer) and "secret-project" not in json.dumps(answer)
    assert [r["name"] for r in answer["subscriptions"]] == ["persister"] and answer["people"] == 1
    code, answer = await stack.request("GET", "/api/pub_sub/subscriptions", token=TOKEN)
    assert code == 200 and [r["name"] for r in answer["subscriptions"]] == ["persister", "user.ann.0123456789ab"]
    code, answer = await stack.request("GET", "/api/pub_sub/subscriptions", token="wrong-" + TOKEN)
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_events(stack: Stack) -> None:
    api = FakeNotificationApi()
    await stack.serve("notification.api", api)
    code, answer = await stack.request("GET", "/api/events")
    assert code == 200 and answer["events"][0]["kind"] == "registered"
    assert api.asked[-1] == {"regex": None, "limit": 100}
    code, answer = await stack.request("GET", "/api/events?limit=5&regex=%5Eevent%5C.saved")
    assert code == 200
    assert api.asked[-1] == {"regex": "^event\\.saved", "limit": 5}
    code, answer = await stack.request("GET", "/api/events?regex=(")
    assert code == 400 and error_of(answer) == ("InvalidRegex", "missing ): (")


@pytest.mark.parametrize("query, words", [
    ("limit=0", "limit is a whole number"), ("limit=1001", "limit is a whole number"),
    ("limit=abc", "limit is a whole number"), ("limit=-1", "limit is a whole number"),
    ("colour=red", "unknown query parameter(s): colour"), ("regex=" + "a" * 1025, "at most 1024"),
    ("regex=%ff", "not UTF-8"),
])
@pytest_twisted.ensureDeferred
async def test_events_refuse_bad_queries(stack: Stack, query: str, words: str) -> None:
    code, answer = await stack.request("GET", "/api/events?" + query)
    assert code == 400 and words in error_of(answer)[1]


# --------------------------------------------------------------------------- #
# reading behind the token


@pytest_twisted.ensureDeferred
async def test_read_token_from_the_config(tmp_path: Any) -> None:
    s = Stack(str(tmp_path / "attributes.sqlite3"), security="security: {read_token: true}\n")
    await s.start()
    try:
        for path in ("/api/datasets", "/api/stats", "/api/events", "/api/pub_sub/subscriptions",
                     "/api/datasets/sst"):
            code, answer = await s.request("GET", path)
            assert code == 401 and error_of(answer)[0] == "Unauthorized", path
        assert await s.request("GET", "/api/datasets", token=TOKEN) == (200, {"datasets": []})
        code, _, _ = await s.request("GET", "/", raw=True)
        assert code == 200  # the page itself is no secret; it asks for the token
    finally:
        await s.stop()
