"""The fetcher's HTTP client side (ooidx.datapath.upstream): the bound on an
upstream's answer head, driven through Twisted's HTTP/1.1 client protocol on
a StringTransport (no socket), and what is read from an answer."""
from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from ooidx.datapath import upstream
from ooidx.datapath.upstream import (MAX_UPSTREAM_HEADER_BYTES, MAX_UPSTREAM_HEADERS, BoundedClientFactory,
                                     ascii_url, connection_header, content_length, discard, end_to_end)
from ooidx.errors import UpstreamError


def answer(head: bytes) -> Any:
    """What the bounded client makes of an answer starting with C{head}."""
    protocol = BoundedClientFactory(lambda p: None, None).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    d = protocol.request(Request(b"GET", b"/x.dods", Headers({b"Host": [b"data.example.org"]}), None))
    protocol.dataReceived(head)
    return d, transport


class BoundedHeadTests(SynchronousTestCase):
    def test_a_normal_answer(self) -> None:
        d, _ = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok")
        response = self.successResultOf(d)
        self.assertEqual((response.code, response.length), (200, 2))

    def test_too_many_fields(self) -> None:
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_UPSTREAM_HEADERS + 1))
        d, transport = answer(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(any(r.check(UpstreamError) for r in failure.value.reasons))
        self.assertTrue(transport.disconnecting)

    def test_exactly_the_most_fields(self) -> None:
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_UPSTREAM_HEADERS - 1))
        d, _ = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + fields + b"\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_too_many_bytes(self) -> None:
        big = b"X-Big: " + b"v" * 15000 + b"\r\n"
        d, _ = answer(b"HTTP/1.1 200 OK\r\n" + big * (MAX_UPSTREAM_HEADER_BYTES // len(big) + 1) + b"\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(any(r.check(UpstreamError) for r in failure.value.reasons))


class ReadingTests(SynchronousTestCase):
    def test_ascii_url(self) -> None:
        self.assertEqual(ascii_url("http://h/é?a[0:1]"), b"http://h/%C3%A9?a[0:1]")

    def test_content_length(self) -> None:
        self.assertEqual(content_length(Headers({b"content-length": [b" 12 "]})), 12)
        self.assertIsNone(content_length(Headers({b"content-length": [b"x"]})))
        self.assertIsNone(content_length(Headers()))

    def test_end_to_end(self) -> None:
        headers = Headers({b"Content-Type": [b"a"], b"Connection": [b"X-Drop"], b"X-Drop": [b"1"],
                           b"Proxy-Authenticate": [b"p"], b"Transfer-Encoding": [b"chunked"], b"X-Keep": [b"1", b"2"]})
        pairs = end_to_end(headers, [b"X-Also"])
        self.assertEqual(sorted(pairs), [["Content-Type", "a"], ["X-Keep", "1"], ["X-Keep", "2"]])
        self.assertEqual(end_to_end(Headers({b"X-Also": [b"1"]}), [b"x-also"]), [])

    def test_connection_header_is_best_effort(self) -> None:
        self.assertEqual(connection_header(object()), [])

        class Parser:
            connHeaders = Headers({b"connection": [b"X-Secret"]})

        class Protocol:
            _parser = Parser()

        class Producer:
            protocol = Protocol()

        class Transport:
            _producer = Producer()

        class Response:
            _transport = Transport()

        self.assertEqual(connection_header(Response()), [b"X-Secret"])

    def test_discard_stops_the_body(self) -> None:
        stopped = []

        class Transport:
            def stopProducing(self) -> None:
                stopped.append(True)

        class Response:
            def deliverBody(self, protocol: Any) -> None:
                protocol.makeConnection(Transport())
                protocol.connectionLost(None)

        discard(Response())
        self.assertEqual(stopped, [True])

    def test_widen_reads_is_best_effort(self) -> None:
        upstream.widen_reads(object())
        upstream.widen_reads(StringTransport())
