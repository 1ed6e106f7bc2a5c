"""The management page's JSON API (ooidx.web.page) through the web edge's own site, no socket.

The components it reaches are stand-ins served on a memory:// bus on a Clock:
a controller keeping datasets in a dict, pub_sub, user_pub_sub,
user_notification and notification.api. Every route, every refusal in words,
what reading needs (the token or not), and how a component that is not
running, too slow or broken is told. The loopback version with the real
controller stays in tests/ooidx/test_webpage.py.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from twisted.internet import defer

import magnet
from magnet import operation

from ooidx.errors import Forbidden, UnknownDataset, UpstreamError
from ooidx.web import page
from ooidx.web.page import STATIC_FILES, ManagementPage, check_refresh

from tests.fast.core.support import FastCase, cases, expand
from tests.fast.web.edge_support import TOKEN, Edge
from tests.support.doubles import FakeNotificationApi, PubSubListing

BASE = "http://data.example.org/opendap/sst.nc"


class FakeController:
    def __init__(self) -> None:
        self.datasets: Dict[str, Dict[str, Any]] = {}
        self.refreshed: List[str] = []

    @operation
    def list(self) -> List[Dict[str, Any]]:
        return sorted(self.datasets.values(), key=lambda d: d["name"])

    @operation
    def get(self, name: str) -> Dict[str, Any]:
        if name not in self.datasets:
            raise UnknownDataset(f"no dataset {name!r} is registered")
        return self.datasets[name]

    @operation
    def register(self, name: str, url: str, refresh: Optional[float] = None, **flags: Any) -> Dict[str, Any]:
        if "127.0.0.1" in url:
            raise Forbidden(f"{url} is a private address")
        if "unreachable" in url:
            raise UpstreamError(f"{url}.dds: connection refused")
        self.flags = flags
        record = {"name": name, "url": url, "refresh": refresh, "status": "registered"}
        self.datasets[name] = record
        return record

    @operation
    def purge(self, name: str) -> Dict[str, Any]:
        record = self.get(name)
        del self.datasets[name]
        return dict(record, status="purged")

    @operation
    def get_dataset(self, name: str) -> Dict[str, Any]:
        self.get(name)
        self.refreshed.append(name)
        return {"name": name, "queued": True}

    @operation
    def get_stats(self) -> Dict[str, Any]:
        return {"requests": 3, "hits": 1, "since": 1.0}


class FakePeople:
    def __init__(self, kind: str, rows: List[Any]) -> None:
        self.kind = kind
        self.rows = rows

    @operation
    def list(self, person: Optional[str] = None) -> List[Any]:
        if self.rows == ["boom"]:
            raise ValueError("the store is broken")
        return self.rows


ANN = {"id": "0123456789ab", "person": "ann", "kind": "datasets", "regex": "^dataset\\.sst$", "webhook": None,
       "queue": "user.ann.0123456789ab", "max_length": 10, "created": 2.0}
BOB = {"id": "ba9876543210", "person": "bob", "kind": "events", "regex": "^event\\.", "webhook": "https://h/x",
       "queue": "user.bob.ba9876543210", "max_length": 5, "created": 1.0, "regex_program": 12}


class Case(FastCase):
    def edge(self, *, read_token: Optional[bool] = None, interface: str = "127.0.0.1",
             served: Optional[Dict[str, Any]] = None, **options: Any) -> Edge:
        edge = Edge(self, interface=interface, read_token=read_token, **options)
        self.controller = FakeController()
        all_served = {"controller": self.controller}
        all_served.update(served or {})
        return edge.start(served=all_served)

    def serve(self, edge: Edge, address: str, service: Any) -> None:
        @defer.inlineCallbacks
        def go() -> Any:
            yield edge.bus.declare_worker_queue(address)
            yield edge.bus.serve(address, service)
        edge.wait(go())


# --------------------------------------------------------------------------- #
# the page itself


@expand
class PageFilesTests(Case):
    def test_the_page_and_its_files(self) -> None:
        edge = self.edge()
        for path, name in [("/", "index.html"), ("/index.html", "index.html"), ("/static/app.js", "app.js"),
                           ("/static/style.css", "style.css"), ("/static/favicon.svg", "favicon.svg"),
                           ("/static/charts.js", "charts.js")]:
            r = edge.request("GET", path, token=None)
            self.assertEqual(r.status, 200, path)
            self.assertEqual(r.header("Content-Type"), STATIC_FILES[name].decode())
            self.assertIn("default-src 'none'", r.header("Content-Security-Policy"))
            self.assertEqual(r.header("X-Frame-Options"), "DENY")
            self.assertEqual(r.header("Referrer-Policy"), "no-referrer")
            self.assertGreater(len(r.body), 0)
        self.assertIn(b"<html", edge.request("GET", "/").body.lower())

    def test_head_of_the_page(self) -> None:
        edge = self.edge()
        r = edge.request("HEAD", "/static/app.js")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")

    @cases("path", ["/static/", "/static/nope.js", "/static/../app.py", "/static/%2e%2e/app.py", "/index.htm",
                    "/api/datasets/", "/api/datasets/sst/", "/api/datasets/sst/refresh/x", "/api/datasets//refresh",
                    "/api/datasets/sst/purge"])
    def test_nothing_else_is_served(self, path: str) -> None:
        edge = self.edge()
        r = edge.request("GET", path)
        self.assertEqual((r.status, r.error()[0]), (404, "NotFound"))

    def test_files_may_be_given(self) -> None:
        files = {name: name.encode() for name in STATIC_FILES}
        p = ManagementPage(None, check_operator=lambda r: None, arguments=lambda r: {}, max_body=10, files=files)
        self.assertEqual(p.render_index(None).body, b"index.html")


# --------------------------------------------------------------------------- #
# datasets


@expand
class DatasetTests(Case):
    def test_register_list_get_refresh_purge(self) -> None:
        edge = self.edge()
        self.assertEqual(edge.request("GET", "/api/datasets", token=None).json(), {"datasets": []})
        r = edge.request("POST", "/api/datasets", {"name": "sst", "url": " " + BASE + " ", "refresh": 3600})
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.json()["dataset"], {"name": "sst", "url": BASE, "refresh": 3600.0, "status": "registered"})
        self.assertEqual([d["name"] for d in edge.request("GET", "/api/datasets").json()["datasets"]], ["sst"])
        self.assertEqual(edge.request("GET", "/api/datasets/sst", token=None).json()["dataset"]["url"], BASE)
        r = edge.request("POST", "/api/datasets/sst/refresh")
        self.assertEqual((r.status, r.json()), (202, {"refresh": {"name": "sst", "queued": True}}))
        self.assertEqual(self.controller.refreshed, ["sst"])
        r = edge.request("DELETE", "/api/datasets/sst")
        self.assertEqual((r.status, r.json()["dataset"]["status"]), (200, "purged"))
        self.assertEqual(edge.request("GET", "/api/datasets").json(), {"datasets": []})

    def test_a_dataset_without_refresh(self) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/datasets", {"name": "a.b-c_1", "url": BASE, "refresh": None})
        self.assertEqual((r.status, r.json()["dataset"]["refresh"]), (201, None))

    def test_a_percent_encoded_name_in_the_path(self) -> None:
        edge = self.edge()
        edge.request("POST", "/api/datasets", {"name": "sst", "url": BASE})
        self.assertEqual(edge.request("GET", "/api/datasets/%73st").status, 200)

    @cases("method, path, body", [
        ("POST", "/api/datasets", {"name": "sst", "url": BASE}),
        ("DELETE", "/api/datasets/sst", None),
        ("POST", "/api/datasets/sst/refresh", None),
        ("GET", "/api/user_subscriptions", None),
    ], ids=["register", "purge", "refresh", "people"])
    @cases("token", [None, "wrong-token-but-long-enough"], ids=["none", "wrong"])
    def test_changes_need_the_token(self, method: str, path: str, body: Any, token: Any) -> None:
        edge = self.edge()
        r = edge.request(method, path, body, token=token)
        self.assertEqual(r.status, 401)
        kind, message = r.error()
        self.assertEqual(kind, "Unauthorized")
        self.assertIn("token", message)
        self.assertEqual(self.controller.datasets, {})

    @cases("body, kind, words", [
        ({"name": "bad name", "url": BASE}, "InvalidName", "is not a dataset name"),
        ({"name": "../etc", "url": BASE}, "InvalidName", "is not a dataset name"),
        ({"name": "", "url": BASE}, "InvalidName", "needs a name"),
        ({"name": "x" * 80, "url": BASE}, "InvalidName", "..."),
        ({"name": 7, "url": BASE}, "InvalidName", "needs a name"),
        ({"url": BASE}, "InvalidName", "needs a name"),
        ({"name": "sst"}, "InvalidURL", "needs its base URL"),
        ({"name": "sst", "url": "   "}, "InvalidURL", "needs its base URL"),
        ({"name": "sst", "url": "ftp://data.example.org/sst.nc"}, "InvalidURL", "http:// or https://"),
        ({"name": "sst", "url": "file:///etc/passwd"}, "InvalidURL", "http:// or https://"),
        ({"name": "sst", "url": "javascript:alert(1)"}, "InvalidURL", "http:// or https://"),
        ({"name": "sst", "url": "http:///nohost"}, "InvalidURL", "no host"),
        ({"name": "sst", "url": "http://u:p@data.example.org/sst.nc"}, "InvalidURL", "user name or password"),
        ({"name": "sst", "url": BASE + ".dds?time"}, "InvalidURL", "without a query"),
        ({"name": "sst", "url": BASE + "#x"}, "InvalidURL", "without a query"),
        ({"name": "sst", "url": BASE + "?"}, "InvalidURL", "without a query"),
        ({"name": "sst", "url": "http://data.example.org/a b"}, "InvalidURL", "spaces"),
        ({"name": "sst", "url": "http://data.example.org/\x7f"}, "InvalidURL", "control characters"),
        ({"name": "sst", "url": "http://data.example.org:99999/"}, "InvalidURL", "not a URL"),
        ({"name": "sst", "url": "http://[::1/"}, "InvalidURL", "not a URL"),
        ({"name": "sst", "url": "http://x.org/" + "a" * 3000}, "InvalidURL", "longer than"),
        ({"name": "sst", "url": "http://127.0.0.1:9/sst.nc"}, "Forbidden", "private address"),
        ({"name": "sst", "url": BASE, "refresh": 0}, "BadRequest", "refresh is a number of seconds"),
        ({"name": "sst", "url": BASE, "refresh": 10 ** 9}, "BadRequest", "366 days"),
        ({"name": "sst", "url": BASE, "refresh": "hourly"}, "BadRequest", "refresh is a number of seconds"),
        ({"name": "sst", "url": BASE, "refresh": True}, "BadRequest", "refresh is a number of seconds"),
        ({"name": "sst", "url": BASE, "colour": "red"}, "BadRequest", "unknown field(s): colour"),
        ({"name": "sst", "url": BASE, "check": "no"}, "BadRequest", "check is true or false"),
        ({"name": "sst", "url": BASE, "replace": 1}, "BadRequest", "replace is true or false"),
        ({"name": "sst", "url": BASE, "expect_every": 0}, "BadRequest", "expect_every is a number of seconds"),
        ({}, "BadRequest", "JSON object"),
        ([1, 2], "BadRequest", "JSON object"),
    ])
    def test_register_refuses_bad_input_in_words(self, body: Any, kind: str, words: str) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/datasets", body)
        self.assertTrue(400 <= r.status < 500, r)
        got_kind, message = r.error()
        self.assertEqual(got_kind, kind, r)
        self.assertIn(words, message)
        self.assertEqual(self.controller.datasets, {})

    def test_register_passes_check_replace_and_expect_every(self) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/datasets", {"name": "sst", "url": BASE, "check": False, "replace": True,
                                                   "expect_every": 3600})
        self.assertEqual(r.status, 201, r)
        self.assertEqual(self.controller.flags, {"check": False, "replace": True, "expect_every": 3600.0})
        r = edge.request("POST", "/api/datasets", {"name": "gone", "url": "http://unreachable.example.org/x"})
        self.assertEqual((r.status, r.error()[0]), (502, "UpstreamError"))
        self.assertIn("connection refused", r.error()[1])

    def test_register_bad_json_is_400(self) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/datasets", b"{not json")
        self.assertEqual(r.status, 400)
        self.assertIn("not valid JSON", r.error()[1])

    def test_register_too_large_is_413(self) -> None:
        edge = self.edge(max_body=200)
        r = edge.request("POST", "/api/datasets", {"name": "sst", "url": BASE + "/" + "a" * 300})
        self.assertEqual((r.status, r.error()[0]), (413, "PayloadTooLarge"))

    @cases("path", ["/api/datasets/bad%20name", "/api/datasets/%2e%2e", "/api/datasets/-x", "/api/datasets/%ff",
                    "/api/datasets/%ff/refresh"])
    def test_bad_names_in_paths_are_400(self, path: str) -> None:
        edge = self.edge()
        method = "POST" if path.endswith("refresh") else "GET"
        r = edge.request(method, path)
        self.assertEqual((r.status, r.error()[0]), (400, "InvalidName"))

    @cases("method, path", [("GET", "/api/datasets/nothere"), ("DELETE", "/api/datasets/nothere"),
                            ("POST", "/api/datasets/nothere/refresh")])
    def test_an_unknown_dataset_is_404(self, method: str, path: str) -> None:
        edge = self.edge()
        r = edge.request(method, path)
        self.assertEqual(r.status, 404)
        self.assertEqual(r.error(), ("UnknownDataset", "no dataset 'nothere' is registered"))

    @cases("method, path, allow", [
        ("PUT", "/api/datasets", "GET, POST"),
        ("POST", "/api/datasets/sst", "DELETE, GET"),
        ("GET", "/api/datasets/sst/refresh", "POST"),
        ("POST", "/api/stats", "GET"),
        ("DELETE", "/api/events", "GET"),
        ("POST", "/api/pub_sub/subscriptions", "GET"),
        ("POST", "/api/user_subscriptions", "GET"),
        ("POST", "/", "GET, HEAD"),
        ("DELETE", "/static/app.js", "GET, HEAD"),
    ])
    def test_a_wrong_method_is_405(self, method: str, path: str, allow: str) -> None:
        edge = self.edge()
        r = edge.request(method, path)
        self.assertEqual(r.status, 405)
        self.assertEqual(r.headers["allow"], [allow])
        self.assertEqual(r.error()[0], "MethodNotAllowed")


# --------------------------------------------------------------------------- #
# statistics, subscriptions, events


@expand
class StatsAndEventsTests(Case):
    def test_stats_carry_the_servers_time(self) -> None:
        edge = self.edge()
        self.patch(page.time, "time", lambda: 1234.5)
        r = edge.request("GET", "/api/stats")
        self.assertEqual((r.status, r.json()), (200, {"requests": 3, "hits": 1, "since": 1.0, "time": 1234.5}))

    def test_stats_that_are_not_a_mapping_are_just_the_time(self) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.succeed(["odd"]))
        self.patch(page.time, "time", lambda: 7.0)
        self.assertEqual(edge.request("GET", "/api/stats").json(), {"time": 7.0})

    @cases("path, words", [
        # pub_sub's queue is declared (the component table) but nobody consumes it: a short wait
        ("/api/pub_sub/subscriptions", "Subscriptions (pub_sub) are not available on this node: pub_sub did not "
                                       "answer within 3 seconds."),
        # notification.api is not declared at all: unroutable at once
        ("/api/events", "Recent events are not available on this node: no notification is running."),
    ], ids=["pub_sub", "events"])
    def test_a_service_not_running_is_unavailable_in_words(self, path: str, words: str) -> None:
        edge = self.edge()
        r = edge.request("GET", path)
        self.assertEqual(r.status, 503)
        self.assertEqual(r.error(), ("Unavailable", words))

    def test_people_unavailable(self) -> None:
        edge = self.edge()
        r = edge.request("GET", "/api/user_subscriptions")
        self.assertEqual(r.status, 503)
        self.assertIn("People's subscriptions are not available on this node", r.error()[1])

    def test_subscriptions_when_served(self) -> None:
        edge = self.edge(served={"pub_sub": PubSubListing(), "user_pub_sub": FakePeople("datasets", [ANN])})
        r = edge.request("GET", "/api/pub_sub/subscriptions")
        self.assertEqual((r.status, r.json()["subscriptions"][0]["name"]), (200, "persister"))
        r = edge.request("GET", "/api/user_subscriptions")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["unavailable"], ["user_notification"])
        self.assertEqual(r.json()["subscriptions"], [{"person": "ann", "id": "0123456789ab", "kind": "datasets",
                                                      "regex": "^dataset\\.sst$", "webhook": None,
                                                      "max_length": 10, "created": 2.0}])

    def test_both_kinds_merged_in_order_of_person(self) -> None:
        edge = self.edge(served={"user_pub_sub": FakePeople("datasets", [ANN, "not a record"]),
                                 "user_notification": FakePeople("events", [BOB])})
        r = edge.request("GET", "/api/user_subscriptions")
        self.assertEqual([s["person"] for s in r.json()["subscriptions"]], ["ann", "bob"])
        self.assertEqual(r.json()["unavailable"], [])
        self.assertNotIn("regex_program", r.json()["subscriptions"][1])
        self.assertNotIn("queue", r.json()["subscriptions"][1])

    def test_a_broken_people_component_is_its_error(self) -> None:
        edge = self.edge(served={"user_pub_sub": FakePeople("datasets", ["boom"]),
                                 "user_notification": FakePeople("events", [BOB])})
        r = edge.request("GET", "/api/user_subscriptions")
        self.assertEqual(r.status, 400)
        self.assertEqual(r.error(), ("ValueError", "the store is broken"))

    def test_peoples_pub_sub_subscriptions_only_with_the_token(self) -> None:
        """The attack: anyone reads GET /api/pub_sub/subscriptions and learns every
        person's name and regex (their pub_sub subscriptions are user.PERSON.ID)."""
        edge = self.edge(served={"pub_sub": PubSubListing()})
        r = edge.request("GET", "/api/pub_sub/subscriptions", token=None)
        text = json.dumps(r.json())
        self.assertEqual(r.status, 200)
        self.assertNotIn("ann", text)
        self.assertNotIn("secret-project", text)
        self.assertEqual([s["name"] for s in r.json()["subscriptions"]], ["persister"])
        self.assertEqual(r.json()["people"], 1)
        r = edge.request("GET", "/api/pub_sub/subscriptions")
        self.assertEqual([s["name"] for s in r.json()["subscriptions"]], ["persister", "user.ann.0123456789ab"])
        self.assertEqual(edge.request("GET", "/api/pub_sub/subscriptions", token="wrong-" + TOKEN).status, 401)

    def test_events(self) -> None:
        api = FakeNotificationApi()
        edge = self.edge()
        self.serve(edge, "notification.api", api)
        r = edge.request("GET", "/api/events")
        self.assertEqual((r.status, r.json()["events"][0]["kind"]), (200, "registered"))
        self.assertEqual(api.asked[-1], {"regex": None, "limit": 100})
        r = edge.request("GET", "/api/events?limit=5&regex=%5Eevent%5C.saved")
        self.assertEqual(r.status, 200)
        self.assertEqual(api.asked[-1], {"regex": "^event\\.saved", "limit": 5})
        self.assertEqual(edge.request("GET", "/api/events?regex=").status, 200)
        self.assertEqual(api.asked[-1], {"regex": None, "limit": 100})
        r = edge.request("GET", "/api/events?regex=(")
        self.assertEqual((r.status, r.error()), (400, ("InvalidRegex", "missing ): (")))

    @cases("query, words", [
        ("limit=0", "limit is a whole number"), ("limit=1001", "limit is a whole number"),
        ("limit=abc", "limit is a whole number"), ("limit=-1", "limit is a whole number"),
        ("colour=red", "unknown query parameter(s): colour"), ("regex=" + "a" * 1025, "at most 1024"),
        ("regex=a%00", "without NUL"), ("regex=%ff", "not UTF-8"),
    ])
    def test_events_refuse_bad_queries(self, query: str, words: str) -> None:
        edge = self.edge()
        r = edge.request("GET", "/api/events?" + query)
        self.assertEqual(r.status, 400)
        self.assertIn(words, r.error()[1])


# --------------------------------------------------------------------------- #
# how the components' failures are told


@expand
class FailureTests(Case):
    @cases("service, error, status, kind", [
        ("controller", magnet.Unroutable("nobody"), 503, "Unavailable"),
        ("controller", magnet.UnknownOperation("UnknownOperation", "no such op"), 502, "UnknownOperation"),
        ("controller", magnet.Timeout("slow"), 504, "Timeout"),
        ("controller", magnet.BadArguments("BadArguments", "list() takes nothing"), 400, "BadRequest"),
        ("controller", magnet.RemoteError("UpstreamTimeout", "slow upstream"), 504, "UpstreamTimeout"),
        ("controller", magnet.RemoteError("TypeError", "bad type"), 400, "TypeError"),
        ("controller", magnet.RemoteError("KeyError", "k"), 502, "KeyError"),
        ("controller", magnet.ConnectionLost("gone"), 503, "ConnectionLost"),
        ("controller", magnet.NotConnected("never"), 503, "NotConnected"),
        ("controller", defer.CancelledError(), 503, "Cancelled"),
        ("pub_sub", magnet.UnknownOperation("UnknownOperation", "old pub_sub"), 503, "Unavailable"),
        ("pub_sub", magnet.Timeout("slow"), 503, "Unavailable"),
    ])
    def test_failures_in_words(self, service: str, error: Exception, status: int, kind: str) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.fail(error))
        path = "/api/datasets" if service == "controller" else "/api/pub_sub/subscriptions"
        r = edge.request("GET", path)
        self.assertEqual((r.status, r.error()[0]), (status, kind))

    def test_a_bug_is_500_without_its_words(self) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.fail(RuntimeError("secret internals")))
        r = edge.request("GET", "/api/datasets")
        self.assertEqual(r.status, 500)
        self.assertEqual(r.error(), ("InternalError", "RuntimeError while calling controller.list"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_an_answer_that_is_not_json_is_502(self) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.succeed(object()))
        r = edge.request("GET", "/api/datasets/sst")
        self.assertEqual((r.status, r.error()[0]), (502, "BadReply"))

    def test_people_both_timing_out_is_503(self) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.fail(magnet.Timeout("slow")))
        r = edge.request("GET", "/api/user_subscriptions")
        self.assertEqual(r.status, 503)
        self.assertIn("neither user_pub_sub nor user_notification answered", r.error()[1])

    def test_the_controller_waits_longer_than_the_optional_services(self) -> None:
        edge = self.edge()
        seen: List[Any] = []
        self.patch(edge.bus, "call_with", lambda s, o, k, timeout=None: (seen.append((s, timeout)),
                                                                         defer.succeed([]))[1])
        edge.request("GET", "/api/datasets")
        edge.request("GET", "/api/events")
        self.assertEqual(seen, [("controller", page.CALL_TIMEOUT), ("notification.api", page.OPTIONAL_TIMEOUT)])


# --------------------------------------------------------------------------- #
# reading behind the token


@expand
class ReadTokenTests(Case):
    @cases("interface, read_token, needed", [("127.0.0.1", None, False), ("0.0.0.0", None, True),
                                             ("127.0.0.1", True, True), ("0.0.0.0", False, False)])
    def test_who_reads(self, interface: str, read_token: Optional[bool], needed: bool) -> None:
        edge = self.edge(interface=interface, read_token=read_token)
        self.serve(edge, "notification.api", FakeNotificationApi())
        edge.request("POST", "/api/datasets", {"name": "sst", "url": BASE})
        for path in ("/api/datasets", "/api/stats", "/api/events", "/api/datasets/sst"):
            r = edge.request("GET", path, token=None)
            self.assertEqual(r.status, 401 if needed else 200, path)
            if needed:
                self.assertEqual(r.error()[0], "Unauthorized")
            self.assertEqual(edge.request("GET", path).status, 200, path)
        self.assertEqual(edge.request("GET", "/", token=None).status, 200)  # the page is no secret

    def test_check_refresh(self) -> None:
        self.assertIsNone(check_refresh(None))
        self.assertEqual(check_refresh(60), 60.0)
