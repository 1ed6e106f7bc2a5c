"""The web edge's contract (ooidx.web.app), over HTTP/1.1 bytes to its own site, no socket.

/healthz, /metrics, /api/status, and every status of POST /api/call/SERVICE/OP
(200, 400, 401, 404, 405, 413, 422, 500, 502, 503, 504), on a memory:// bus
on a Clock. The RabbitMQ-free loopback version stays in tests/ooidx/test_web.py.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Tuple

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.logger import LogLevel

import magnet

from ooidx.component import Component
from ooidx.web import app
from ooidx.web.app import Web, callable_services, ping_components

from tests.fast.core.support import FastCase, LogEvents, cases, expand
from tests.fast.web.edge_support import TOKEN, Edge, parse_response, request_bytes
from tests.support.doubles import CallTarget


class Daemon:
    """What the web edge asks of the daemon (health, cluster status)."""

    def __init__(self) -> None:
        self.ok: Any = True
        self.status_calls: List[float] = []
        self.fail = False

    def health(self) -> Any:
        if self.fail:
            raise RuntimeError("health is broken")
        if not isinstance(self.ok, bool):
            return self.ok
        return {"ok": self.ok, "broker": "up" if self.ok else "down",
                "components": {"fetcher": True, "web": {"started": True}, "cache": False}}

    def cluster_status(self, timeout: float = 1.5) -> Any:
        self.status_calls.append(timeout)
        if self.fail:
            return defer.fail(magnet.NotConnected("no broker"))
        return [{"node": "node-a", "pid": 123, "broker": "up",
                 "components": {"fetcher": {"started": True, "instances": 2, "process": "inline"}}}]


def metrics_of(seen: List[Mapping[str, bool]]) -> Any:
    def render(up: Mapping[str, bool]) -> Tuple[bytes, bytes]:
        seen.append(dict(up))
        lines = "".join(f'ooidx_up{{component="{k}"}} {int(v)}\n' for k, v in sorted(up.items()))
        return lines.encode(), b"text/plain; version=0.0.4; charset=utf-8"
    return render


class Case(FastCase):
    def edge(self, **options: Any) -> Edge:
        self.daemon = Daemon()
        self.seen: List[Mapping[str, bool]] = []
        options.setdefault("health", self.daemon.health)
        options.setdefault("cluster_status", self.daemon.cluster_status)
        options.setdefault("metrics", metrics_of(self.seen))
        edge = Edge(self, **options)
        self.fetcher = Component("fetcher", edge.bus, node="n", clock=edge.clock)
        return edge.start(self.fetcher, served={"attribute_store": CallTarget(edge.clock)})

    def call(self, edge: Edge, service: str, op: str, body: Any = None, **options: Any) -> Tuple[int, Any]:
        response = edge.request("POST", f"/api/call/{service}/{op}", body if body is not None else {}, **options)
        self.assertEqual(response.header("Content-Type"), "application/json", response)
        return response.status, response.json()


# --------------------------------------------------------------------------- #
# /healthz, /metrics, /api/status


class HealthTests(Case):
    def test_healthz_follows_the_daemon(self) -> None:
        edge = self.edge()
        r = edge.request("GET", "/healthz", token=None)
        self.assertEqual((r.status, r.json()["ok"]), (200, True))
        self.assertEqual(r.header("Cache-Control"), "no-store")
        self.assertEqual(r.header("X-Content-Type-Options"), "nosniff")
        self.daemon.ok = False
        r = edge.request("GET", "/healthz", token=None)
        self.assertEqual((r.status, r.json()["broker"]), (503, "down"))

    def test_healthz_head_has_no_body(self) -> None:
        edge = self.edge()
        connection = edge.open("HEAD", "/healthz", token=None)
        edge.until(lambda: connection.response(head=True) is not None)
        raw = connection.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)

    def test_a_failing_health_is_503_and_logged(self) -> None:
        edge = self.edge()
        log = LogEvents(self)
        self.daemon.fail = True
        r = edge.request("GET", "/healthz")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.json(), {"ok": False, "error": "health is broken"})
        self.assertTrue(any("checking health" in t for t in log.texts()))
        self.flushLoggedErrors(RuntimeError)

    def test_a_health_that_is_not_a_mapping_is_503(self) -> None:
        edge = self.edge()
        self.daemon.ok = ["not", "a", "mapping"]
        r = edge.request("GET", "/healthz")
        self.assertEqual(r.status, 503)
        self.assertIn("not a mapping: list", r.json()["error"])

    def test_standing_alone_it_says_only_what_it_knows(self) -> None:
        edge = Edge(self, metrics=None).start()
        r = edge.request("GET", "/healthz")
        self.assertEqual((r.status, r.json()), (200, {"ok": True, "components": {"web": True}}))

    def test_the_daemons_health_when_it_has_a_parent(self) -> None:
        from twisted.application.service import MultiService

        parent = MultiService()
        parent.health = lambda: {"ok": False, "components": {}}  # type: ignore[attr-defined]
        parent.cluster_status = lambda timeout: [{"node": "p", "timeout": timeout}]  # type: ignore[attr-defined]
        edge = Edge(self, status_timeout=0.5)
        edge.web.setServiceParent(parent)
        edge.start()
        self.assertEqual(edge.request("GET", "/healthz").status, 503)
        self.assertEqual(edge.request("GET", "/api/status").json(), {"nodes": [{"node": "p", "timeout": 0.5}]})


class MetricsTests(Case):
    def test_metrics_come_from_the_renderer_with_whos_up(self) -> None:
        edge = self.edge()
        r = edge.request("GET", "/metrics", token=None)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        self.assertIn(b'ooidx_up{component="fetcher"} 1', r.body)
        self.assertEqual(self.seen[-1], {"fetcher": True, "web": True, "cache": False})

    def test_metrics_when_health_fails_say_nothing_is_up(self) -> None:
        edge = self.edge()
        self.daemon.fail = True
        self.assertEqual(edge.request("GET", "/metrics").status, 200)
        self.assertEqual(self.seen[-1], {})
        self.flushLoggedErrors(RuntimeError)

    def test_no_renderer_no_metrics(self) -> None:
        edge = self.edge(metrics=None)
        r = edge.request("GET", "/metrics")
        self.assertEqual((r.status, r.error()[0]), (404, "NotFound"))


class StatusTests(Case):
    def test_status_is_open_and_comes_from_the_daemon(self) -> None:
        edge = self.edge(status_timeout=0.75)
        r = edge.request("GET", "/api/status", token=None)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["nodes"][0]["node"], "node-a")
        self.assertEqual(self.daemon.status_calls, [0.75])

    def test_status_failing_is_503(self) -> None:
        edge = self.edge()
        self.daemon.fail = True
        r = edge.request("GET", "/api/status")
        self.assertEqual((r.status, r.error()[0]), (503, "NotConnected"))
        self.flushLoggedErrors(magnet.NotConnected)

    def test_status_without_a_daemon_pings_the_components(self) -> None:
        edge = Edge(self, status_timeout=0.3)
        fetcher = Component("fetcher", edge.bus, node="node-b", clock=edge.clock)
        edge.start(fetcher)
        r = edge.request("GET", "/api/status")
        self.assertEqual(r.status, 200)
        nodes = r.json()["nodes"]
        self.assertEqual([n["node"] for n in nodes], ["node-b"])
        self.assertEqual(nodes[0]["components"], {"fetcher": {"started": True, "instances": None, "process": None}})

    def test_ping_components_groups_by_node_and_process(self) -> None:
        answers = {"fetcher": {"node": "b", "pid": 2}, "cache": {"node": "a", "pid": 1},
                   "controller": {"node": "a", "pid": 1}, "csv": "not a dict"}

        class Bus:
            def call(self, name: str, op: str, timeout: float) -> Any:
                if name in answers:
                    return defer.succeed(answers[name])
                return defer.fail(magnet.Unroutable(name))

        result: List[Any] = []
        ping_components(Bus(), timeout=1).addCallback(result.append)
        nodes = result[0]
        self.assertEqual([(n["node"], n["pid"]) for n in nodes], [("a", 1), ("b", 2)])
        self.assertEqual(sorted(nodes[0]["components"]), ["cache", "controller"])


# --------------------------------------------------------------------------- #
# POST /api/call


@expand
class CallTests(Case):
    def test_ping_reaches_the_component(self) -> None:
        edge = self.edge()
        status, answer = self.call(edge, "fetcher", "ping")
        self.assertEqual(status, 200)
        self.assertEqual(answer["result"]["component"], "fetcher")

    def test_the_body_is_the_keyword_arguments(self) -> None:
        edge = self.edge()
        body = {"a": [1, {"b": None}], "text": "é", "timeout": 3, "op": "x"}
        self.assertEqual(self.call(edge, "attribute_store", "echo", body), (200, {"result": body}))

    def test_an_empty_body_is_no_arguments(self) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/call/attribute_store/echo", b"")
        self.assertEqual((r.status, r.json()), (200, {"result": {}}))

    def test_a_bytes_result_is_raw(self) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/call/attribute_store/raw", {})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Content-Type"), "application/octet-stream")
        self.assertEqual(r.body, b"\x00\x01binary\xff")

    @cases("service, op, body, status, kind", [
        ("attribute_store", "get", {"key": "missing"}, 502, "KeyError"),
        ("attribute_store", "nope", {}, 404, "UnknownOperation"),
        ("attribute_store", "_private", {}, 404, "UnknownOperation"),
        ("attribute_store", "get", {"wrong": 1}, 422, "BadArguments"),
        ("notification", "ping", {}, 404, "Unroutable"),
        ("nosuch", "ping", {}, 404, "UnknownService"),
    ], ids=["remote", "unknown_op", "private_op", "bad_arguments", "fanout", "unknown_service"])
    def test_call_errors(self, service: str, op: str, body: Any, status: int, kind: str) -> None:
        edge = self.edge()
        code, answer = self.call(edge, service, op, body)
        self.assertEqual(code, status, answer)
        self.assertEqual(answer["error"]["type"], kind)

    def test_the_unknown_service_error_lists_what_is_callable(self) -> None:
        edge = self.edge()
        _, answer = self.call(edge, "nosuch", "ping")
        self.assertIn(", ".join(callable_services()), answer["error"]["message"])

    def test_no_answer_in_time_is_504(self) -> None:
        edge = self.edge()
        # csv is declared (its queue holds the call) but nobody consumes it.
        code, answer = self.call(edge, "csv", "ping", seconds=5, **{})
        self.assertEqual((code, answer["error"]["type"]), (504, "Timeout"))

    def test_the_timeout_parameter_shortens_the_wait(self) -> None:
        edge = self.edge()
        connection = edge.open("POST", "/api/call/attribute_store/slow?timeout=0.5", {})
        edge.clock.advance(0.4)
        self.assertIsNone(connection.response())
        edge.until(lambda: connection.response() is not None, seconds=1)
        self.assertEqual(connection.response().status, 504)
        self.assertLess(edge.clock.seconds(), 2)

    def test_a_slow_operation_within_the_timeout_answers(self) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/call/attribute_store/slow?timeout=10", {})
        self.assertEqual(r.json(), {"result": "late"})

    @cases("error, status, kind", [
        (magnet.ConnectionLost("link down"), 503, "ConnectionLost"),
        (magnet.NotConnected("no broker"), 503, "NotConnected"),
        (magnet.NotConfirmed("nack"), 503, "NotConfirmed"),
        (CancelledError(), 503, "Cancelled"),
        (magnet.Timeout("slow"), 504, "Timeout"),
        (magnet.Unroutable("nobody"), 404, "Unroutable"),
        (magnet.RemoteError("ValueError", "bad value"), 502, "ValueError"),
        (RuntimeError("a bug"), 500, "InternalError"),
    ], ids=["lost", "not_connected", "not_confirmed", "cancelled", "timeout", "unroutable", "remote", "bug"])
    def test_error_statuses(self, error: Exception, status: int, kind: str) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.fail(error))
        code, answer = self.call(edge, "fetcher", "ping")
        self.assertEqual((code, answer["error"]["type"]), (status, kind))
        if status == 500:
            self.assertNotIn("a bug", answer["error"]["message"])  # no internals to the caller
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_result_that_is_not_json_is_502(self) -> None:
        edge = self.edge()
        self.patch(edge.bus, "call_with", lambda *a, **kw: defer.succeed({"x": {1, 2}}))
        code, answer = self.call(edge, "fetcher", "ping")
        self.assertEqual((code, answer["error"]["type"]), (502, "BadReply"))

    def test_the_timeout_reaches_the_bus(self) -> None:
        edge = self.edge()
        seen: List[Any] = []
        self.patch(edge.bus, "call_with", lambda s, o, k, timeout=None: (seen.append((s, o, k, timeout)),
                                                                         defer.succeed(1))[1])
        self.call(edge, "fetcher", "ping?timeout=2.5", {"x": 1})
        self.call(edge, "fetcher", "ping")
        self.assertEqual(seen, [("fetcher", "ping", {"x": 1}, 2.5), ("fetcher", "ping", {}, None)])


@expand
class CallInputTests(Case):
    @cases("headers", [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": "Bearer " + TOKEN + "x"},
        {"Authorization": "Bearer " + TOKEN[:-1]},
        {"Authorization": "Basic " + TOKEN},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
    ])
    def test_the_token_is_needed(self, headers: Dict[str, str]) -> None:
        edge = self.edge()
        r = edge.request("POST", "/api/call/fetcher/ping", {}, token=None, headers=headers)
        self.assertEqual(r.status, 401)
        self.assertEqual(r.headers["www-authenticate"], ['Bearer realm="ooidx"'])
        kind, message = r.error()
        self.assertEqual(kind, "Unauthorized")
        self.assertNotIn(TOKEN, message)

    @cases("body, fragment", [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"[1, 2]", "not an array"),
        (b'"text"', "not a string"),
        (b"null", "not null"),
        (b"42", "not a number"),
        (b"true", "not a boolean"),
        (b"[" * 100000 + b"]" * 100000, ""),
    ])
    def test_a_bad_body_is_400(self, body: bytes, fragment: str) -> None:
        edge = self.edge(max_body=300_000)
        r = edge.request("POST", "/api/call/fetcher/ping", body)
        self.assertEqual(r.status, 400, r)
        kind, message = r.error()
        self.assertEqual(kind, "BadRequest")
        self.assertIn(fragment, message)

    @cases("path", [
        "/api/call/Fetcher/ping",
        "/api/call/fetcher/Ping",
        "/api/call/fetch-er/ping",
        "/api/call/fetcher/ping.json",
        "/api/call/%66etcher/ping",
        "/api/call/9fetcher/ping",
        "/api/call/" + "a" * 65 + "/ping",
        "/api/call/fetcher/" + "a" * 65,
        "/api/call/fetcher/",
        "/api/call//ping",
        "/api/call/f%C3%A9tcher/ping",
        "/api/call/fetcher/ping?timeout=nan",
        "/api/call/fetcher/ping?timeout=-1",
        "/api/call/fetcher/ping?timeout=0",
        "/api/call/fetcher/ping?timeout=100000",
        "/api/call/fetcher/ping?timeout=soon",
    ])
    def test_bad_names_are_400(self, path: str) -> None:
        edge = self.edge()
        r = edge.request("POST", path, {})
        self.assertEqual(r.status, 400, r)
        self.assertEqual(r.error()[0], "BadRequest")

    @cases("path", ["/api/call/fetcher", "/api/call/fetcher/ping/more"])
    def test_the_wrong_shape_is_404(self, path: str) -> None:
        edge = self.edge()
        r = edge.request("POST", path, {})
        self.assertEqual((r.status, r.error()[0]), (404, "NotFound"))

    @cases("size", [1001, 5000])
    def test_a_body_past_the_limit_is_413(self, size: int) -> None:
        edge = self.edge(max_body=1000)
        body = b'{"x": "' + b"a" * (size - 9) + b'"}'
        r = edge.request("POST", "/api/call/attribute_store/echo", body)
        self.assertEqual((r.status, r.error()[0]), (413, "PayloadTooLarge"))

    def test_a_chunked_body_past_the_limit_is_413(self) -> None:
        edge = self.edge(max_body=1000)
        body = b'{"x": "' + b"a" * 2000 + b'"}'
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100]) for i in range(0, len(body), 100))
        r = edge.request("POST", "/api/call/attribute_store/echo", chunks + b"0\r\n\r\n",
                         headers={"Transfer-Encoding": "chunked"})
        self.assertEqual((r.status, r.error()[0]), (413, "PayloadTooLarge"))

    def test_a_chunked_body_within_the_limit_is_taken(self) -> None:
        edge = self.edge(max_body=1000)
        body = json.dumps({"x": "a" * 500}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 64]), body[i:i + 64]) for i in range(0, len(body), 64))
        r = edge.request("POST", "/api/call/attribute_store/echo", chunks + b"0\r\n\r\n",
                         headers={"Transfer-Encoding": "chunked"})
        self.assertEqual((r.status, r.json()), (200, {"result": {"x": "a" * 500}}))

    def test_a_client_sending_far_past_the_limit_is_cut_off(self) -> None:
        edge = self.edge(max_body=100)
        connection = edge.open("POST", "/api/call/attribute_store/echo", None,
                               headers={"Transfer-Encoding": "chunked"})
        piece = b"a" * 500
        for _ in range(4):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertTrue(connection.transport.disconnecting)

    def test_a_body_at_the_limit_is_taken(self) -> None:
        edge = self.edge(max_body=1000)
        body = b'{"x": "' + b"a" * (1000 - 9) + b'"}'
        self.assertEqual(len(body), 1000)
        r = edge.request("POST", "/api/call/attribute_store/echo", body)
        self.assertEqual(r.status, 200)
        self.assertEqual(len(r.json()["result"]["x"]), 1000 - 9)

    @cases("method, path, allow", [
        ("GET", "/api/call/fetcher/ping", "POST"),
        ("PUT", "/api/call/fetcher/ping", "POST"),
        ("DELETE", "/api/call/fetcher/ping", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("POST", "/api/status", "GET"),
    ])
    def test_a_wrong_method_is_405(self, method: str, path: str, allow: str) -> None:
        edge = self.edge()
        r = edge.request(method, path, b"{}")
        self.assertEqual(r.status, 405)
        self.assertEqual(r.headers["allow"], [allow])
        self.assertEqual(r.error()[0], "MethodNotAllowed")

    @cases("path", ["/static/nope", "/nope", "/api", "/api/", "/api/call", "/healthz/", "/api/status/x",
                    "//healthz", "/%00", "/static/index.html"])
    def test_an_unknown_path_is_404(self, path: str) -> None:
        edge = self.edge()
        r = edge.request("GET", path)
        self.assertEqual(r.status, 404, r)
        self.assertEqual(r.header("Content-Type"), "application/json")
        self.assertEqual(r.error()[0], "NotFound")

    def test_a_host_it_does_not_answer_for_is_421(self) -> None:
        edge = self.edge()
        r = edge.request("GET", "/healthz", headers={"Host": "evil.example"})
        self.assertEqual((r.status, r.error()[0]), (421, "MisdirectedRequest"))
        self.assertEqual(edge.request("GET", "/healthz", headers={"Host": "localhost:8080"}).status, 200)


# --------------------------------------------------------------------------- #
# the component: token, where it listens, stopping


class LifecycleTests(FastCase):
    def test_no_token_no_start(self) -> None:
        edge = Edge(self, token=None)
        self.assertRaises(ValueError, edge.web.setUp)

    def test_the_token_may_be_read_at_start(self) -> None:
        read: List[str] = []

        def source() -> str:
            read.append("read")
            return "from-the-data-dir-" + "q" * 20

        edge = Edge(self, token=None)
        edge.web = Web("web", edge.bus, node="n", port=0, interface="127.0.0.1", token=source, clock=edge.clock)
        edge.start()
        self.assertEqual(read, ["read"])
        edge.token = "from-the-data-dir-" + "q" * 20
        self.assertEqual(edge.request("POST", "/api/call/nosuch/ping", {}).status, 404)
        self.assertEqual(edge.request("POST", "/api/call/nosuch/ping", {}, token="x" * 30).status, 401)

    def test_where_it_listens(self) -> None:
        edge = Edge(self)
        self.assertEqual(edge.web.port, 0)
        edge.start()
        self.assertEqual(edge.clock.tcpServers[-1][0], 0)
        self.assertEqual(edge.clock.tcpServers[-1][3], "127.0.0.1")
        self.assertEqual(edge.web.url, f"http://127.0.0.1:{edge.web.port}")

    def test_the_url_of_an_ipv6_port(self) -> None:
        edge = Edge(self, interface="::")
        edge.start()
        self.assertEqual(edge.web.url, "http://[::1]:0")

    def test_stopping_closes_open_connections(self) -> None:
        edge = Edge(self).start()
        idle = edge.connect()
        self.assertIn(idle.protocol, edge.site.open_channels)
        edge.wait(edge.web.stopService())
        self.assertTrue(idle.transport.disconnecting)
        idle.close()
        self.assertNotIn(idle.protocol, edge.site.open_channels)

    def test_the_request_names_no_ticket(self) -> None:
        from twisted.web.test.requesthelper import DummyChannel

        request = app._LimitedRequest(DummyChannel())
        request.method = b"GET"
        request.uri = b"/api/subscriptions/x/events?ticket=SECRET&a=1"
        text = repr(request)
        self.assertNotIn("SECRET", text)
        self.assertIn("ticket=***", text)

    def test_the_access_log_masks_tickets(self) -> None:
        edge = Edge(self, access_log=True).start()  # the access log is a switch (logging.access)
        import io

        log = io.StringIO()
        edge.site.logFile = log
        edge.request("GET", "/api/subscriptions/0123456789ab/events?ticket=SECRET",
                     headers={"Referer": "http://x/?ticket=SECRET2"})
        lines = log.getvalue()
        self.assertIn("/api/subscriptions/0123456789ab/events?ticket=***", lines)
        self.assertIn('"http://x/?ticket=***"', lines)
        self.assertNotIn("SECRET", lines)

    def test_a_request_is_answered_with_keep_alive(self) -> None:
        edge = Edge(self).start()
        connection = edge.connect()
        raw = request_bytes("GET", "/healthz", None, {"Host": "localhost"})
        connection.send(raw)
        edge.until(lambda: (parse_response(connection.transport.value()) or SimpleNamespace(complete=False)).complete)
        self.assertFalse(connection.transport.disconnecting)
        connection.transport.clear()
        connection.send(raw)
        edge.until(lambda: (parse_response(connection.transport.value()) or SimpleNamespace(complete=False)).complete)
        self.assertEqual(parse_response(connection.transport.value()).status, 200)

    def test_a_handler_failing_unexpectedly_is_500_in_json(self) -> None:
        edge = Edge(self).start()
        log = LogEvents(self)
        # render_healthz catches failures itself; a route that does not is answered 500 all the same.
        edge.site.resource.routes[b"/healthz"][b"GET"] = lambda request: defer.fail(ZeroDivisionError("boom"))
        r = edge.request("GET", "/healthz")
        self.assertEqual((r.status, r.error()), (500, ("InternalError", "internal error")))
        self.assertTrue(any(e.get("log_level") == LogLevel.critical for e in log.events))
        self.flushLoggedErrors(ZeroDivisionError)
