"""magnet over TLS (``amqps://``) against real RabbitMQ nodes of the tests' own.

The nodes (tests/rabbitmq.py, ``PrivateRabbitMQ(tls=True)``) listen for AMQP
over TLS with a server certificate for ``localhost`` / ``127.0.0.1`` from a
throwaway CA made at test time (``TestCA``, with the ``cryptography``
package); the CA is given to magnet the documented way, the URL's
``cacertfile=`` option. Refused links must fail with an error that says why
(TLS verification, hostname, not a TLS port) within their timeouts, and the
password must never show. The shared broker on 127.0.0.1:5672 is not used.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any, Dict, List
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

import magnet
from magnet import amqp
from magnet.amqp import AMQPTransport, parse_url
from magnet.errors import BadURL, NotConnected
from tests.magnet.waiting import TIMEOUT, until, wait
from tests.rabbitmq import (BrokerUnavailable, PrivateRabbitMQ, TestCA, amqp_answers, amqps_answers,
                            ensure_rabbitmq_server)

pytestmark = pytest.mark.rabbitmq

#: a user of the nodes' own, with a password that cannot be mistaken for anything else in a log
USER = "magnet-tls"
PASSWORD = "pw-" + uuid.uuid4().hex


def _start_node(prefix: str, **tls: Any) -> PrivateRabbitMQ:
    """A started private node with a TLS listener (*tls*: enable_tls options)
    and the USER; its directory is removed again if it does not start."""
    try:
        bindir = ensure_rabbitmq_server()
    except BrokerUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    tmpdir = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("OOIDX_TEST_TMP"))
    node = PrivateRabbitMQ(tmpdir=tmpdir, bindir=bindir, tls=tls or True)
    problem = None
    try:
        node.start()
        for args in (("add_user", USER, PASSWORD), ("set_permissions", USER, ".*", ".*", ".*")):
            r = node.ctl(*args)
            if r.returncode != 0:
                problem = f"rabbitmqctl {args[0]} failed: {r.stdout[-2000:]!r}"
                break
    except BrokerUnavailable as e:
        problem = str(e)
    except BaseException:
        node.remove()
        raise
    if problem:
        node.remove()
        pytest.fail(problem, pytrace=False)
    return node


@pytest.fixture(scope="module")
def node() -> Any:
    """A private node with a TLS listener (certificate for localhost and 127.0.0.1)."""
    n = _start_node("ooidx-tls-")
    try:
        yield n
    finally:
        n.remove()


def tls_url(node: PrivateRabbitMQ, port: Any = None, user: str = USER, password: str = PASSWORD,
            **options: str) -> str:
    """amqps:// URL of the node's TLS port (or *port*) with query *options*."""
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in options.items())
    return f"amqps://{user}:{quote(password, safe='')}@127.0.0.1:{port or node.tls_port}/" + (
        f"?{query}" if query else "")


class Logs:
    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        self.events.append(event)

    def texts(self) -> List[str]:
        out = []
        for e in self.events:
            out.append(formatEvent(e))
            failure = e.get("log_failure")
            if failure is not None:
                out.append(failure.getTraceback())
        return out


@pytest.fixture
def logs() -> Any:
    capture = Logs()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


@pytest.fixture
def make_transport() -> Any:
    """``make(url, **options)``: a started AMQPTransport; all are stopped afterwards."""
    made: List[AMQPTransport] = []

    def make(url: str, **options: Any) -> AMQPTransport:
        options.setdefault("heartbeat", 5.0)
        options.setdefault("operation_timeout", 10.0)
        options.setdefault("close_timeout", 2.0)
        options.setdefault("connect_timeout", 5.0)
        t = amqp.from_url(url, reactor, **options)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        pytest_twisted.blockon(wait(t.stop(), 10))


@pytest.fixture
def make_bus() -> Any:
    """``make(url, **options)``: a started Bus; all are stopped afterwards."""
    buses: List[magnet.Bus] = []

    def make(url: str, **options: Any) -> magnet.Bus:
        options.setdefault("rpc_timeout", 5.0)
        options.setdefault("send_timeout", 5.0)
        options.setdefault("shutdown_timeout", 2.0)
        options.setdefault("heartbeat", 5.0)
        bus = magnet.connect(url, reactor, **options)
        bus.startService()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        if bus.running:
            pytest_twisted.blockon(wait(bus.stopService(), 10))


def assert_no_password(logs: Logs, *errors: BaseException) -> None:
    texts = logs.texts() + [str(e) for e in errors] + [repr(e) for e in errors]
    leaks = [t for t in texts if PASSWORD in t or quote(PASSWORD, safe="") in t]
    assert not leaks, leaks[:3]


@defer.inlineCallbacks
def refused(make_transport: Any, url: str, seconds: float = 2.0, **options: Any) -> Any:
    """Start a transport on *url*, expect no link within *seconds*; returns
    (the NotConnected, seconds until the first failed attempt)."""
    options.setdefault("backoff", lambda attempt: 0.5)
    started = time.monotonic()
    t = make_transport(url, **options)
    first: List[float] = []

    def note() -> bool:
        if t.last_error and not first:
            first.append(time.monotonic() - started)
        return False

    poll = task.LoopingCall(note)
    poll.start(0.02)
    try:
        yield wait(t.when_connected(seconds), seconds + 5)
    except NotConnected as e:
        error = e
    else:
        raise AssertionError(f"{url} connected, but should have been refused")
    finally:
        poll.stop()
    assert not t.connected
    elapsed = time.monotonic() - started
    if not first and t.last_error:  # a refused login fails the wait at once (LoginRefused), before a poll
        first.append(elapsed)
    assert elapsed < seconds + 2, f"took {elapsed:.1f} s for a {seconds} s wait"
    assert first, "no attempt failed"
    return error, first[0]


@defer.inlineCallbacks
def broker_connections(node: PrivateRabbitMQ) -> Any:
    """The node's client connections as (user, ssl, ssl_protocol, peer_cert_subject) rows."""
    r = yield deferToThread(node.ctl, "list_connections", "user", "ssl", "ssl_protocol", "peer_cert_subject",
                            "--no-table-headers", "-q")
    assert r.returncode == 0, r.stdout[-2000:]
    rows = [line.split("\t") for line in r.stdout.decode().splitlines() if line.strip()]
    return rows


class Store:
    def __init__(self) -> None:
        self.data = {"a": 1}

    @magnet.operation
    def get(self, key: str) -> Any:
        return self.data[key]

    @magnet.operation
    def echo(self, text: str) -> str:
        return text


# -- the helper's TLS node ------------------------------------------------------


def test_private_node_tls_listener(node: PrivateRabbitMQ, tmp_path: Any) -> None:
    """The helper's node answers AMQP over TLS with a certificate its CA signed,
    for 127.0.0.1 and localhost, keeps its plain port, and is no one else's."""
    assert node.tls_port not in (5671, 5672, node.port)
    assert node.amqps_url == f"amqps://guest:guest@127.0.0.1:{node.tls_port}/"
    assert node.tls_answers()
    assert amqps_answers("127.0.0.1", node.tls_port, cafile=node.ca.cert_file)
    assert amqps_answers("127.0.0.1", node.tls_port, cafile=node.ca.cert_file, server_hostname="localhost")
    assert not amqps_answers("127.0.0.1", node.tls_port, cafile=node.ca.cert_file, server_hostname="other.example")
    other = TestCA(tmp_path, name="another CA")
    assert not amqps_answers("127.0.0.1", node.tls_port, cafile=other.cert_file)
    assert not amqps_answers("127.0.0.1", node.tls_port)  # the system's trust store does not know it
    assert amqp_answers("127.0.0.1", node.port)
    assert not amqp_answers("127.0.0.1", node.tls_port, timeout=1)
    conf = open(os.path.join(node.basedir, "rabbitmq.conf")).read()
    assert f"listeners.ssl.default = 127.0.0.1:{node.tls_port}" in conf
    assert "ssl_options.verify = verify_peer" in conf and "ssl_options.fail_if_no_peer_cert = false" in conf
    status = node.ctl("status")
    assert status.returncode == 0 and str(node.tls_port).encode() in status.stdout, status.stdout[-2000:]


# -- URL options (no broker) ----------------------------------------------------


def test_tls_url_options(tmp_path: Any) -> None:
    ca = TestCA(tmp_path, name="url CA")
    cert, key = ca.issue("client", ["magnet-client"], client=True)
    u = parse_url(f"amqps://u:{PASSWORD}@broker.example/dx?cacertfile={quote(ca.cert_file)}"
                  f"&certfile={quote(cert)}&keyfile={quote(key)}&server_name_indication=mq.example"
                  f"&verify=verify_peer&heartbeat=4")
    assert (u.cafile, u.certfile, u.keyfile, u.server_name, u.tls_name, u.heartbeat) == (
        ca.cert_file, cert, key, "mq.example", "mq.example", 4.0)
    assert parse_url(f"amqps://h/?cafile={quote(ca.cert_file)}").cafile == ca.cert_file
    assert parse_url("amqps://h/").tls_name == "h" and parse_url("amqps://h/").cafile is None
    assert PASSWORD not in u.masked() and PASSWORD not in repr(u)
    t = AMQPTransport(f"amqps://u:{PASSWORD}@127.0.0.1/?cacertfile={quote(ca.cert_file)}", reactor=reactor)
    assert PASSWORD not in repr(t)
    # a Bus takes it as it is (the daemon's config passes only the URL)
    assert magnet.connect(f"amqps://u:p@127.0.0.1/?cacertfile={quote(ca.cert_file)}", reactor).transport.urls[0].cafile

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad = {
        f"amqp://h/?cacertfile={quote(ca.cert_file)}": "needs an amqps:// URL",
        "amqps://h/?verify=verify_none": "always verifies",
        f"amqps://h/?keyfile={quote(key)}": "keyfile needs certfile",
        "amqps://h/?cacertfile=": "needs a value",
        "amqps://h/?cacert=x": "unknown option",
        f"amqps://u:{PASSWORD}@h/?cacertfile=/nonexistent/ca.pem": "cannot read it",
        f"amqps://h/?cacertfile={quote(str(garbage))}": "no PEM CERTIFICATE",
        f"amqps://h/?cacertfile={quote(ca.cert_file)}&certfile={quote(str(garbage))}": "no PEM CERTIFICATE",
        f"amqps://h/?certfile={quote(cert)}": "no PEM PRIVATE KEY",
        f"amqps://h/?certfile={quote(cert)}&keyfile={quote(ca.key_file)}": "does not belong to the certificate",
    }
    for url, why in bad.items():
        with pytest.raises(BadURL) as info:
            AMQPTransport(url, reactor=reactor)
        assert why in str(info.value), (url, str(info.value))
        assert PASSWORD not in str(info.value)
    with pytest.raises(BadURL, match="one way"):
        from twisted.internet.ssl import optionsForClientTLS
        AMQPTransport(f"amqps://h/?cacertfile={quote(ca.cert_file)}", reactor=reactor,
                      tls_options=optionsForClientTLS("h"))


# -- working links ----------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_rpc_and_worker_queue_over_tls(node: PrivateRabbitMQ, make_bus: Any) -> Any:
    """amqps://guest:guest@127.0.0.1:PORT/?cacertfile=CA: an RPC call and a
    confirmed worker-queue send/consume round trip, on links the broker sees
    as TLS."""
    url = node.amqps_url + "?cacertfile=" + quote(node.ca.cert_file, safe="")
    assert url.startswith(f"amqps://guest:guest@127.0.0.1:{node.tls_port}/?cacertfile=")
    server, client = make_bus(url), make_bus(url)
    yield wait(defer.gatherResults([server.when_connected(TIMEOUT), client.when_connected(TIMEOUT)]))

    name = f"tls.store.{uuid.uuid4().hex[:8]}"
    yield wait(server.serve(name, Store()))
    assert (yield wait(client.call(name, "get", key="a"))) == 1
    text = os.urandom(150_000).hex()  # several frames (and TLS records) each way
    assert (yield wait(client.call(name, "echo", text=text))) == text

    queue = f"tls.work.{uuid.uuid4().hex[:8]}"
    yield wait(client.declare_worker_queue(queue))
    got: List[int] = []
    done = defer.Deferred()

    def handle(message: magnet.Message) -> None:
        got.append(message.json()["n"])
        if len(got) == 20 and not done.called:
            done.callback(None)

    yield wait(server.consume(queue, handle))
    yield wait(defer.gatherResults([client.send_json(queue, {"n": i}) for i in range(20)]))
    yield wait(done)
    assert sorted(got) == list(range(20))

    rows = yield broker_connections(node)
    ours = [row for row in rows if row[0] == "guest"]  # (not a probe still being torn down)
    assert len(ours) >= 2, rows
    assert all(row[1] == "true" and row[2].startswith("tlsv1.") for row in ours), rows
    handle_ = client.transport._protocol.transport.getHandle()
    assert handle_.get_protocol_version_name().startswith("TLSv1."), handle_.get_protocol_version_name()


@pytest_twisted.inlineCallbacks
def test_client_certificate(node: PrivateRabbitMQ, make_transport: Any, tmp_path: Any) -> Any:
    """certfile= and keyfile=: the broker (verify_peer) sees the client's
    certificate; the ``cafile`` spelling of the CA option works too."""
    cert, key = node.ca.issue("client", ["magnet-client"], client=True, directory=str(tmp_path))
    t = make_transport(tls_url(node, cafile=node.ca.cert_file, certfile=cert, keyfile=key))
    yield wait(t.when_connected(TIMEOUT))
    rows = yield broker_connections(node)
    mine = [row for row in rows if row[0] == USER]
    assert mine and all(row[1] == "true" and "CN=magnet-client" in row[3] for row in mine), rows


# -- refused links: a clear error, in time, without the password -----------------


@pytest_twisted.inlineCallbacks
def test_no_ca_given_is_refused_naming_tls_verification(node: PrivateRabbitMQ, make_transport: Any,
                                                        logs: Logs) -> Any:
    """Without cacertfile the broker's certificate is checked against the
    system's trust store, which does not know the test CA: refused."""
    error, first = yield refused(make_transport, tls_url(node))
    text = str(error)
    assert "TLS verification failed" in text and "not trusted" in text, text
    assert "system's trust store" in text and "cacertfile=" in text, text
    assert first < 1.5, first
    assert any("TLS verification failed" in x for x in logs.texts() if "broker unreachable" in x)
    assert_no_password(logs, error)


@pytest_twisted.inlineCallbacks
def test_another_ca_is_refused(node: PrivateRabbitMQ, make_transport: Any, logs: Logs, tmp_path: Any) -> Any:
    other = TestCA(tmp_path, name="another CA")
    error, first = yield refused(make_transport, tls_url(node, cacertfile=other.cert_file))
    text = str(error)
    assert "TLS verification failed" in text and "not trusted" in text, text
    assert other.cert_file in text and "CN=localhost" in text, text
    assert first < 2.0, first
    assert_no_password(logs, error)


@pytest_twisted.inlineCallbacks
def test_hostname_mismatch_is_refused(node: PrivateRabbitMQ, make_transport: Any, logs: Logs) -> Any:
    """A certificate the CA signed, but not for the name asked for."""
    error, first = yield refused(make_transport, tls_url(node, cacertfile=node.ca.cert_file,
                                                         server_name_indication="mq.example.org"))
    text = str(error)
    assert "TLS verification failed" in text and "hostname mismatch" in text, text
    assert "'mq.example.org'" in text and "DNS:localhost" in text and "IP:127.0.0.1" in text, text
    assert first < 2.0, first
    assert_no_password(logs, error)


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_certificate_for_another_host_and_a_required_client_certificate(make_transport: Any, logs: Logs,
                                                                        tmp_path: Any) -> Any:
    """A broker whose (trusted) certificate names only broker.example.org and
    which requires a client certificate (fail_if_no_peer_cert = true):
    amqps://127.0.0.1 is refused as a hostname mismatch;
    server_name_indication=broker.example.org passes that, but without a
    client certificate the broker refuses the link; with one it works."""
    other = _start_node("ooidx-tls-name-", hostnames=("broker.example.org",), fail_if_no_peer_cert=True)
    try:
        ca = other.ca.cert_file
        cert, key = other.ca.issue("client", ["magnet-client"], client=True, directory=str(tmp_path))
        error, _ = yield refused(make_transport, tls_url(other, cacertfile=ca, certfile=cert, keyfile=key))
        text = str(error)
        assert "hostname mismatch" in text and "'127.0.0.1'" in text and "DNS:broker.example.org" in text, text

        error, _ = yield refused(make_transport, tls_url(other, cacertfile=ca,
                                                          server_name_indication="broker.example.org"))
        text = str(error)
        assert "TLS refused by the broker" in text and "requires a client certificate" in text, text

        t = make_transport(tls_url(other, cacertfile=ca, server_name_indication="broker.example.org",
                                   certfile=cert, keyfile=key))
        yield wait(t.when_connected(TIMEOUT))
        yield wait(t.stop())
        assert_no_password(logs, error)
    finally:
        yield deferToThread(other.remove)


@pytest_twisted.inlineCallbacks
def test_amqps_to_the_plain_port_fails_within_the_connect_timeout(node: PrivateRabbitMQ, make_transport: Any,
                                                                  logs: Logs) -> Any:
    error, first = yield refused(make_transport, tls_url(node, port=node.port, cacertfile=node.ca.cert_file),
                                 connect_timeout=2.0)
    text = str(error)
    assert "TLS handshake failed" in text and "does not speak TLS" in text, text
    assert first < 2.0, first
    assert_no_password(logs, error)


@pytest_twisted.inlineCallbacks
def test_a_silent_port_fails_within_the_connect_timeout(node: PrivateRabbitMQ, make_transport: Any,
                                                        logs: Logs) -> Any:
    """A port that accepts TCP and never says a word: the TLS handshake is
    bounded by connect_timeout, not by the (longer) setup timeout."""
    connections: List[Protocol] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:
            connections.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        error, first = yield refused(make_transport, tls_url(node, port=port.getHost().port,
                                                             cacertfile=node.ca.cert_file),
                                     seconds=3.0, connect_timeout=1.0, operation_timeout=30.0)
    finally:
        for c in connections:
            c.transport.abortConnection()
        yield port.stopListening()
    text = str(error)
    assert "TLS handshake" in text and "not finished within 1.0 s" in text, text
    assert 0.9 < first < 2.0, first
    assert connections
    assert_no_password(logs, error)


@pytest_twisted.inlineCallbacks
def test_wrong_password_over_tls(node: PrivateRabbitMQ, make_transport: Any, logs: Logs) -> Any:
    """TLS passes, the login does not: the broker's refusal (403) is the error."""
    wrong = "wrong-" + uuid.uuid4().hex
    error, _ = yield refused(make_transport, tls_url(node, password=wrong, cacertfile=node.ca.cert_file))
    text = str(error)
    assert "403" in text or "ACCESS_REFUSED" in text, text
    assert "TLS" not in text, text
    assert not any(wrong in x for x in logs.texts() + [text, repr(error)])
    assert_no_password(logs, error)


@pytest_twisted.inlineCallbacks
def test_bus_call_reports_the_tls_refusal(node: PrivateRabbitMQ, make_bus: Any, logs: Logs) -> Any:
    """What a caller of the Bus sees: a NotConnected that says why."""
    bus = make_bus(tls_url(node), send_timeout=2.0, rpc_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(NotConnected) as info:
        yield wait(bus.when_connected(2.0))
    assert time.monotonic() - started < 4
    assert "TLS verification failed" in str(info.value), str(info.value)
    assert_no_password(logs, info.value)


# -- reconnect ------------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_tls_link_reconnects_after_the_node_restarts(node: PrivateRabbitMQ, make_bus: Any, logs: Logs) -> Any:
    url = tls_url(node, cacertfile=node.ca.cert_file)
    server, client = make_bus(url), make_bus(url)
    name = f"tls.restart.{uuid.uuid4().hex[:8]}"
    yield wait(defer.gatherResults([server.when_connected(TIMEOUT), client.when_connected(TIMEOUT)]))
    yield wait(server.serve(name, Store()))
    assert (yield wait(client.call(name, "get", key="a"))) == 1

    ups: List[bool] = []
    client.transport.add_link_listener(ups.append)
    yield node.restart_async(kill=True)
    yield until(lambda: False in ups, 20, "the link to go down")
    yield wait(defer.gatherResults([server.when_connected(30), client.when_connected(30)]), 35)
    yield until(lambda: ups[-1] is True, 5, "the link listener to hear the link is up")
    assert (yield wait(client.call(name, "get", key="a"))) == 1
    rows = yield broker_connections(node)
    ours = [row for row in rows if row[0] == USER]
    assert len(ours) >= 2 and all(row[1] == "true" for row in ours), rows
    assert_no_password(logs)
