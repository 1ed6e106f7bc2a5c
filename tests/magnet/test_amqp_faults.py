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


def _pika(url: str, work: Any) -> defer.Deferred:
    """C{work(channel)} on a pika connection of its own (a raw AMQP client, as an
    operator's tool would be), in a thread so the reactor keeps turning."""
    from twisted.internet.threads import deferToThread

    def run() -> Any:
        import pika
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            return work(connection.channel())
        finally:
            connection.close()

    return deferToThread(run).addTimeout(TIMEOUT, reactor)


def _queues_exist(url: str, *queues: str) -> defer.Deferred:
    def work(channel: Any) -> bool:
        import pika.exceptions
        for queue in queues:
            try:
                channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                return False
        return True

    return _pika(url, work)


@pytest_twisted.inlineCallbacks
def test_a_worker_queue_deleted_under_its_consumer_comes_back_with_its_dead_letter_queue(
        broker_url: str, buses: Any) -> Any:
    """`rabbitmqctl delete_queue fetcher` while work flows: the broker cancels
    the consumer; magnet declares the queue (and its dead-letter queue) again
    and consumes again within seconds, and the work flows again."""
    queue = f"test.deleted.{uuid.uuid4().hex[:10]}"
    worker, producer = buses(broker_url), buses(broker_url)
    yield worker.declare_worker_queue(queue)
    got: List[Any] = []
    yield worker.consume(queue, lambda m: got.append(m.json()))
    sent = {"n": 0, "refused": 0}

    def send() -> None:
        sent["n"] += 1
        d = producer.send(queue, Message.of_json(sent["n"]), timeout=5)
        d.addErrback(lambda f: sent.__setitem__("refused", sent["refused"] + 1))  # unroutable while it is gone

    flow = task.LoopingCall(send)
    flow.start(0.05)
    try:
        yield until(lambda: len(got) >= 5, "work flowing")
        yield _pika(broker_url, lambda ch: (ch.queue_delete(queue), ch.queue_delete(queue + ".dead")))
        deleted_at, before = reactor.seconds(), len(got)
        for _ in range(50):
            back = yield _queues_exist(broker_url, queue, queue + ".dead")
            if back:
                break
            yield settle(0.1)
        assert back, "the queue and its dead-letter queue declared again"
        yield until(lambda: len(got) >= before + 5, "work flowing again", timeout=10)
        assert reactor.seconds() - deleted_at < 10
        consumers = list(worker.transport._consumers.values())
        assert consumers and all(c.active for c in consumers)
    finally:
        if flow.running:
            flow.stop()
        yield worker.transport.delete_queue(queue)
        yield worker.transport.delete_queue(queue + ".dead")


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_memory_alarm_holds_sends_then_fails_them_naming_the_alarm(private_rabbitmq: Any, buses: Any) -> Any:
    """A broker low on memory blocks publishers (connection.blocked): a send
    waits at most operation_timeout and then fails with Blocked naming the
    alarm, never hangs; the consumers keep acking meanwhile; a send held when
    the alarm clears goes out and is delivered."""
    from twisted.internet.threads import deferToThread

    node = private_rabbitmq
    queue = f"test.alarm.{uuid.uuid4().hex[:10]}"
    bus = buses(node.url, operation_timeout=3, send_timeout=30)
    yield bus.declare_worker_queue(queue)
    got: List[Any] = []
    yield bus.consume(queue, lambda m: got.append(m.json()))
    yield bus.send_json(queue, "before")
    yield until(lambda: got == ["before"], "the first message")

    def alarm(on: bool) -> defer.Deferred:
        return deferToThread(node.ctl, "set_vm_memory_high_watermark", "0.0000001" if on else "0.4")

    yield alarm(True)
    try:
        # RabbitMQ blocks a connection (and says so) when it publishes during the alarm
        trigger = bus.send(queue, Message.of_json("trigger"), timeout=2)
        yield until(lambda: bus.transport._protocol is not None and bus.transport._protocol.blocked is not None,
                    "connection.blocked from the broker")
        assert "low on memory" in bus.transport._protocol.blocked
        with pytest.raises(magnet.Timeout) as unconfirmed:  # written before the block: not confirmed
            yield trigger
        assert "low on memory" in str(unconfirmed.value), unconfirmed.value
        started = reactor.seconds()
        with pytest.raises(magnet.Blocked) as refused:  # held, then refused after operation_timeout
            yield bus.send_json(queue, "refused")
        waited = reactor.seconds() - started
        assert 2.5 <= waited < 6, waited
        assert "low on memory" in str(refused.value) and "connection.blocked" in str(refused.value)
        with pytest.raises(magnet.Blocked):  # the bus's own send timeout first: still the alarm named
            yield bus.send(queue, Message.of_json("refused too"), timeout=1)
        held = bus.send_json(queue, "held")
        yield settle(0.5)
        assert not held.called
        yield alarm(False)
        yield held.addTimeout(TIMEOUT, reactor)
        # the trigger was in the broker's hands all along: it arrives too, before the held one
        yield until(lambda: got == ["before", "trigger", "held"], "the trigger and the held message delivered")
        assert bus.transport._protocol.blocked is None
    finally:
        yield alarm(False)
        yield bus.transport.delete_queue(queue)
        yield bus.transport.delete_queue(queue + ".dead")
