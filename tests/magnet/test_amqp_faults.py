"""What the bus does when RabbitMQ or a peer fails. AMQP only: these are
the faults the in-process broker cannot have.

Tests that stop or kill a broker use a private RabbitMQ node of their own
(tests/rabbitmq.py), never the shared one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import globalLogPublisher

import magnet
from magnet import Message, operation
from tests.rabbitmq import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.rabbitmq

TIMEOUT = 20


def settle(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def until(predicate: Any, what: str, timeout: float = TIMEOUT) -> defer.Deferred:
    """tests.support.waiting.eventually, with these tests' argument order."""
    return eventually(predicate, timeout, what, interval=0.1)


def fast_backoff(attempt: int) -> float:
    return 0.3


class Echo:
    @operation
    def echo(self, value: Any) -> Any:
        return value

    @operation
    def hang(self) -> defer.Deferred:
        return defer.Deferred()


@pytest.fixture
def buses() -> Any:
    made: List[magnet.Bus] = []

    def make(url: str, **options: Any) -> magnet.Bus:
        options.setdefault("heartbeat", 2)
        options.setdefault("backoff", fast_backoff)
        options.setdefault("rpc_timeout", 10)
        options.setdefault("send_timeout", 30)
        options.setdefault("shutdown_timeout", 2)
        bus = magnet.connect(url, reactor, **options)
        bus.startService()
        made.append(bus)
        return bus

    yield make
    for bus in made:
        if bus.running:
            pytest_twisted.blockon(bus.stopService().addTimeout(15, reactor))


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_broker_restart_during_traffic_loses_no_confirmed_message(private_rabbitmq: Any, buses: Any) -> Any:
    node = private_rabbitmq
    producer, worker, server = buses(node.url), buses(node.url), buses(node.url)
    links: List[bool] = []
    worker.transport.add_link_listener(links.append)
    yield producer.when_connected(TIMEOUT)
    yield producer.declare_worker_queue("jobs")
    yield server.serve("echo", Echo())
    processed: List[int] = []
    yield worker.consume("jobs", lambda m: processed.append(m.json()))
    confirmed: List[int] = []
    failed: List[Any] = []
    sending = [True]

    @defer.inlineCallbacks
    def produce() -> Any:
        n = 0
        while sending[0]:
            try:
                yield producer.send_json("jobs", n)
                confirmed.append(n)
            except magnet.MagnetError as e:
                failed.append((n, e))
            n += 1
            if n % 20 == 0:
                yield settle(0.01)

    producing = produce()
    yield until(lambda: len(processed) > 200, "traffic before the restart")
    hanging = producer.call("echo", "hang", timeout=60)
    hang_result: List[Any] = []
    hanging.addBoth(hang_result.append)
    yield settle(0.2)
    yield node.stop_async()
    # a call in flight fails fast with a clear error, not at its 60 s timeout
    yield until(lambda: hang_result, "the in-flight call to fail", timeout=10)
    assert isinstance(hang_result[0].value, magnet.ConnectionLost), hang_result[0]
    yield settle(1)
    yield node.start_async()
    yield until(lambda: len(processed) > len(confirmed) // 2 and links[-1:] == [True], "traffic after the restart",
                timeout=60)
    sending[0] = False
    yield producing.addTimeout(TIMEOUT, reactor)
    yield until(lambda: set(confirmed) <= set(processed), "every confirmed message processed", timeout=30)
    lost = set(confirmed) - set(processed)
    duplicates = len(processed) - len(set(processed))
    print(f"confirmed {len(confirmed)}, failed sends {len(failed)}, processed {len(processed)}, "
          f"duplicates {duplicates}, lost {len(lost)}")
    assert not lost
    assert False in links and links[-1] is True
    # the topology came back: RPC works again
    assert (yield producer.call("echo", "echo", value="after")) == "after"
    # sends that failed did so with a clear error, never silently
    for _, error in failed:
        assert isinstance(error, (magnet.ConnectionLost, magnet.NotConnected, magnet.Timeout)), error


@pytest_twisted.inlineCallbacks
def test_consumer_killed_mid_message_hands_it_to_another(broker_url: str, buses: Any) -> Any:
    queue = f"test.killed.{uuid.uuid4().hex[:10]}"
    bus = buses(broker_url)
    yield bus.declare_worker_queue(queue)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-m", "tests.magnet.slow_worker", broker_url, queue],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = yield _readline(child)
        assert line.strip() == "ready", child.stderr.read() if child.poll() is not None else line
        yield bus.send_json(queue, "the job")
        line = yield _readline(child)
        assert line.strip() == "got the job"
        got: List[Message] = []
        yield bus.consume(queue, lambda m: got.append(m))
        yield settle(0.5)
        assert got == [], "the job is held by the other consumer"
        os.kill(child.pid, signal.SIGKILL)
        yield until(lambda: got, "the job to come to the surviving consumer")
        assert got[0].json() == "the job"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        yield bus.transport.delete_queue(queue)
        yield bus.transport.delete_queue(queue + ".dead")


def _readline(child: subprocess.Popen) -> defer.Deferred:
    from twisted.internet.threads import deferToThread
    return deferToThread(child.stdout.readline).addTimeout(TIMEOUT, reactor)


class _Relay(protocol.Protocol):
    """One side of the stallable TCP proxy."""

    peer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.factory.proxy.stalled:
            return  # swallowed: a dead network, not a closed one
        if self.peer is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Any) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class StallableProxy:
    """A TCP proxy to the broker that a test can make go silent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.stalled = False
        self.port: Any = None

    def start(self) -> int:
        proxy = self

        class Server(_Relay):
            def connectionMade(self) -> None:
                self.pending: List[bytes] = []
                client_factory = protocol.ClientFactory()
                client_factory.proxy = proxy

                server = self

                class Client(_Relay):
                    def connectionMade(self) -> None:
                        self.peer = server
                        server.peer = self
                        for data in server.pending:
                            self.transport.write(data)

                client_factory.protocol = Client
                reactor.connectTCP("127.0.0.1", proxy.target_port, client_factory)

        factory = protocol.ServerFactory()
        factory.protocol = Server
        factory.proxy = proxy
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self.port.getHost().port


@pytest_twisted.inlineCallbacks
def test_heartbeats_notice_a_stalled_link_and_it_comes_back(broker_url: str, buses: Any) -> Any:
    from tests.rabbitmq import url_host_port
    host, port = url_host_port(broker_url)
    proxy = StallableProxy(port)
    proxy_port = proxy.start()
    try:
        url = broker_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy_port}")
        server = buses(broker_url)
        queue = f"test.hb.{uuid.uuid4().hex[:10]}"
        yield server.serve(queue, Echo())
        client = buses(url, heartbeat=1)
        links: List[bool] = []
        client.transport.add_link_listener(links.append)
        assert (yield client.call(queue, "echo", value=1)) == 1
        proxy.stalled = True
        started = reactor.seconds()
        call = client.call(queue, "echo", value=2, timeout=60)
        outcome: List[Any] = []
        call.addBoth(outcome.append)
        yield until(lambda: False in links, "the stall to be noticed", timeout=15)
        noticed = reactor.seconds() - started
        assert noticed < 5, f"a stalled link took {noticed:.1f} s to notice"
        yield until(lambda: outcome, "the call in flight to fail")
        assert isinstance(outcome[0].value, magnet.ConnectionLost)
        proxy.stalled = False
        yield until(lambda: links[-1] is True, "the link to come back", timeout=20)
        assert (yield client.call(queue, "echo", value=3)) == 3
        yield server.transport.delete_queue(queue)
        yield server.transport.delete_queue(queue + ".dead")
    finally:
        yield proxy.port.stopListening()


@pytest_twisted.inlineCallbacks
def test_broker_down_at_start_retries_and_logs_then_connects(private_rabbitmq_factory: Any, buses: Any) -> Any:
    node = private_rabbitmq_factory(start=False)
    logged: List[str] = []

    def observe(event: dict) -> None:
        from twisted.logger import formatEvent
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        bus = buses(node.url, operation_timeout=2, send_timeout=3)
        yield settle(2)
        assert not bus.transport.connected
        assert any("retrying" in line for line in logged), logged[-5:]
        assert not any(node.url.split("@")[0].split(":")[-1] + "@" in line for line in logged
                       if "guest:guest@" in line), "the password must not be logged"
        with pytest.raises((magnet.NotConnected, magnet.Timeout)):
            yield bus.send_json("anything", 1)
        yield node.start_async()
        yield bus.when_connected(30)
        listener = yield bus.listen()
        yield bus.send_json(listener.address, "hello")
        assert (yield listener.get(timeout=10)).json() == "hello"
    finally:
        globalLogPublisher.removeObserver(observe)
