"""The harness of magnet's fast tier: a L{MemoryBroker} per test, its buses
stopped at cleanup, what the bus logged kept for assertions."""
from __future__ import annotations

from typing import Any, List, Type

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from magnet import Bus, operation
from magnet.message import Message
from magnet.testing import MemoryBroker


class BusCase(SynchronousTestCase):
    """A test on one in-process broker, driven by its clock (C{self.clock})."""

    def setUp(self) -> None:
        self.broker = MemoryBroker()
        self.clock = self.broker.clock
        self.addCleanup(self.broker.stop)
        self.logged: List[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def bus(self, **options: Any) -> Bus:
        return self.broker.bus(**options)

    def flush(self) -> int:
        return self.broker.flush()

    def result(self, d: Deferred) -> Any:
        """Run deliveries to quiescence, then the result C{d} fired with."""
        self.flush()
        return self.successResultOf(d)

    def failure(self, d: Deferred, *types: Type[BaseException]) -> Failure:
        """Run deliveries to quiescence, then the failure C{d} fired with."""
        self.flush()
        return self.failureResultOf(d, *types)

    def log_texts(self) -> List[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.logged]


class Store:
    """A small service: a dict behind operations, and ways to fail."""

    def __init__(self) -> None:
        self.data: dict = {"a": 1}
        self.pending: List[Deferred] = []

    @operation
    def get(self, key: str) -> Any:
        return self.data[key]

    @operation
    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    @operation
    def raw(self, size: int) -> bytes:
        return bytes(range(256)) * (size // 256)

    @operation
    def later(self) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    @operation
    def unserializable(self) -> Any:
        return object()

    @operation
    def boom(self) -> Any:
        raise RuntimeError("boom")

    def not_exposed(self) -> str:
        return "secret"


def texts(messages: List[Message]) -> List[Any]:
    return [m.json() for m in messages]
