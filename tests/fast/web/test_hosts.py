"""DNS rebinding: the edges' Host allow-list (ooidx.http.edge), without a port."""
from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from ooidx.http.edge import HostAllowList, TrackingSite, host_of


class _Ok(Resource):
    isLeaf = True

    def render(self, request: object) -> bytes:
        return b"ok"


def request(uri: bytes, host: object, local: str = "127.0.0.1") -> DummyRequest:
    r = DummyRequest(uri.split(b"?")[0].split(b"/")[1:])
    r.uri = uri
    r.requestHeaders.removeHeader(b"host")
    if isinstance(host, list):
        r.requestHeaders.setRawHeaders(b"host", host)
    elif host is not None:
        r.requestHeaders.setRawHeaders(b"host", [host])
    r.getHost = lambda: IPv4Address("TCP", local, 8080)  # type: ignore[method-assign]
    return r


class HostOfTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(host_of(b"LocalHost:8080"), "localhost")
        self.assertEqual(host_of(b"dx.example.org."), "dx.example.org")
        self.assertEqual(host_of(b"[::1]:8080"), "::1")
        self.assertEqual(host_of(b"[::ffff:127.0.0.1]"), "127.0.0.1")
        for bad in (b"", b"a b", b"x:y", b"[::1", b"[::1]x", b"user@host", b"h\xff"):
            self.assertIsNone(host_of(bad), bad)


class AllowListTests(SynchronousTestCase):
    def test_loopback_the_local_address_and_the_configured_names(self) -> None:
        hosts = HostAllowList(["dx.example.org", "*.example.net"])
        for host in ("localhost", "127.0.0.1", "::1", "dx.example.org", "a.example.net", "b.a.example.net"):
            self.assertTrue(hosts.allows(host), host)
        self.assertTrue(hosts.allows("10.0.0.5", local="10.0.0.5"))
        for host in ("evil.example", "example.net", "10.0.0.5", "dx.example.org.evil", None, ""):
            self.assertFalse(hosts.allows(host), host)


class SiteTests(SynchronousTestCase):
    def site(self, names: tuple = ()) -> TrackingSite:
        return TrackingSite(_Ok(), allowed_hosts=names)

    def test_a_rebinding_page_gets_421_in_json(self) -> None:
        r = request(b"/api/datasets", b"evil.example:8080")
        resource = self.site().getResourceFor(r)
        body = resource.render(r)
        self.assertEqual(r.responseCode, 421)
        error = json.loads(body)["error"]
        self.assertEqual(error["type"], "MisdirectedRequest")
        self.assertIn("'evil.example'", error["message"])
        self.assertIn("http.allowed_hosts", error["message"])

    def test_what_goes_on(self) -> None:
        site = self.site(("dx.example.org",))
        for r in (request(b"/", b"localhost:8080"), request(b"/", b"127.0.0.1"),
                  request(b"/", b"dx.example.org"), request(b"/", b"10.1.2.3:8080", local="10.1.2.3"),
                  request(b"/", None),  # HTTP/1.0 without Host: not a browser
                  request(b"http://upstream.example/x.dds", b"upstream.example")):  # a forward-proxy request
            self.assertIsInstance(site.getResourceFor(r), _Ok)

    def test_what_is_refused(self) -> None:
        site = self.site()
        for r in (request(b"/", b"evil.example"), request(b"/", b"10.1.2.3", local="10.9.9.9"),
                  request(b"/", [b"localhost", b"evil.example"]), request(b"/", b"\xff")):
            self.assertNotIsInstance(site.getResourceFor(r), _Ok)
