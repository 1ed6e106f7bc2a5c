"""The one path check (L{ooidx.urlpolicy.check_path}) that registration,
by-name, CSV and forward-proxy requests all go through: the escapes out of a
directory base that an upstream server would resolve after decoding (WSGI
decodes %2f, Tomcat drops ;params, IIS and Windows take \\ for /), in every
encoding. No sockets, no broker."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ooidx.datapath.controller import check_base_url
from ooidx.errors import Forbidden, InvalidURL
from ooidx.urlpolicy import check_path, check_registered, is_under

HOST = "http://data.example.org"
BASE = HOST + "/a/"
BASES = {"dir": BASE, "file": HOST + "/opendap/sst.nc"}

#: (what it is, the path after the directory base): each one reaches outside /a/ on some server.
ESCAPES = [
    ("encoded slash", "..%2fb/secret.nc.dds"),
    ("encoded slash, upper case", "..%2Fb/secret.nc.dds"),
    ("encoded dots and slash, upper case", "%2E%2E%2Fb/secret.nc.dds"),
    ("encoded dots and slash, mixed case", "%2e%2E%2fb/secret.nc.dds"),
    ("twice up through encoded slashes", "x/..%2f..%2fb/secret.nc.dds"),
    ("encoded dots, literal slash", "%2e%2e/b/secret.nc.dds"),
    ("one encoded dot", ".%2e/b/secret.nc.dds"),
    ("the other encoded dot", "%2e./b/secret.nc.dds"),
    ("literal dot dot", "../b/secret.nc.dds"),
    ("literal dot", "./../b/secret.nc.dds"),
    ("Tomcat path parameter", "..;/b/secret.nc.dds"),
    ("Tomcat path parameter with a value", "..;x=y/b/secret.nc.dds"),
    ("jsessionid in a segment", "x;jsessionid=0123ABCD/y.nc.dds"),
    ("encoded semicolon", "..%3b/b/secret.nc.dds"),
    ("encoded backslash", "..%5cb%5csecret.nc.dds"),
    ("encoded backslash, upper case", "..%5Cb/secret.nc.dds"),
    ("literal backslash", "..\\b\\secret.nc.dds"),
    ("double-encoded dots", "%252e%252e/b/secret.nc.dds"),
    ("double-encoded slash", "..%252fb/secret.nc.dds"),
    ("triple-encoded dots and slash", "%25252e%25252e%25252fb/secret.nc.dds"),
    ("percent of a percent", "%%32%65%%32%65/b/secret.nc.dds"),
    ("encoded percent then hex", "%252E%252E%252Fb/secret.nc.dds"),
    ("overlong UTF-8 dot (2 bytes)", "%c0%ae%c0%ae/b/secret.nc.dds"),
    ("overlong UTF-8 slash (2 bytes)", "..%c0%afb/secret.nc.dds"),
    ("overlong UTF-8 dot (3 bytes)", "%e0%80%ae%e0%80%ae/b/secret.nc.dds"),
    ("overlong UTF-8 backslash", "..%c1%9cb/secret.nc.dds"),
    ("broken UTF-8", "%ae%ae/b/secret.nc.dds"),
    ("fullwidth full stops (NFKC)", "%ef%bc%8e%ef%bc%8e/b/secret.nc.dds"),
    ("one-dot leaders (NFKC)", "\u2024\u2024/b/secret.nc.dds"),
    ("fullwidth solidus", "..%ef%bc%8fb/secret.nc.dds"),
    ("division slash", "..\u2215b/secret.nc.dds"),
    ("yen sign (Windows cp932 best fit for \\)", "..%c2%a5b/secret.nc.dds"),
    ("IIS %u escapes", "%u002e%u002e/b/secret.nc.dds"),
    ("IIS %u slash", "..%u2215b/secret.nc.dds"),
    ("NUL after the dots", "..%00/b/secret.nc.dds"),
    ("newline in a segment", "..%0a/b/secret.nc.dds"),
    ("three dots (Windows trims trailing dots)", ".../b/secret.nc.dds"),
    ("dots and a blank", "..%20/b/secret.nc.dds"),
    ("encoded dots at the end", "x/%2e%2e"),
    ("encoded too often", "%2525252525252e"),
]

#: Paths under the base that are fine: nothing here is an escape.
FINE = ["x.nc.dds", "sub/dir/x.nc.dods?sst[0:1:3]", "x.nc.dds?a&b>..%2f..%2f;x", "x..y.nc.das", ".hidden.nc.das",
        "with%20space.nc.das", "caf%C3%A9.nc.das", "100%25.nc.das", "a//b.nc.das", "x.nc.dds#..%2f"]


class CheckPathTests(SynchronousTestCase):
    def test_every_escape_is_refused_with_a_reason(self) -> None:
        passed = []
        for what, tail in ESCAPES:
            try:
                check_path(BASE + tail)
            except InvalidURL as e:
                self.assertIn("URL path", str(e), what)
            else:
                passed.append(what)
        self.assertEqual(passed, [])

    def test_fine_paths_pass(self) -> None:
        for tail in FINE:
            self.assertEqual(check_path(BASE + tail), "/a/" + tail.split("?")[0].split("#")[0])

    def test_the_reason_names_the_rule(self) -> None:
        cases = {"..%2fb": "encoded /", "..;/b": "path parameters", "..%5cb": "backslash", "%252e%252e/b": ". or ..",
                 "%c0%ae%c0%ae/b": "not UTF-8", "..%00/b": "control character", "%u002e%u002e/b": "%u escape",
                 "%2525252525252e": "more than 4 times"}
        for tail, reason in cases.items():
            with self.assertRaises(InvalidURL) as raised:
                check_path(BASE + tail)
            self.assertIn(reason, str(raised.exception), tail)


class RequestTests(SynchronousTestCase):
    """Forward-proxy, by-name and CSV requests: L{check_registered} (the controller's check)."""

    def test_escapes_are_invalid_before_any_base_is_looked_at(self) -> None:
        for what, tail in ESCAPES:
            for bases in (BASES, {}):
                with self.assertRaises(InvalidURL, msg=what):
                    check_registered(BASE + tail, bases)
            # the by-name (and CSV) route: the dataset's own base only
            with self.assertRaises(InvalidURL, msg=what):
                check_registered(BASE + tail, {"dir": BASE})
            # an allowed host does not make the path fine
            with self.assertRaises(InvalidURL, msg=what):
                check_registered(BASE + tail, {}, allow_hosts=("data.example.org",))
            self.assertFalse(is_under(BASE + tail, BASE), what)

    def test_escapes_from_a_file_base(self) -> None:
        for tail in ("..%2f..%2fsecret.dds", ";jsessionid=1.dds", "%2f..%2f..%2fsecret.dds"):
            with self.assertRaises(InvalidURL, msg=tail):
                check_registered(HOST + "/opendap/sst.nc" + tail, BASES)

    def test_requests_under_the_base_still_route(self) -> None:
        for tail in FINE:
            self.assertEqual(check_registered(BASE + tail, BASES), "dir", tail)
        self.assertEqual(check_registered(HOST + "/opendap/sst.nc.dds?sst[0:1:3]", BASES), "file")

    def test_outside_the_base_is_still_forbidden(self) -> None:
        with self.assertRaises(Forbidden):
            check_registered(HOST + "/b/secret.nc.dds", BASES)


class RegistrationTests(SynchronousTestCase):
    """Registration (L{check_base_url}) refuses the same bases."""

    def test_escaping_bases_are_refused(self) -> None:
        for what, tail in ESCAPES:
            with self.assertRaises(InvalidURL, msg=what):
                check_base_url(BASE + tail.split("?")[0], allow_hosts=("data.example.org",))

    def test_plain_bases_register(self) -> None:
        self.assertEqual(check_base_url(BASE), BASE)
        self.assertEqual(check_base_url(HOST + "/opendap/sst.nc.dds"), HOST + "/opendap/sst.nc")
        self.assertEqual(check_base_url(HOST + "/opendap/caf%C3%A9.nc"), HOST + "/opendap/caf%C3%A9.nc")
