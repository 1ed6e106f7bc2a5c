"""Ports as numbers or Twisted endpoint strings (ooidx.http.listen), and the
config's one-line errors for bad ones."""
from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from twisted.internet.testing import MemoryReactor
from twisted.web import resource, server

from ooidx.config import ConfigError, parse
from ooidx.http.edge import listen_on
from ooidx.http.listen import DEFAULT_BACKLOG, BadEndpoint, parse_listen


class ParseListenTests(SynchronousTestCase):
    def test_a_port_number_listens_on_the_configured_interface(self) -> None:
        spec = parse_listen(8080, "127.0.0.1")
        self.assertEqual((spec.description, spec.port, spec.interface, spec.tls, spec.scheme),
                         ("tcp:8080:interface=127.0.0.1", 8080, "127.0.0.1", False, "http"))
        self.assertEqual(parse_listen("8080", "::1").description, "tcp:8080:interface=\\:\\:1")
        self.assertEqual(parse_listen(0, "").description, "tcp:0")

    def test_an_endpoint_string_without_an_interface_gets_the_configured_one(self) -> None:
        self.assertEqual(parse_listen("tcp:8080", "127.0.0.1").interface, "127.0.0.1")
        self.assertEqual(parse_listen("tcp:8080:interface=0.0.0.0", "127.0.0.1").interface, "0.0.0.0")
        self.assertEqual(parse_listen("tcp:port=81", "10.0.0.1").port, 81)
        self.assertEqual(parse_listen("tcp6:8080", "127.0.0.1").interface, "::1")

    def test_ssl_reads_its_files_when_checked(self) -> None:
        folder = tempfile.mkdtemp(prefix="ooidx-listen-")  # not mktemp: under pytest it writes into the checkout
        self.addCleanup(shutil.rmtree, folder, True)
        key = os.path.join(folder, "key.pem")
        with open(key, "w") as f:
            f.write("not checked here: only readable")
        spec = parse_listen(f"ssl:8443:privateKey={key}", "127.0.0.1")
        self.assertTrue(spec.tls)
        self.assertEqual(spec.scheme, "https")
        self.assertIn("privateKey=", spec.description)
        missing = os.path.join(os.path.dirname(key), "absent.pem")
        with self.assertRaises(BadEndpoint) as caught:
            parse_listen(f"ssl:8443:privateKey={missing}", "127.0.0.1")
        self.assertIn("privateKey: cannot read", str(caught.exception))
        self.assertTrue(parse_listen(f"ssl:8443:privateKey={missing}", "127.0.0.1", read_files=False).tls)

    def test_bad_values_are_one_line_errors(self) -> None:
        for value, words in [
            ("udp:80", "an edge listens on a tcp, tcp6, ssl endpoint"),
            ("unix:/tmp/sock", "an edge listens on a tcp, tcp6, ssl endpoint"),
            ("tcp:99999", "0-65535, got 99999"),
            ("tcp:http", "0-65535"),
            ("tcp:80:bogus=1", "unknown option(s) bogus"),
            ("tcp:80:port=81", "the port is given twice"),
            ("tcp", "no port"),
            ("ssl:8443", "privateKey=PATH"),
            ("tcp:80:interface=example.org", "interface must be an IP address"),
            ("tcp6:80:interface=127.0.0.1", "IPv6"),
            ("tcp:80:backlog=0", "backlog"),
            ("", "expected a port number or an endpoint string"),
            (True, "expected a port number or an endpoint string"),
            (-1, "0-65535"),
        ]:
            with self.assertRaises(BadEndpoint, msg=repr(value)) as caught:
                parse_listen(value, "127.0.0.1")  # type: ignore[arg-type]
            self.assertIn(words, str(caught.exception), repr(value))
            self.assertNotIn("\n", str(caught.exception))


class BacklogTests(SynchronousTestCase):
    """A port listens with a backlog for a burst of clients: Twisted's default
    (50) made clients past the 50th of a burst of 500 wait 1-2 s for the
    kernel to retry their SYN (tests/reliability/test_load_500.py)."""

    def listened(self, value: object) -> tuple:
        reactor = MemoryReactor()
        listen_on(reactor, parse_listen(value, "127.0.0.1"), server.Site(resource.Resource()))  # type: ignore[arg-type]
        servers = reactor.tcpServers + reactor.sslServers
        self.assertEqual(len(servers), 1)
        return servers[0]

    def test_a_port_listens_with_the_default_backlog(self) -> None:
        self.assertGreaterEqual(DEFAULT_BACKLOG, 512)
        for value in (8080, "8080", "tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp6:8080"):
            port, _, backlog, _ = self.listened(value)[:4]
            self.assertEqual((port, backlog), (8080, DEFAULT_BACKLOG), value)

    def test_a_backlog_in_the_endpoint_string_is_kept(self) -> None:
        self.assertEqual(self.listened("tcp:8080:backlog=7")[2], 7)
        self.assertEqual(parse_listen("tcp:8080:backlog=7", "").backlog, 7)
        self.assertEqual(parse_listen("tcp:8080:backlog=7", "").endpoint, parse_listen("tcp:8080:backlog=7", "").description)

    def test_the_description_stays_as_configured(self) -> None:
        spec = parse_listen(8080, "127.0.0.1")
        self.assertEqual(spec.description, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(spec.endpoint, f"tcp:8080:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}")


class ConfigTests(SynchronousTestCase):
    def config(self, text: str) -> object:
        return parse("broker: memory://\ndata_dir: /nonexistent/data\n" + text, "etc/dx.yaml")

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.config(text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_endpoint_strings_in_the_config(self) -> None:
        config = self.config("http: {web_port: 'tcp:9090:interface=0.0.0.0', proxy_port: 'tcp:9100'}\n"
                             "components: {web: , proxyng: }\n")
        listeners = {l.component: (l.interface, l.port) for l in config.listeners()}  # type: ignore[attr-defined]
        self.assertEqual(listeners, {"web": ("0.0.0.0", 9090), "proxyng": ("127.0.0.1", 9100)})
        config = self.config("components: {web: {port: 'tcp:8181'}}\n")
        self.assertEqual(config.components["web"].options.port, "tcp:8181")  # type: ignore[attr-defined]

    def test_bad_endpoint_strings_are_refused_in_one_line(self) -> None:
        self.assertEqual(self.error("http: {web_port: 'udp:80'}\n"),
                         "etc/dx.yaml: http.web_port: an edge listens on a tcp, tcp6, ssl endpoint, got 'udp' "
                         "(e.g. tcp:8080:interface=127.0.0.1 or ssl:8443:privateKey=KEY.pem:certKey=CERT.pem)")
        self.assertEqual(self.error("components: {web: {port: 'ssl:8443:privateKey=/nonexistent/k.pem'}}\n"),
                         "etc/dx.yaml: components.web.port: privateKey: cannot read /nonexistent/k.pem: "
                         "No such file or directory")
        self.assertIn("port 9000 is also proxyng's port", self.error(
            "http: {web_port: 'tcp:9000', proxy_port: 9000}\ncomponents: {web: , proxyng: }\n"))

    def test_allowed_hosts(self) -> None:
        config = self.config("http: {allowed_hosts: [DX.example.org., '*.example.net', 10.0.0.5, '::1']}\n")
        self.assertEqual(config.http.allowed_hosts,  # type: ignore[attr-defined]
                         ("dx.example.org", "*.example.net", "10.0.0.5", "::1"))
        self.assertEqual(self.error("http: {allowed_hosts: ['dx.example.org:8080']}\n"),
                         "etc/dx.yaml: http.allowed_hosts[0]: expected a host name, *.domain or IP address "
                         "(no port), got 'dx.example.org:8080'")
        self.assertIn("expected a list of host names", self.error("http: {allowed_hosts: dx.example.org}\n"))
