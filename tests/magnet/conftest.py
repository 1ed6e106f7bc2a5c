"""Fixtures for the behavioural suite that runs against both transports."""
from __future__ import annotations

import uuid
from typing import Any, Callable, List

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet


@pytest.fixture(params=["memory", "amqp"])
def transport_url(request: Any) -> str:
    """Each behavioural test runs once on the in-process broker and once on RabbitMQ."""
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex}"
    return request.getfixturevalue("broker_url")


@pytest.fixture
def names() -> Callable[[str], str]:
    """Unique queue and exchange names, so tests on the shared broker never collide."""
    made: List[str] = []

    def make(prefix: str = "q") -> str:
        name = f"test.{prefix}.{uuid.uuid4().hex[:10]}"
        made.append(name)
        return name

    make.made = made  # type: ignore[attr-defined]
    return make


@pytest.fixture
def make_bus(transport_url: str, names: Any) -> Any:
    """Start buses on the transport under test; stop them and delete test queues afterwards."""
    buses: List[magnet.Bus] = []

    def make(**options: Any) -> magnet.Bus:
        options.setdefault("rpc_timeout", 5.0)
        options.setdefault("send_timeout", 5.0)
        options.setdefault("shutdown_timeout", 2.0)
        options.setdefault("heartbeat", 5.0)
        bus = magnet.connect(transport_url, reactor, **options)
        bus.startService()
        buses.append(bus)
        return bus

    yield make

    @defer.inlineCallbacks
    def cleanup() -> Any:
        if buses:
            first = buses[0]
            if not first.running:
                first.startService()
            try:
                yield first.when_connected(5)
                for name in names.made:
                    for suffix in ("", ".dead"):
                        yield first.transport.delete_queue(name + suffix).addErrback(lambda _: None)
            finally:
                for bus in buses:
                    if bus.running:
                        yield bus.stopService()

    pytest_twisted.blockon(cleanup())
