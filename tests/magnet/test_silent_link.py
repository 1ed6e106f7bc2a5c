"""A producer bus whose link goes silent (a dead network), against RabbitMQ.

The cluster partition run (tests/reliability/test_faults_cluster.py) once saw
its producer bus (heartbeat 2 s, send timeout 5 s, linked to the node whose
AMQP port was then silenced) make no send for 40 s. Here the same bus and
the same load (five send loops, as faultlib.TaskProducer) go through a TCP
proxy to the shared broker that stops forwarding (faultlib.TcpFaultProxy,
C{stalled}: nothing is closed, nothing answers), with the broker itself as
the second URL. Every send settles within its timeout, the loops never stop
sending, the heartbeat drops the silent link, the bus links to the second
URL and sends there are confirmed.
"""
from __future__ import annotations

import uuid
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

import magnet
from magnet import Message
from tests.reliability.faultlib import TcpFaultProxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.rabbitmq

SEND_TIMEOUT = 5.0


class Loops:
    """Send loops like faultlib.TaskProducer's, recording how long each send took to settle."""

    def __init__(self, bus: magnet.Bus, queue: str, concurrency: int = 5, rate: float = 100.0,
                 body: bytes = b"x") -> None:
        self.bus = bus
        self.body = body
        self.queue = queue
        self.concurrency = concurrency
        self.rate = rate
        self.sent = 0
        self.in_flight: dict = {}
        self.settled: List[tuple] = []  # (began, took, error name or None)
        self._running = True
        self._loops = [defer.ensureDeferred(self._loop(i)) for i in range(concurrency)]

    async def _loop(self, i: int) -> None:
        interval = self.concurrency / self.rate
        while self._running:
            self.sent += 1
            began = reactor.seconds()
            self.in_flight[i] = began
            try:
                await self.bus.send(self.queue, Message(body=self.body))
                error = None
            except Exception as e:  # noqa: BLE001 - every outcome is recorded
                error = type(e).__name__
            del self.in_flight[i]
            took = reactor.seconds() - began
            self.settled.append((began, took, error))
            await task.deferLater(reactor, max(0.0, interval - took) if error is None else 0.2, lambda: None)

    def oldest_wait(self) -> float:
        now = reactor.seconds()
        return max((now - b for b in self.in_flight.values()), default=0.0)

    async def stop(self) -> None:
        self._running = False
        for d in self._loops:
            await d.addTimeout(SEND_TIMEOUT + 5, reactor)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("silent, body_size", [
    (False, 1),  # the proxy reads and holds everything: the bus's socket stays writable
    (True, 256 * 1024),  # the proxy reads nothing (as iptables DROP): the bus's socket buffers fill
], ids=["stalled", "silent-full-buffers"])
@pytest_twisted.ensureDeferred
async def test_sends_on_a_silent_link_settle_in_time_and_the_next_url_takes_them(
        broker_url: str, silent: bool, body_size: int) -> None:
    from tests.rabbitmq import url_host_port
    host, port = url_host_port(broker_url)
    proxy = TcpFaultProxy(port)
    bus = magnet.connect([proxy.url(broker_url), broker_url], reactor, node="silent-link", heartbeat=2,
                         send_timeout=SEND_TIMEOUT, rpc_timeout=10, shutdown_timeout=2, connect_timeout=2,
                         backoff=lambda attempt: 0.3)
    bus.startService()
    links: List[bool] = []
    bus.transport.add_link_listener(links.append)
    queue = f"test.silent.{uuid.uuid4().hex[:10]}"
    loops = None
    try:
        await bus.when_connected(20)
        assert bus.transport._protocol.url.port == proxy.port
        await bus.transport.declare_queue(queue, durable=False, auto_delete=False)
        loops = Loops(bus, queue, body=b"x" * body_size)
        await eventually(lambda: any(e is None for _, _, e in loops.settled), 20, "a send confirmed", interval=0.1)
        proxy.stalled = True
        proxy.silent = silent
        cut = reactor.seconds()
        worst = [0.0]

        def watch() -> bool:
            worst[0] = max(worst[0], loops.oldest_wait())
            assert worst[0] <= SEND_TIMEOUT + 2, (
                f"a send has waited {worst[0]:.1f} s (timeout {SEND_TIMEOUT} s); sent {loops.sent}, "
                f"in flight {loops.in_flight}, link {bus.transport!r}")
            return bool(links and links[-1] is True and False in links
                        and any(e is None and b > cut for b, _, e in loops.settled))

        await eventually(watch, 40, "a send confirmed on the next URL after the silence", interval=0.05)
        took = reactor.seconds() - cut
        assert bus.transport._protocol.url.port == port, bus.transport
        after = [x for x in loops.settled if x[0] > cut]
        assert all(t <= SEND_TIMEOUT + 2 for _, t, _ in after), after
        print(f"silent link: confirmed on the next URL {took:.1f} s after the cut; longest wait {worst[0]:.1f} s; "
              f"{len(after)} sends since, errors {sorted({e for _, _, e in after if e})}")
    finally:
        if loops is not None:
            await loops.stop()
        proxy.stalled = proxy.silent = False
        try:
            await bus.transport.delete_queue(queue)
        except Exception:  # noqa: BLE001 - cleanup
            pass
        await bus.stopService()
        proxy.close()
