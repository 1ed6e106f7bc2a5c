"""The HTTP edge toolkit's contract (ooidx.http.answers, ooidx.http.edge) with
twisted.web's DummyRequest: every answer is JSON with its status and headers,
an answer still to come is cancelled when its client goes, the host check,
the access log's masking, where an edge listens. No socket."""
from __future__ import annotations

import io
import json
from typing import Any, List

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from ooidx.http import answers, edge
from ooidx.http.answers import (Answer, HTTPError, answer, check_bearer, error_answer, json_answer, json_arguments,
                                json_kind, printable, result_answer)
from ooidx.http.edge import (HostAllowList, TrackingSite, host_of, listen_spec, mask_query,
                             masking_log_formatter)
from ooidx.http.listen import BadEndpoint

from tests.fast.core.support import FastCase, LogEvents


def request(path: bytes = b"/x", headers: Any = None, body: bytes = b"") -> DummyRequest:
    r = DummyRequest(path.strip(b"/").split(b"/"))
    r.path = path
    r.uri = path
    for name, value in (headers or {}).items():
        r.requestHeaders.setRawHeaders(name, [value])
    r.content = io.BytesIO(body)
    return r


class AnswerTests(FastCase):
    def test_an_answer_now(self) -> None:
        r = request()
        body = answer(r, json_answer({"a": "é"}, 201, {b"X-Extra": b"1"}))
        self.assertEqual(body, '{"a":"é"}\n'.encode())
        self.assertEqual(r.responseCode, 201)
        self.assertEqual(r.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(r.responseHeaders.getRawHeaders(b"content-length"), [str(len(body)).encode()])
        self.assertEqual(r.responseHeaders.getRawHeaders(b"x-extra"), [b"1"])
        self.assertEqual(r.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_an_answer_later(self) -> None:
        r = request()
        d: defer.Deferred = defer.Deferred()
        self.assertIs(answer(r, d), server.NOT_DONE_YET)
        d.callback(error_answer(HTTPError(418, "Teapot", "short and stout")))
        self.assertEqual(r.responseCode, 418)
        self.assertEqual(json.loads(b"".join(r.written)), {"error": {"type": "Teapot", "message": "short and stout"}})
        self.assertEqual(r.finished, 1)

    def test_an_error_raised_later_is_its_answer(self) -> None:
        r = request()
        answer(r, defer.fail(HTTPError(409, "Conflict", "exists")))
        self.assertEqual(r.responseCode, 409)

    def test_a_bug_later_is_500_and_logged(self) -> None:
        r = request()
        log = LogEvents(self)
        answer(r, defer.fail(KeyError("secret detail")))
        self.assertEqual(r.responseCode, 500)
        self.assertNotIn(b"secret", b"".join(r.written))
        self.assertTrue(any("answering /x" in t for t in log.texts()))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_a_client_gone_cancels_the_work_and_nothing_is_written(self) -> None:
        r = request()
        cancelled: List[bool] = []
        d: defer.Deferred = defer.Deferred(lambda _: cancelled.append(True))
        answer(r, d)
        r.processingFailed(Failure(ConnectionError("gone")))  # what the channel does when the client goes
        self.assertEqual(cancelled, [True])
        self.assertEqual(r.written, [])
        self.flushLoggedErrors(ConnectionError)

    def test_a_stream_already_under_way_is_left_alone(self) -> None:
        r = request()
        answer(r, defer.succeed(object()))
        self.assertEqual((r.written, r.finished), ([], 0))

    def test_results(self) -> None:
        self.assertEqual(result_answer(b"\x00").content_type, b"application/octet-stream")
        self.assertEqual(result_answer(memoryview(b"ab")).body, b"ab")
        self.assertEqual(json.loads(result_answer([1]).body), {"result": [1]})
        bad = result_answer({"x": float("nan")} if False else {"x": object()})
        self.assertEqual((bad.status, json.loads(bad.body)["error"]["type"]), (502, "BadReply"))

    def test_printable(self) -> None:
        self.assertEqual(printable(b"a\x00b\xff"), "a?b\\xff")
        self.assertEqual(printable(b"x" * 100), "x" * 80 + "...")

    def test_json_kinds(self) -> None:
        self.assertEqual([json_kind(v) for v in ([], "", True, None, 1, 1.5, {})],
                         ["an array", "a string", "a boolean", "null", "a number", "a number", "dict"])


class BearerTests(FastCase):
    def test_the_token(self) -> None:
        check_bearer(request(headers={b"authorization": b"Bearer s3cret-token"}), "s3cret-token")
        check_bearer(request(headers={b"authorization": b"bearer  s3cret-token "}), "s3cret-token")
        for header in (None, b"Bearer", b"Bearer wrong", b"Basic s3cret-token", b"s3cret-token"):
            r = request(headers={b"authorization": header} if header else None)
            with self.assertRaises(HTTPError) as caught:
                check_bearer(r, "s3cret-token")
            self.assertEqual(caught.exception.status, 401)
            self.assertEqual(caught.exception.headers, {b"WWW-Authenticate": b'Bearer realm="ooidx"'})

    def test_no_expected_token_refuses_everyone(self) -> None:
        for expected in (None, ""):
            self.assertRaises(HTTPError, check_bearer, request(headers={b"authorization": b"Bearer "}), expected)
            self.assertRaises(HTTPError, check_bearer, request(headers={b"authorization": b"Bearer x"}), expected)


class ArgumentsTests(FastCase):
    def test_bodies(self) -> None:
        self.assertEqual(json_arguments(request(body=b"  \n"), 100), {})
        self.assertEqual(json_arguments(request(body=b'{"a": [1]}'), 100), {"a": [1]})
        for body, words in [(b"{", "not valid JSON"), (b"\xff", "not valid JSON"), (b"Infinity", "not valid JSON"),
                            (b"[]", "not an array"), (b"[" * 5000 + b"]" * 5000, "nested too deeply")]:
            with self.assertRaises(HTTPError) as caught:
                json_arguments(request(body=body), 100_000)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(words, caught.exception.message)

    def test_only_max_body_is_read(self) -> None:
        with self.assertRaises(HTTPError):
            json_arguments(request(body=b"{\"a\": \"" + b"x" * 20 + b"\"}"), 8)


class HostTests(FastCase):
    def test_host_headers(self) -> None:
        self.assertEqual(host_of(b"Example.ORG.:8080"), "example.org")
        self.assertEqual(host_of(b"[::FFFF:127.0.0.1]:80"), "127.0.0.1")
        self.assertEqual(host_of(b"[::1]"), "::1")
        for bad in (b"", b"a b", b"a/b", b"u@h", b"h:x", b"[::1", b"[::1]x", b"[::1]:x", b"\xff"):
            self.assertIsNone(host_of(bad), bad)

    def test_the_allow_list(self) -> None:
        hosts = HostAllowList(["data.example.org", "*.svc.example", "10.0.0.5"])
        for host in ("localhost", "127.0.0.1", "::1", "data.example.org", "a.svc.example", "10.0.0.5"):
            self.assertTrue(hosts.allows(host), host)
        self.assertTrue(hosts.allows("192.168.1.9", "192.168.1.9"))
        for host in (None, "", "svc.example", "evil.example", "192.168.1.9"):
            self.assertFalse(hosts.allows(host), host)

    def site(self) -> TrackingSite:
        return TrackingSite(Resource(), allowed_hosts=["good.example"])

    def test_what_the_site_lets_through(self) -> None:
        site = self.site()
        r = request(b"/x", {b"host": b"good.example"})
        self.assertIsNone(site.misdirected(r))
        self.assertIsNone(site.misdirected(request(b"/x")))  # no Host: HTTP/1.0
        proxied = request(b"/x", {b"host": b"evil.example"})
        proxied.uri = b"http://evil.example/x"
        self.assertIsNone(site.misdirected(proxied))

    def test_what_the_site_refuses_with_421(self) -> None:
        site = self.site()
        for headers in ([b"evil.example"], [b"good.example", b"good.example"], [b"a b"]):
            r = request(b"/x")
            r.requestHeaders.setRawHeaders(b"host", headers)
            refusal = site.misdirected(r)
            self.assertIsNotNone(refusal)
            body = refusal.render(r)
            self.assertEqual(r.responseCode, 421)
            self.assertEqual(json.loads(body)["error"]["type"], "MisdirectedRequest")
        r = request(b"/x", {b"host": b"evil.example"})
        self.assertIsInstance(site.getResourceFor(r), edge._Misdirected)

    def test_a_request_without_an_address_is_judged_by_its_name(self) -> None:
        site = self.site()
        r = request(b"/x", {b"host": b"10.9.9.9"})
        r.getHost = lambda: (_ for _ in ()).throw(RuntimeError("no transport"))  # type: ignore[assignment]
        self.assertIsNotNone(site.misdirected(r))

    def test_connections_are_tracked_and_closed(self) -> None:
        from twisted.internet.testing import StringTransport

        site = self.site()
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertEqual(site.open_channels, {channel})
        site.close_connections()
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual(site.open_channels, set())
        site.open_channels.add(object())  # a channel with no transport is skipped
        site.close_connections()


class MaskingTests(FastCase):
    def test_mask_query(self) -> None:
        self.assertEqual(mask_query(b"/p"), b"/p")
        self.assertEqual(mask_query(b"/p?ticket=abc&x=1"), b"/p?ticket=***&x=1")
        self.assertEqual(mask_query(b"/p?x=1;%74icket=abc"), b"/p?x=1;%74icket=***")
        self.assertEqual(mask_query(b"/p?TICKET=a&ticket"), b"/p?TICKET=***&ticket")

    def test_the_access_log_line(self) -> None:
        r = DummyRequest([b"p"])
        r.uri = b"/p?ticket=SECRET"
        r.method = b"GET"
        r.clientproto = b"HTTP/1.1"
        r.code = 200
        r.sentLength = 0
        r.requestHeaders.setRawHeaders(b"referer", [b"http://x/?ticket=SECRET2"])
        r.requestHeaders.setRawHeaders(b"user-agent", [b"ua"])
        r.getClientAddress = lambda: IPv4Address("TCP", "1.2.3.4", 5)  # type: ignore[assignment]
        line = masking_log_formatter()("[ts]", r)
        self.assertNotIn("SECRET", line)
        self.assertIn('"GET /p?ticket=*** HTTP/1.1"', line)
        self.assertIn('"http://x/?ticket=***"', line)
        self.assertIn('"ua"', line)


class ListenTests(FastCase):
    def test_a_plain_tcp_address(self) -> None:
        spec = listen_spec(8081, "0.0.0.0", default_port=1)
        self.assertEqual((spec.port, spec.interface, spec.tls), (8081, "0.0.0.0", False))
        spec = listen_spec(None, None, default_port=9)
        self.assertEqual((spec.port, spec.interface), (9, "127.0.0.1"))

    def test_either_edge_takes_tls(self) -> None:
        with self.assertRaises(BadEndpoint):  # its files are read when it is checked
            listen_spec("ssl:8443:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem", None, default_port=1)

    def test_the_components_own_options_win(self) -> None:
        from ooidx.config import listen_of, parse

        config = parse("http: {web_port: 1}\ncomponents: {web: {port: 2, interface: 127.0.0.2}}\n", "dx.yaml",
                       environ={})
        self.assertEqual(listen_of(config, "web"), (2, "127.0.0.2"))


class StaticTests(FastCase):
    def test_the_module_says_what_it_exports(self) -> None:
        for name in answers.__all__:
            self.assertTrue(hasattr(answers, name), name)
        self.assertIsInstance(json_answer(None), Answer)
        self.assertEqual(DummyChannel().site is not None, True)
