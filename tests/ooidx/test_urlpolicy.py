"""ooidx.urlpolicy: each security rule, with attempts to break it."""
from __future__ import annotations

import ipaddress
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent

from ooidx.errors import Forbidden, InvalidURL
from ooidx.urlpolicy import (PolicyEndpointFactory, check_address, check_registered, check_url, forbidden_reason,
                             host_allowed, is_under, parse_ip, parse_url)

from tests.ooidx import upstream_http as up

# --------------------------------------------------------------------------- #
# addresses


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.255.254", "::1",                       # loopback
    "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",   # RFC 1918
    "169.254.169.254", "fe80::1",                                # link-local (cloud metadata!)
    "fc00::1", "fd12:3456::1",                                   # unique local
    "fec0::1",                                                   # site-local
    "0.0.0.0", "::",                                             # unspecified
    "224.0.0.1", "239.255.255.250", "ff02::1",                   # multicast
    "240.0.0.1", "255.255.255.255",                              # reserved, broadcast
    "100.64.0.1",                                                # shared (CGNAT)
    "192.0.2.1", "198.51.100.1", "2001:db8::1",                  # documentation
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "64:ff9b::7f00:1", "64:ff9b::a00:1",                         # NAT64 of loopback / private
    "2002:7f00:1::1", "2002:a00:1::1",                           # 6to4 of loopback / private
    "::127.0.0.1",                                               # IPv4-compatible (deprecated)
])
def test_forbidden_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_global_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("host,address", [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("017700000001", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"), ("0", "0.0.0.0"), ("0x0a.0x00.0x00.0x01", "10.0.0.1"), ("10.1", "10.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"), ("[::1]", "::1"), ("fe80::1%eth0", "fe80::1"),
    ("0x", "0.0.0.0"),  # inet_aton reads a bare 0x as 0: refused as unspecified, the safe side
])
def test_numeric_host_forms(host: str, address: str) -> None:
    assert parse_ip(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.org", "1.2.3.4.5", "256.256.256.256.1", "08.0.0.1", "0x1g",
                                  "127.0.0.1x", "a.127.0.0.1"])
def test_not_addresses(host: str) -> None:
    assert parse_ip(host) is None


# --------------------------------------------------------------------------- #
# URLs


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://127.0.0.1:8080/x", "http://[::1]/", "http://localhost.:80/".replace(
        "localhost.", "127.0.0.1."),
    "http://2130706433/", "http://0x7f.1/", "http://0177.0.0.1/", "http://127.1/", "http://[::ffff:127.0.0.1]/",
    "http://10.0.0.1/", "http://172.16.0.1/", "http://192.168.0.1/", "http://169.254.169.254/latest/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://0.0.0.0/", "http://[::]/", "https://10.0.0.1/",
    "HTTP://127.0.0.1/",
])
def test_check_url_refuses_literal_forbidden_hosts(url: str) -> None:
    with pytest.raises(Forbidden):
        check_url(url)
    check_url(url, allow_private=True)  # the operator may allow them


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://example.org/x", "dict://example.org:11211/",
    "jar:http://example.org/!/", "javascript:alert(1)", "data:text/plain,hi", "//example.org/x", "example.org/x",
    "http:///x", "http://", "http://user:pw@example.org/", "http://user@example.org/",
    "http://example.org@127.0.0.1/", "http://exa mple.org/", "http://example.org:99999/", "http://example.org:0/",
    "http://example.org\\@127.0.0.1/", "http://example.org/\r\nX-Injected: 1", "", None, 42, b"http://example.org/",
])
def test_malformed_or_other_scheme(url: Any) -> None:
    with pytest.raises(InvalidURL):
        check_url(url, allow_private=True)


def test_parse_url() -> None:
    t = parse_url("http://Example.ORG./sst.nc.dds?u[0:1:1]")
    assert (t.scheme, t.host, t.port, t.ip) == ("http", "example.org", 80, None)
    t = parse_url("https://[2606:4700::1]:8443/x")
    assert (t.scheme, t.host, t.port) == ("https", "2606:4700::1", 8443)
    assert t.ip == ipaddress.ip_address("2606:4700::1")
    check_url("http://93.184.216.34/x")  # a global literal passes


# --------------------------------------------------------------------------- #
# allow_hosts


def test_allow_hosts_with_port_allows_that_port_only() -> None:
    hosts = ("127.0.0.1:8001",)
    check_url("http://127.0.0.1:8001/sst.nc", allow_hosts=hosts)
    for url in ("http://127.0.0.1:8002/", "http://127.0.0.1/", "http://[::1]:8001/", "http://10.0.0.1:8001/"):
        with pytest.raises(Forbidden):
            check_url(url, allow_hosts=hosts)


def test_allow_hosts_names_and_wildcards() -> None:
    assert host_allowed(("dap.example.org",), "DAP.example.org.", 80)
    assert host_allowed(("*.example.org",), "a.b.example.org", 443)
    assert not host_allowed(("*.example.org",), "example.org.evil.test", 80)
    assert not host_allowed(("*.example.org",), "notexample.org", 80)
    assert host_allowed(("[::1]:8080",), "::1", 8080)
    assert not host_allowed(("[::1]:8080",), "::1", 8081)
    # an entry for an address allows a name resolved to it (on that port)
    assert host_allowed(("127.0.0.1:8001",), "localhost", 8001, ipaddress.ip_address("127.0.0.1"))
    assert not host_allowed(("127.0.0.1:8001",), "localhost", 8001, ipaddress.ip_address("127.0.0.2"))
    # a numeric form of the allowed address is the same address
    assert host_allowed(("127.0.0.1:8001",), "2130706433", 8001)



@pytest.mark.parametrize("entry", ["dap.example.org:\u00b2", "[::1]:\u00b2", "10.0.0.1:\u0661\u0662"])
def test_allow_hosts_entry_with_a_non_ascii_digit_port_raises_nothing(entry: str) -> None:
    # found by fuzz/fuzz_url.py: "\u00b2".isdigit() is True and int("\u00b2") raised ValueError;
    # an entry whose port is not a number (the config refuses it) allows nothing
    host = entry.rpartition(":")[0].strip("[]")
    for port in (80, 2, 12):
        assert host_allowed((entry,), host, port) is False
    check_url("http://93.184.216.34/", allow_hosts=(entry,))
    if host != "dap.example.org":  # an address: check_url asks allow_hosts about it
        with pytest.raises(Forbidden):
            check_url(f"http://{'[::1]' if ':' in host else host}:12/", allow_hosts=(entry,))

def test_check_address() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    with pytest.raises(Forbidden, match="loopback"):
        check_address(loopback, "evil.test", 80)
    check_address(loopback, "evil.test", 80, allow_hosts=("evil.test",))
    check_address(loopback, "evil.test", 80, allow_private=True)
    check_address(ipaddress.ip_address("93.184.216.34"), "example.org", 80)


# --------------------------------------------------------------------------- #
# under a registered base URL (the controller's rule)

BASES = {"sst": "http://data.example.org/opendap/sst.nc", "argo": "http://data.example.org/opendap/argo/",
         "deep": "http://data.example.org/opendap/argo/deep.nc"}


@pytest.mark.parametrize("url,name", [
    ("http://data.example.org/opendap/sst.nc", "sst"),
    ("http://data.example.org/opendap/sst.nc.dds?sst[0:1:3]", "sst"),
    ("http://DATA.example.org:80/opendap/sst.nc.dods?time&time>10.0", "sst"),
    ("http://data.example.org/opendap/argo/float1.nc.das", "argo"),
    ("http://data.example.org/opendap/argo/deep.nc.dds", "deep"),  # the longest base wins
])
def test_check_registered(url: str, name: str) -> None:
    assert check_registered(url, BASES) == name


@pytest.mark.parametrize("url", [
    "http://data.example.org/opendap/sst.nc.evil",            # not a DAP suffix
    "http://data.example.org/opendap/sst.ncx.dds",            # a prefix of the name is not the name
    "http://data.example.org/opendap/",                       # above a base
    "https://data.example.org/opendap/sst.nc.dds",            # another scheme
    "http://data.example.org:8080/opendap/sst.nc.dds",        # another port
    "http://data.example.org.evil.test/opendap/sst.nc.dds",   # another host
    "http://elsewhere.org/x",
])
def test_check_registered_refuses(url: str) -> None:
    with pytest.raises(Forbidden):
        check_registered(url, BASES)


@pytest.mark.parametrize("url", [
    "http://data.example.org/opendap/sst.nc/../../secret",    # dot segments: a path check_path refuses,
    "http://data.example.org/opendap/argo/../admin",          # before any base is looked at
    "http://data.example.org/opendap/argo/%2e%2e/admin",
    "http://data.example.org/opendap/argo/..%2fadmin",
])
def test_check_registered_refuses_dot_segments_as_invalid(url: str) -> None:
    with pytest.raises(InvalidURL):
        check_registered(url, BASES)


def test_check_registered_allowed_host_and_private() -> None:
    assert check_registered("http://other.example.org/x.nc.dds", BASES, allow_hosts=("*.example.org",)) is None
    with pytest.raises(Forbidden):  # a registered base on loopback still needs allowing
        check_registered("http://127.0.0.1:8001/sst.nc.dds", {"l": "http://127.0.0.1:8001/sst.nc"})
    assert check_registered("http://127.0.0.1:8001/sst.nc.dds", [("l", "http://127.0.0.1:8001/sst.nc")],
                            allow_hosts=("127.0.0.1:8001",)) == "l"
    with pytest.raises(InvalidURL):
        check_registered("gopher://data.example.org/opendap/sst.nc", BASES)


def test_is_under_default_ports() -> None:
    assert is_under("http://h:80/a.nc.das", "http://h/a.nc")
    assert is_under("https://h/a.nc.das", "https://h:443/a.nc")
    assert not is_under("http://h/a.nc.das", "https://h/a.nc")


# --------------------------------------------------------------------------- #
# the endpoint factory: resolve once, check every address, connect to the checked one


class Resolver:
    def __init__(self, answers: Dict[str, List[List[str]]]) -> None:
        self.answers = answers
        self.asked: List[str] = []

    def __call__(self, host: str, port: int) -> defer.Deferred:
        self.asked.append(host)
        return defer.succeed(self.answers[host].pop(0))


@pytest.fixture
def servers() -> Any:
    site = up.make_site()
    web = reactor.listenTCP(0, site, interface="127.0.0.1")
    recorder = up.Recorder()
    rec = reactor.listenTCP(0, recorder, interface="127.0.0.1")
    yield {"web": web.getHost().port, "recorder": recorder, "rec": rec.getHost().port}
    pytest_twisted.blockon(defer.gatherResults([defer.maybeDeferred(web.stopListening),
                                                defer.maybeDeferred(rec.stopListening)]))


def agent(resolver: Any, **policy: Any) -> Agent:
    return Agent.usingEndpointFactory(reactor, PolicyEndpointFactory(reactor, resolver=resolver, timeout=5,
                                                                     **policy))


@pytest_twisted.inlineCallbacks
def test_name_resolving_to_loopback_refused_before_connecting(servers: Any) -> Any:
    rp = servers["rec"]
    resolver = Resolver({"evil.test": [["127.0.0.1"]], "mixed.test": [["93.184.216.34", "127.0.0.1"]],
                         "mapped.test": [["::ffff:127.0.0.1"]], "junk.test": [["not-an-address"]]})
    a = agent(resolver)
    before = len(servers["recorder"].connections)
    for host in ("evil.test", "mixed.test", "mapped.test"):
        with pytest.raises(Forbidden):
            yield a.request(b"GET", f"http://{host}:{rp}/".encode())
    with pytest.raises(Exception):
        yield a.request(b"GET", f"http://junk.test:{rp}/".encode())
    with pytest.raises(Forbidden):
        yield a.request(b"GET", f"http://2130706433:{rp}/".encode())
    assert len(servers["recorder"].connections) == before


@pytest_twisted.inlineCallbacks
def test_system_resolver_localhost_refused(servers: Any) -> Any:
    a = Agent.usingEndpointFactory(reactor, PolicyEndpointFactory(reactor, timeout=5))
    before = len(servers["recorder"].connections)
    with pytest.raises(Forbidden):
        yield a.request(b"GET", f"http://localhost:{servers['rec']}/".encode())
    assert len(servers["recorder"].connections) == before


@pytest_twisted.inlineCallbacks
def test_no_dns_rebinding_connects_to_the_checked_address(servers: Any) -> Any:
    """The resolver is asked once per connection; its first answer is what is checked and used.
    A rebinding resolver (second answer: somewhere else) is never asked again."""
    port = servers["web"]
    resolver = Resolver({"upstream.test": [["127.0.0.1"], ["10.9.9.9"]]})
    a = agent(resolver, allow_hosts=(f"upstream.test:{port}",))
    response = yield a.request(b"GET", f"http://upstream.test:{port}/host".encode())
    body = yield up.read_body(response)
    assert body == f"upstream.test:{port}".encode()  # the Host header keeps the name
    assert resolver.asked == ["upstream.test"]


@pytest_twisted.inlineCallbacks
def test_allowed_port_only(servers: Any) -> Any:
    a = agent(Resolver({}), allow_hosts=(f"127.0.0.1:{servers['web']}",))
    response = yield a.request(b"GET", f"http://127.0.0.1:{servers['web']}/small".encode())
    assert (yield up.read_body(response)) == up.SMALL_BODY
    before = len(servers["recorder"].connections)
    with pytest.raises(Forbidden):
        yield a.request(b"GET", f"http://127.0.0.1:{servers['rec']}/".encode())
    assert len(servers["recorder"].connections) == before


def test_endpoint_factory_refuses_other_schemes() -> None:
    from twisted.web.client import URI
    factory = PolicyEndpointFactory(reactor, resolver=Resolver({}))
    with pytest.raises(InvalidURL):
        factory.endpointForURI(URI.fromBytes(b"ftp://example.org/x"))

