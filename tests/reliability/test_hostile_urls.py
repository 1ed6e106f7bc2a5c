"""Dataset names and URLs that try to make the exchange reach where it must
not, against a real `twistd -n ooidx` node (memory://, every component,
``allow_private`` false, only the pydap upstream's and a redirector's
loopback ports allowed):

- registering datasets and proxying absolute URIs at forbidden addresses in
  every spelling (loopback, 127.0.0.2, decimal / octal / hex / short IPv4,
  IPv6 and IPv4-mapped forms, ``localhost``, userinfo tricks, backslashes,
  file:// and gopher://);
- redirects from an allowed upstream to those addresses;
- people's webhooks at them; regexes of pathological size or construction;
- host names that resolve to them (a fake resolver, in process);
- every mutating endpoint without the operator token or with a wrong one.

Recording sockets on the forbidden addresses show that NO connection is
made to any of them, and a snapshot of the tree around the data directory
shows that no file is written outside it.
"""
from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ooidx import urlpolicy
from ooidx.errors import Forbidden, InvalidURL, UpstreamError
from tests.reliability.hostile_node import (Node, RecordingSocket, changed, raw_exchange, snapshot, start_node,
                                            status_of, stop_node, upstream_in)
from tests.reliability.results import record


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Redirector:
    """An allowed upstream whose every answer is a 302 to ?to=... (or to a fixed target per path)."""

    def __init__(self) -> None:
        targets: Dict[str, str] = {}
        self.targets = targets

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                key = self.path.split("?", 1)[0].rsplit("/", 1)[-1].split(".", 1)[0]
                self.send_response(302)
                self.send_header("Location", targets.get(key, "http://127.0.0.1:1/"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile-urls")
    recorders = [RecordingSocket("127.0.0.1"), RecordingSocket("127.0.0.2")]
    if _ipv6():
        recorders.append(RecordingSocket("::1", family=socket.AF_INET6))
    redirector = Redirector()
    up = upstream_in(root / "up")
    up.__enter__()
    (root / "node").mkdir()
    node = start_node(root / "node", "hurl",
                      upstream_port=up.port,
                      extra_security={"allow_hosts": [f"127.0.0.1:{up.port}", f"127.0.0.1:{redirector.port}"]})
    status, answer = node.register("sst", up.url("sst.nc"))
    assert status == 201, answer
    try:
        yield {"node": node, "recorders": recorders, "redirector": redirector, "upstream": up, "root": root}
    finally:
        stop_node(node)
        up.stop()
        redirector.close()
        for r in recorders:
            r.close()


def spellings(port: int, port2: int, port6: int) -> List[str]:
    """Forbidden targets, in every spelling a resolver or parser might accept."""
    p = port
    urls = [
        f"http://127.0.0.1:{p}/x.nc", f"http://2130706433:{p}/x.nc", f"http://0x7f000001:{p}/x.nc",
        f"http://0177.0.0.1:{p}/x.nc", f"http://0x7f.0.0.1:{p}/x.nc", f"http://127.1:{p}/x.nc",
        f"http://127.0.1:{p}/x.nc", f"http://017700000001:{p}/x.nc", f"http://127.000.000.001:{p}/x.nc",
        f"http://localhost:{p}/x.nc", f"http://LOCALHOST.:{p}/x.nc", f"http://localhost.localdomain:{p}/x.nc",
        f"http://[::ffff:127.0.0.1]:{p}/x.nc", f"http://[::ffff:7f00:1]:{p}/x.nc", f"http://[64:ff9b::7f00:1]:{p}/x.nc",
        f"http://[2002:7f00:1::]:{p}/x.nc", f"http://[::127.0.0.1]:{p}/x.nc",
        f"http://allowed@127.0.0.1:{p}/x.nc", f"http://127.0.0.1:{p}@example.org/x.nc",
        f"http://example.org@127.0.0.1:{p}/x.nc", f"http://example.org\\@127.0.0.1:{p}/x.nc",
        f"http://127.0.0.1:{p}\\.example.org/x.nc", f"http://127.0.0.1:{p}#@example.org/x.nc",
        f"http://127.0.0.1%2e:{p}/x.nc", f"http://127%2e0%2e0%2e1:{p}/x.nc", f"http://%31%32%37.0.0.1:{p}/x.nc",
        f"HTTP://127.0.0.1:{p}/x.nc", f"http:/127.0.0.1:{p}/x.nc", f"http:\\\\127.0.0.1:{p}/x.nc",
        f"http://0:{p}/x.nc", f"http://0.0.0.0:{p}/x.nc", f"http://127.0.0.2:{port2}/x.nc",
        f"http://127.0.0.2.nip.io:{port2}/x.nc", f"http://[::1]:{port6}/x.nc", f"http://[0:0:0:0:0:0:0:1]:{port6}/x.nc",
        f"http://[::1%25lo]:{port6}/x.nc", f"http://ip6-localhost:{port6}/x.nc",
        f"file:///etc/passwd", f"file://127.0.0.1/etc/passwd", f"gopher://127.0.0.1:{p}/_GET%20/", f"dict://127.0.0.1:{p}/",
        f"ftp://127.0.0.1:{p}/", f"https://127.0.0.1:{p}/x.nc", f"//127.0.0.1:{p}/x.nc", f"127.0.0.1:{p}/x.nc",
        f"http://127.0.0.1:{p}/x.nc\r\nHost: evil", f"http://127.0.0.1:{p}/x.nc\x00", f"http://１２７.０.０.１:{p}/x.nc",
        f"http://127。0。0。1:{p}/x.nc", f"http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ:{p}/x.nc", f"http://10.0.0.1:{p}/x.nc",
        f"http://169.254.169.254/latest/meta-data/", f"http://[fe80::1]:{p}/x.nc", f"http://192.168.1.1:{p}/",
    ]
    return urls


def _recorded(world: Dict[str, Any]) -> List[Any]:
    return [(r.host, r.port, c) for r in world["recorders"] for c in r.connections]


def _ports(world: Dict[str, Any]) -> Tuple[int, int, int]:
    rs = world["recorders"]
    return rs[0].port, rs[1].port, (rs[2].port if len(rs) > 2 else rs[0].port)


def test_register_and_proxy_forbidden_addresses(world: Dict[str, Any]) -> None:
    node: Node = world["node"]
    root: Path = world["root"]
    before = snapshot(root, skip=(node.data_dir, node.daemon.log_path, node.daemon.err_path))
    urls = spellings(*_ports(world))
    refused_register: Dict[int, int] = {}
    accepted: List[str] = []
    for i, url in enumerate(urls):
        status, answer = node.register(f"evil{i}", url)
        refused_register[status] = refused_register.get(status, 0) + 1
        if status < 400:
            accepted.append(url)
            # registered (a host name that resolves elsewhere?): asking for it must still not connect
            node.proxy_get(f"/datasets/evil{i}.das", timeout=30)
            node.api("POST", f"/api/datasets/evil{i}/refresh", {})
    proxied: Dict[Any, int] = {}
    for url in urls:
        raw = url.encode("utf-8", "replace").replace(b"\r\n", b"%0d%0a").replace(b"\x00", b"%00")
        answer = raw_exchange(node.proxy_port, b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                              timeout=30)
        s = status_of(answer)
        proxied[s] = proxied.get(s, 0) + 1
        assert s in (400, 403, 404, 414, 421, 502), (url, answer[:300])
    time.sleep(1)
    assert not _recorded(world), _recorded(world)
    # the by-name dataset through the proxy still works
    status, _, body = node.proxy_get("/datasets/sst.das")
    assert status == 200 and b"sst" in body
    after = snapshot(root, skip=(node.data_dir, node.daemon.log_path, node.daemon.err_path))
    assert not changed(before, after), changed(before, after)
    # a host name is checked when it is resolved (at fetch time), so it may be registered;
    # an address in any spelling never is
    assert all(urlpolicy.parse_url(url).ip is None for url in accepted), accepted
    record("hostile", "urls-forbidden-addresses", inputs_tried=2 * len(urls), errors=len(_recorded(world)),
           notes=f"{len(urls)} spellings of forbidden targets, registered ({refused_register}) and proxied as "
                 f"absolute URIs ({proxied}); {len(accepted)} host names registered (checked at resolution) and "
                 f"requested: no connection; connections to the recording sockets: {len(_recorded(world))}; "
                 f"files changed outside data_dir: 0")


def test_redirects_to_forbidden_addresses(world: Dict[str, Any]) -> None:
    node: Node = world["node"]
    red: Redirector = world["redirector"]
    urls = spellings(*_ports(world))
    statuses: Dict[Any, int] = {}
    for i, target in enumerate(urls):
        red.targets[f"r{i}"] = target
    status, answer = node.register("redir", f"http://127.0.0.1:{red.port}/data/", check=False)
    assert status == 201, answer
    for i in range(len(urls)):
        for path in (f"/datasets/redir.das", None):
            if path is None:
                answer = raw_exchange(node.proxy_port, f"GET http://127.0.0.1:{red.port}/data/r{i}.das HTTP/1.1\r\n"
                                      f"Host: x\r\nConnection: close\r\n\r\n".encode(), timeout=30)
                s = status_of(answer)
                statuses[s] = statuses.get(s, 0) + 1
                assert s in (403, 502), (urls[i], answer[:300])
    time.sleep(1)
    assert not _recorded(world), _recorded(world)
    record("hostile", "urls-redirects", inputs_tried=len(urls), errors=len(_recorded(world)),
           notes=f"an allowed upstream redirecting to each forbidden spelling: answers {statuses}; "
                 f"connections to the recording sockets: {len(_recorded(world))}")


def test_webhooks_and_regexes(world: Dict[str, Any]) -> None:
    node: Node = world["node"]
    status, person = node.api("POST", "/api/people", {"name": "mallory"})
    assert status == 201, person
    ptoken = person["token"]
    statuses: Dict[Any, int] = {}
    tried = 0
    for url in spellings(*_ports(world)):
        status, answer = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": ".*", "webhook": url},
                                  token=ptoken)
        tried += 1
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (400, 403), (url, status, answer)
    regexes = ["(a+)+$", "(a|aa)+$", "(.*a){20}", "a" * 5000, "(" * 500 + ")" * 500, "[", "\\", "(?P<x>a)(?P=x)",
               "(a)\\1", "(?=a)", "x{1000000}", "((a{100}){100}){100}", ".*" * 2000, "\x00", "\ud800"]
    regex_statuses: Dict[Any, int] = {}
    for regex in regexes:
        started = time.monotonic()
        status, answer = node.api("POST", "/api/subscriptions", {"kind": "datasets", "regex": regex}, token=ptoken)
        tried += 1
        regex_statuses[status] = regex_statuses.get(status, 0) + 1
        assert status in (201, 400, 413), (regex[:50], status, answer)
        assert time.monotonic() - started < 5
        status, answer = node.call("pub_sub", "subscribe", regex=regex, timeout=10)
        tried += 1
        assert status in (200, 400, 422, 502), (regex[:50], status, answer)
        from urllib.parse import quote
        status, answer = node.api("GET", f"/api/events?regex={quote(regex[:200].encode('utf-8', 'surrogatepass'), safe='')}", token=None)
        assert status in (200, 400), (regex[:50], status)
    # an event goes out: any regex accepted must route it in bounded time
    started = time.monotonic()
    status, _ = node.register("sst2", world["upstream"].url("sst.nc"))
    assert status == 201
    assert node.ping_all(["pub_sub", "user_pub_sub", "user_notification", "controller"]) == \
        {"pub_sub": 200, "user_pub_sub": 200, "user_notification": 200, "controller": 200}
    assert time.monotonic() - started < 20
    time.sleep(1)
    assert not _recorded(world), _recorded(world)
    record("hostile", "urls-webhooks-regexes", inputs_tried=tried, errors=len(_recorded(world)),
           notes=f"webhooks at forbidden targets: {statuses}; pathological regexes (people's): {regex_statuses}, "
                 f"and pub_sub.subscribe; the node kept routing")


MUTATIONS = [
    ("POST", "/api/datasets", {"name": "pwn", "url": "http://example.org/x.nc"}),
    ("DELETE", "/api/datasets/sst", None),
    ("POST", "/api/datasets/sst/refresh", {}),
    ("POST", "/api/call/controller/purge", {"name": "sst"}),
    ("POST", "/api/call/attribute_store/set", {"key": "dataset:sst", "value": {}}),
    ("POST", "/api/call/controller/ping", {}),
    ("POST", "/api/people", {"name": "eve"}),
    ("GET", "/api/people", None),
    ("DELETE", "/api/people/mallory", None),
    ("GET", "/api/user_subscriptions", None),
]


def test_operator_token_never_bypassed(world: Dict[str, Any]) -> None:
    node: Node = world["node"]
    wrong = [None, "", "wrong", node.token[:-1], node.token + "x", node.token.upper(), " " + node.token[1:],
             "\x00" + node.token, node.token[:8], "*", "null", "undefined"]
    tried = 0
    bypassed = []
    for method, path, body in MUTATIONS:
        for token in wrong:
            status, answer = node.api(method, path, body, token=token)
            tried += 1
            # a NUL in a header is refused by the HTTP parser itself (400), before anything runs
            if status != 401 and not (status == 400 and token and "\x00" in token):
                bypassed.append((method, path, token, status))
        for headers, query in [({"Authorization": f"Basic {node.token}"}, ""),
                               ({"Authorization": f"Token {node.token}"}, ""),
                               ({"X-Token": node.token}, ""), ({}, f"?token={node.token}"),
                               ({"X-HTTP-Method-Override": method}, ""),
                               ({"Authorization": "Bearer"}, ""), ({"Authorization": "Bearer  "}, ""),
                               ({"Cookie": f"token={node.token}"}, "")]:
            status, answer = node.api(method, path + query, body, token=None, headers=headers)
            tried += 1
            if status != 401:
                bypassed.append((method, path, headers, query, status))
    # a method the path does not take, on the mutating paths, never runs anything
    for method in ["PUT", "PATCH", "POST", "DELETE"]:
        status, _ = node.api(method, "/api/datasets/sst", {"url": "http://example.org"}, token=None)
        tried += 1
        if status not in (401, 405):
            bypassed.append((method, "/api/datasets/sst", status))
    status, answer = node.api("GET", "/api/datasets/sst", token=None)
    assert status == 200 and answer["dataset"]["status"] != "purged", answer
    status, answer = node.api("GET", "/api/datasets/pwn", token=None)
    assert status == 404, answer
    assert not bypassed, bypassed
    record("hostile", "urls-operator-token", inputs_tried=tried, errors=len(bypassed),
           notes=f"{len(MUTATIONS)} token-guarded endpoints x no/wrong/misplaced tokens: all 401; sst intact")


# --------------------------------------------------------------------------- #
# in process: the URL policy itself, and host names that resolve to forbidden addresses


@given(st.text(max_size=120) | st.builds(lambda a, b: a + b, st.sampled_from(["http://", "https://", "HTTP://",
                                                                                 "http://[", "http://a@"]),
                                           st.text(max_size=80)))
@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_check_url_never_allows_a_forbidden_literal(url: str) -> None:
    try:
        target = urlpolicy.check_url(url)
    except (InvalidURL, Forbidden):
        return
    assert target.scheme in ("http", "https")
    if target.ip is not None:
        assert urlpolicy.forbidden_reason(target.ip) is None, url


FAKE_DNS = {"evil.example": ["127.0.0.1"], "mixed.example": ["93.184.216.34", "127.0.0.1"],
            "v6.example": ["::1"], "mapped.example": ["::ffff:127.0.0.1"], "ten.example": ["10.1.2.3"],
            "junk.example": ["not-an-address"], "none.example": []}


@pytest_twisted.ensureDeferred
async def test_names_resolving_to_forbidden_addresses() -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import succeed
    from twisted.web.client import Agent

    with RecordingSocket("127.0.0.1") as recorder:
        resolved: List[str] = []

        def resolver(host: str, port: int) -> Any:
            resolved.append(host)
            return succeed(FAKE_DNS.get(host, ["127.0.0.1"]))

        factory = urlpolicy.PolicyEndpointFactory(reactor, resolver=resolver, timeout=5)
        agent = Agent.usingEndpointFactory(reactor, factory)
        outcomes = {}
        for host in FAKE_DNS:
            try:
                await agent.request(b"GET", f"http://{host}:{recorder.port}/x".encode())
                outcomes[host] = "connected"
            except Exception as e:  # noqa: BLE001 - the type is the outcome
                outcomes[host] = type(e).__name__
        assert not recorder.connections, (recorder.connections, outcomes)
        assert all(o in ("Forbidden", "UpstreamError") for o in outcomes.values()), outcomes
    record("hostile", "urls-fake-resolver", inputs_tried=len(FAKE_DNS), errors=0,
           notes=f"host names resolving to loopback/private/mixed/junk: {outcomes}; no connection")
