"""The web edge over real HTTP on loopback: a memory:// bus, the topology
declared, a fetcher started, and a Web component on port 0 whose daemon is a
stand-in providing health() and cluster_status()."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectError
from twisted.web.client import HTTPConnectionPool

import magnet

from ooidx.node.bootstrap import declare_topology, make_component
from ooidx.component import Component
from ooidx.config import load
from ooidx.node.metrics import PrometheusObserver, renderer_for
from ooidx.node.token import TOKEN_FILE
from ooidx.web.app import MAX_BODY, Web, ping_components

from tests.support.doubles import CallTarget

TOKEN = "test-token-" + "x" * 20


class FakeDaemon(MultiService):
    """What the web edge asks of the daemon."""

    def __init__(self) -> None:
        super().__init__()
        self.ok = True
        self.status_calls: List[float] = []

    def health(self) -> Dict[str, Any]:
        return {"ok": self.ok, "broker": "up" if self.ok else "down",
                "components": {"fetcher": True, "web": True, "cache": False}}

    def cluster_status(self, timeout: float = 1.5) -> defer.Deferred:
        self.status_calls.append(timeout)
        return task.deferLater(reactor, 0, lambda: [
            {"node": "node-a", "pid": 123, "broker": "up",
             "components": {"fetcher": {"started": True, "instances": 2, "process": "inline"}}},
        ])


class Stack:
    def __init__(self) -> None:
        self.observer = PrometheusObserver()
        self.bus = magnet.connect(f"memory://web-{uuid.uuid4().hex}", reactor, observer=self.observer,
                                  rpc_timeout=5)
        self.daemon = FakeDaemon()
        self.fetcher = Component("fetcher", self.bus, node="node-a")
        self.web = Web("web", self.bus, node="node-a", port=0, interface="127.0.0.1", token=TOKEN,
                       metrics=renderer_for(self.bus))
        self.web.setServiceParent(self.daemon)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.fetcher.start()
        yield self.bus.serve("attribute_store", CallTarget(reactor))
        yield self.web.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.web.stopService()
        yield self.fetcher.stopService()
        yield self.bus.stopService()
        yield self.pool.closeCachedConnections()

    def url(self, path: str) -> str:
        return self.web.url + path

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, *, token: Optional[str] = TOKEN,
                headers: Optional[Dict[str, str]] = None) -> Any:
        """(status, headers, body bytes)."""
        h = dict(headers or {})
        if token is not None:
            h.setdefault("Authorization", f"Bearer {token}")
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        response = yield treq.request(method, self.url(path), data=body, headers=h, pool=self.pool)
        content = yield response.content()
        return response.code, response.headers, content

    @defer.inlineCallbacks
    def call(self, service: str, op: str, body: Any = None, **kw: Any) -> Any:
        """(status, decoded JSON) of POST /api/call/SERVICE/OP."""
        code, headers, content = yield self.request("POST", f"/api/call/{service}/{op}", body, **kw)
        assert headers.getRawHeaders("Content-Type") == ["application/json"], content
        return code, json.loads(content)


@pytest_twisted.async_yield_fixture
async def stack() -> Any:
    s = Stack()
    await s.start()
    yield s
    await s.stop()


def error_of(answer: Any) -> tuple:
    assert set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"type", "message"}, answer
    return answer["error"]["type"], answer["error"]["message"]


# --------------------------------------------------------------------------- #
# /healthz, /metrics, /api/status


@pytest_twisted.ensureDeferred
async def test_healthz_follows_the_daemon(stack: Stack) -> None:
    code, headers, body = await stack.request("GET", "/healthz", token=None)
    assert code == 200
    assert headers.getRawHeaders("Content-Type") == ["application/json"]
    assert json.loads(body)["ok"] is True
    stack.daemon.ok = False
    code, _, body = await stack.request("GET", "/healthz", token=None)
    assert code == 503
    assert json.loads(body) == {"ok": False, "broker": "down",
                                "components": {"fetcher": True, "web": True, "cache": False}}


@pytest_twisted.ensureDeferred
async def test_healthz_head_has_no_body(stack: Stack) -> None:
    code, _, body = await stack.request("HEAD", "/healthz", token=None)
    assert (code, body) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_healthz_when_health_fails_is_503(stack: Stack) -> None:
    def broken() -> Any:
        raise RuntimeError("daemon in pieces")
    stack.daemon.health = broken  # type: ignore[method-assign]
    code, _, body = await stack.request("GET", "/healthz", token=None)
    assert code == 503
    assert json.loads(body) == {"ok": False, "error": "daemon in pieces"}


@pytest_twisted.ensureDeferred
async def test_metrics_in_prometheus_text_format(stack: Stack) -> None:
    code, _ = await stack.call("fetcher", "ping")
    assert code == 200
    code, headers, body = await stack.request("GET", "/metrics", token=None)
    assert code == 200
    assert headers.getRawHeaders("Content-Type")[0].startswith("text/plain; version=")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert found[("magnet_messages_out_total", (("name", "fetcher"),))] >= 1
    assert found[("magnet_messages_in_total", (("name", "fetcher"),))] >= 1
    assert found[("magnet_rpc_latency_seconds_count",
                  (("address", "fetcher"), ("op", "ping"), ("outcome", "ok")))] == 1
    assert found[("ooidx_component_up", (("component", "fetcher"),))] == 1
    assert found[("ooidx_component_up", (("component", "cache"),))] == 0
    for name in ("magnet_handler_errors", "magnet_inflight", "magnet_dead_letters"):
        assert f"# TYPE {name}" in body.decode()


@pytest_twisted.ensureDeferred
async def test_status_is_open_and_comes_from_the_daemon(stack: Stack) -> None:
    code, _, body = await stack.request("GET", "/api/status", token=None)
    assert code == 200
    assert json.loads(body)["nodes"][0]["node"] == "node-a"
    assert stack.daemon.status_calls == [1.5]


@pytest_twisted.ensureDeferred
async def test_status_without_a_daemon_pings_the_components(stack: Stack) -> None:
    stack.web.disownServiceParent()
    code, _, body = await stack.request("GET", "/api/status", token=None)
    assert code == 200
    nodes = json.loads(body)["nodes"]
    assert [(n["node"], n["pid"]) for n in nodes] == [("node-a", os.getpid())]
    assert sorted(nodes[0]["components"]) == ["fetcher"]  # the Store on attribute_store has no ping


# --------------------------------------------------------------------------- #
# POST /api/call: answers


@pytest_twisted.ensureDeferred
async def test_call_ping_reaches_the_component(stack: Stack) -> None:
    code, answer = await stack.call("fetcher", "ping")
    assert code == 200
    assert answer == {"result": {"component": "fetcher", "node": "node-a", "pid": os.getpid()}}


@pytest_twisted.ensureDeferred
async def test_call_passes_the_body_as_keyword_arguments(stack: Stack) -> None:
    args = {"s": "é", "n": 1.5, "l": [1, None, True], "o": {"k": "v"}}
    code, answer = await stack.call("attribute_store", "echo", args)
    assert (code, answer) == (200, {"result": args})
    code, answer = await stack.call("attribute_store", "echo", b"")  # empty body: no arguments
    assert (code, answer) == (200, {"result": {}})


@pytest.mark.parametrize("name", ["f", "address", "op", "timeout", "kwargs"])
@pytest_twisted.ensureDeferred
async def test_call_argument_names_that_the_layers_use_themselves_pass_through(stack: Stack, name: str) -> None:
    code, _, content = await stack.request("POST", "/api/call/attribute_store/echo?timeout=2", {name: 1})
    assert (code, json.loads(content)) == (200, {"result": {name: 1}})


@pytest_twisted.ensureDeferred
async def test_call_bytes_result_is_raw(stack: Stack) -> None:
    code, headers, body = await stack.request("POST", "/api/call/attribute_store/raw", {})
    assert code == 200
    assert headers.getRawHeaders("Content-Type") == ["application/octet-stream"]
    assert body == b"\x00\x01binary\xff"


@pytest.mark.parametrize("service, op, body, status, kind", [
    ("attribute_store", "get", {"key": "missing"}, 502, "KeyError"),
    ("attribute_store", "nope", {}, 404, "UnknownOperation"),
    ("attribute_store", "_private", {}, 404, "UnknownOperation"),
    ("attribute_store", "get", {"wrong": 1}, 422, "BadArguments"),
    ("attribute_store", "refuse", {}, 403, "Forbidden"),  # the status /api/datasets answers it with
    ("nosuch", "ping", {}, 404, "UnknownService"),
])
@pytest_twisted.ensureDeferred
async def test_call_errors(stack: Stack, service: str, op: str, body: Any, status: int, kind: str) -> None:
    code, answer = await stack.call(service, op, body)
    assert code == status, answer
    assert error_of(answer)[0] == kind


@pytest_twisted.ensureDeferred
async def test_a_fanout_component_answers_ping(stack: Stack) -> None:
    """A fanout takes no calls: a fanout component answers its operations on
    its own worker queue (NAME.ops), where /api/call sends them (issue 18)."""
    notification = Component("notification", stack.bus, node="node-a")
    await notification.start()
    try:
        code, answer = await stack.call("notification", "ping")
        assert code == 200, answer
        assert answer["result"]["component"] == "notification" and answer["result"]["node"] == "node-a"
        nodes = await ping_components(stack.bus, timeout=2)
        assert "notification" in nodes[0]["components"], nodes
    finally:
        await notification.stopService()


@pytest_twisted.ensureDeferred
async def test_call_timeout_is_504(stack: Stack) -> None:
    # csv is declared (its queue holds the call) but nobody consumes it.
    code, headers, content = await stack.request("POST", "/api/call/csv/ping?timeout=0.3", {})
    assert code == 504
    assert error_of(json.loads(content))[0] == "Timeout"


@pytest.mark.parametrize("error, status", [
    (magnet.ConnectionLost("link down"), 503),
    (magnet.NotConnected("no broker"), 503),
    (magnet.NotConfirmed("nack"), 503),
    (magnet.Timeout("slow"), 504),
    (magnet.Unroutable("nobody"), 404),
    (magnet.RemoteError("ValueError", "bad value"), 502),
    (magnet.RemoteError("Forbidden", "loopback refused"), 403),
    (magnet.RemoteError("UnknownDataset", "no dataset named 'x'"), 404),
    (magnet.RemoteError("InvalidURL", "not http"), 400),
    (magnet.RemoteError("UpstreamTimeout", "slow upstream"), 504),
    (RuntimeError("a bug"), 500),
])
@pytest_twisted.ensureDeferred
async def test_call_error_statuses(stack: Stack, error: Exception, status: int) -> None:
    stack.bus.call_with = lambda *a, **kw: defer.fail(error)  # type: ignore[method-assign]
    code, answer = await stack.call("fetcher", "ping")
    assert code == status
    kind, message = error_of(answer)
    if status == 500:
        assert "a bug" not in message  # no internals to the caller
    else:
        assert kind == getattr(error, "remote_type", type(error).__name__)


# --------------------------------------------------------------------------- #
# POST /api/call: malformed input


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token-wrong-token"},
    {"Authorization": "Bearer " + TOKEN + "x"},
    {"Authorization": "Bearer " + TOKEN[:-1]},
    {"Authorization": "Basic " + TOKEN},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer"},
])
@pytest_twisted.ensureDeferred
async def test_call_needs_the_token(stack: Stack, headers: Dict[str, str]) -> None:
    code, h, content = await stack.request("POST", "/api/call/fetcher/ping", {}, token=None, headers=headers)
    assert code == 401
    assert h.getRawHeaders("WWW-Authenticate") == ['Bearer realm="ooidx"']
    kind, message = error_of(json.loads(content))
    assert kind == "Unauthorized"
    assert TOKEN not in message


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"a": NaN}', "not valid JSON"),
    (b"[1, 2]", "not an array"),
    (b'"text"', "not a string"),
    (b"null", "not null"),
    (b"42", "not a number"),
    (b"[" * 100000 + b"]" * 100000, ""),
])
@pytest_twisted.ensureDeferred
async def test_call_bad_body_is_400(stack: Stack, body: bytes, fragment: str) -> None:
    code, answer = await stack.call("fetcher", "ping", body)
    assert code == 400
    kind, message = error_of(answer)
    assert kind == "BadRequest"
    assert fragment.replace("not an array", "an array").replace("not a ", "a ").replace("not null", "null") \
        in message


@pytest.mark.parametrize("path", [
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
    "/api/call/fetcher/ping?timeout=nan",
    "/api/call/fetcher/ping?timeout=-1",
    "/api/call/fetcher/ping?timeout=100000",
])
@pytest_twisted.ensureDeferred
async def test_call_bad_names_are_400(stack: Stack, path: str) -> None:
    code, _, content = await stack.request("POST", path, {})
    assert code == 400, content
    assert error_of(json.loads(content))[0] == "BadRequest"


@pytest.mark.parametrize("path", ["/api/call/fetcher", "/api/call/fetcher/ping/more"])
@pytest_twisted.ensureDeferred
async def test_call_wrong_shape_is_404(stack: Stack, path: str) -> None:
    code, _, content = await stack.request("POST", path, {})
    assert code == 404
    assert error_of(json.loads(content))[0] == "NotFound"


@pytest.mark.parametrize("size", [MAX_BODY + 1, 2 * MAX_BODY])
@pytest_twisted.ensureDeferred
async def test_call_huge_body_is_413(stack: Stack, size: int) -> None:
    body = b'{"x": "' + b"a" * (size - 9) + b'"}'
    assert len(body) == size
    code, answer = await stack.call("attribute_store", "echo", body)
    assert code == 413
    assert error_of(answer)[0] == "PayloadTooLarge"


@pytest_twisted.ensureDeferred
async def test_call_body_at_the_limit_is_taken(stack: Stack) -> None:
    body = b'{"x": "' + b"a" * (MAX_BODY - 9) + b'"}'
    assert len(body) == MAX_BODY
    code, answer = await stack.call("attribute_store", "echo", body)
    assert code == 200
    assert len(answer["result"]["x"]) == MAX_BODY - 9


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/api/call/fetcher/ping", "POST"),
    ("PUT", "/api/call/fetcher/ping", "POST"),
    ("DELETE", "/api/call/fetcher/ping", "POST"),
    ("POST", "/healthz", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"),
    ("POST", "/api/status", "GET"),
])
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405(stack: Stack, method: str, path: str, allow: str) -> None:
    code, headers, content = await stack.request(method, path, b"{}")
    assert code == 405
    assert headers.getRawHeaders("Allow") == [allow]
    assert error_of(json.loads(content))[0] == "MethodNotAllowed"


@pytest.mark.parametrize("path", ["/static/nope", "/nope", "/api", "/api/", "/api/call", "/healthz/", "/api/status/x",
                                  "//healthz", "/%00"])
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(stack: Stack, path: str) -> None:
    code, headers, content = await stack.request("GET", path)
    assert code == 404
    assert headers.getRawHeaders("Content-Type") == ["application/json"]
    assert error_of(json.loads(content))[0] == "NotFound"


# --------------------------------------------------------------------------- #
# lifecycle and config


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_port(stack: Stack) -> None:
    url = stack.url("/healthz")
    await stack.web.stopService()
    with pytest.raises(ConnectError):
        await treq.get(url, pool=stack.pool)


def write_config(tmp_path: Any, text: str) -> str:
    path = tmp_path / "dx.yaml"
    path.write_text("broker: memory://\ndata_dir: data\n" + text)
    return str(path)


def test_listen_address_from_config(tmp_path: Any) -> None:
    bus = magnet.connect("memory://listen-address", reactor)
    config = load(write_config(tmp_path, "http: {web_port: 9999, interface: 0.0.0.0}\ncomponents: {web: }\n"))
    web = Web.from_config("web", bus, config, node="n")
    assert (web.port, web._interface) == (9999, "0.0.0.0")
    config = load(write_config(tmp_path, "http: {web_port: 9999}\ncomponents: {web: {port: 8181, interface: '::1'}}\n"))
    web = Web.from_config("web", bus, config, node="n")
    assert (web.port, web._interface) == (8181, "::1")
    assert (Web.from_config("web", bus, config, node="n", port=0).port) == 0


@pytest_twisted.ensureDeferred
async def test_token_made_in_data_dir_when_not_configured(tmp_path: Any) -> None:
    config = load(write_config(tmp_path, "components: {web: {port: 0}}\n"))
    bus = magnet.connect(f"memory://web-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
    bus.startService()
    fetcher = Component("fetcher", bus, node="n")
    web = make_component("web", bus, node="n", instances=1, config=config, reactor=reactor)
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        await fetcher.start()
        await web.start()
        token = open(os.path.join(config.data_dir, TOKEN_FILE)).read().strip()
        url = web.url + "/api/call/fetcher/ping"
        good = await treq.post(url, b"{}", headers={"Authorization": f"Bearer {token}"}, pool=pool)
        assert good.code == 200
        await good.content()
        bad = await treq.post(url, b"{}", headers={"Authorization": f"Bearer {TOKEN}"}, pool=pool)
        assert bad.code == 401
        await bad.content()
    finally:
        await web.stopService()
        await fetcher.stopService()
        await bus.stopService()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_port_in_use_fails_start() -> None:
    from twisted.internet.error import CannotListenError
    bus = magnet.connect("memory://port-in-use", reactor)
    first = Web("web", bus, node="n", port=0, token=TOKEN)
    await first.setUp()
    try:
        second = Web("web", bus, node="n", port=first.port, token=TOKEN)
        with pytest.raises(CannotListenError):
            await second.setUp()
    finally:
        await defer.maybeDeferred(first.tearDown)


@pytest.mark.parametrize("size, outcome", [(900, 200), (1001, 413), (15000, 413), (300000, "cut off")])
@pytest_twisted.ensureDeferred
async def test_chunked_body_limits(stack: Stack, size: int, outcome: Any) -> None:
    """Without a Content-Length the limit holds while the body arrives; a
    client that keeps sending far past it is cut off."""
    from io import BytesIO

    from twisted.web.client import Agent, FileBodyProducer, RequestTransmissionFailed, ResponseFailed
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import UNKNOWN_LENGTH

    small = Web("web", stack.bus, node="node-a", port=0, token=TOKEN, max_body=1000)
    await small.start()
    try:
        producer = FileBodyProducer(BytesIO(b'{"x": "' + b"a" * (size - 9) + b'"}'))
        producer.length = UNKNOWN_LENGTH  # sent chunked
        agent = Agent(reactor, pool=stack.pool)
        headers = Headers({"Authorization": [f"Bearer {TOKEN}"]})
        try:
            response = await agent.request(b"POST", (small.url + "/api/call/attribute_store/echo").encode(),
                                           headers, producer)
        except (ResponseFailed, RequestTransmissionFailed):
            assert outcome == "cut off"
            return
        body = await treq.content(response)
        assert response.code == outcome, body
    finally:
        await small.stopService()


# --------------------------------------------------------------------------- #
# where it listens (endpoint strings) and for whom (the Host allow-list)


@pytest_twisted.ensureDeferred
async def test_a_tls_web_port_answers_https_on_loopback(tmp_path: Any) -> None:
    """components.web.port as an ssl: endpoint string: the web port speaks
    https with the configured key and certificate (a throwaway CA's)."""
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    from tests.rabbitmq import TestCA

    ca = TestCA(tmp_path / "ca", name="ooidx web test CA")
    cert, key = ca.issue("web", hostnames=("127.0.0.1", "localhost"))
    config = load(write_config(tmp_path, f"components: {{web: {{port: 'ssl:0:privateKey={key}:certKey={cert}'}}}}\n"))
    bus = magnet.connect(f"memory://tls-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
    bus.startService()
    web = Web.from_config("web", bus, config, node="n", token=TOKEN, health=lambda: {"ok": True})
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        await web.start()
        assert web.url.startswith("https://127.0.0.1:") and web.port != 0
        with open(ca.cert_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
        response = await agent.request(b"GET", (web.url + "/healthz").encode())
        assert response.code == 200
        assert json.loads(await treq.content(response)) == {"ok": True}
        # plain http to the TLS port gets no answer
        with pytest.raises(Exception):
            plain = await treq.get(web.url.replace("https:", "http:") + "/healthz", pool=pool, timeout=5)
            await plain.content()
    finally:
        await web.stopService()
        await bus.stopService()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_dns_rebinding_is_refused(stack: Stack) -> None:
    """The attack: a page on evil.example rebinds its name to 127.0.0.1 and
    reads the web port as its own origin. The port answers only for its own
    names: any other Host gets 421 with a JSON error saying so."""
    code, headers, body = await stack.request("GET", "/api/status", token=None, headers={"Host": "evil.example"})
    assert code == 421, body
    error = json.loads(body)["error"]
    assert error["type"] == "MisdirectedRequest" and "'evil.example'" in error["message"]
    code, _, _ = await stack.request("GET", "/api/status", token=None,
                                     headers={"Host": f"evil.example:{stack.web.port}"})
    assert code == 421
    for host in (f"localhost:{stack.web.port}", f"127.0.0.1:{stack.web.port}"):
        code, _, body = await stack.request("GET", "/api/status", token=None, headers={"Host": host})
        assert code == 200, (host, body)


@pytest_twisted.ensureDeferred
async def test_allowed_hosts_from_the_config(tmp_path: Any) -> None:
    config = load(write_config(tmp_path, "http: {allowed_hosts: [dx.example.org]}\ncomponents: {web: {port: 0}}\n"))
    bus = magnet.connect(f"memory://hosts-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
    bus.startService()
    web = Web.from_config("web", bus, config, node="n", token=TOKEN, health=lambda: {"ok": True})
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        await web.start()
        for host, status in (("dx.example.org", 200), ("evil.example", 421)):
            response = await treq.get(web.url + "/healthz", headers={"Host": host}, pool=pool)
            assert response.code == status, host
            await response.content()
    finally:
        await web.stopService()
        await bus.stopService()
        await pool.closeCachedConnections()
