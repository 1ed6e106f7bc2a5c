"""What both runs of the attribute store's tests use: the store on a
memory:// bus (L{Stack}, on SQLite in the fast tier,
tests/fast/core/test_attribute_store.py, and on PostgreSQL in
tests/ooidx/test_attribute_store.py), a client of it over the bus or by
direct calls, the failure of a call as (type, message), and the values tried."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Tuple

from twisted.internet import defer

import magnet
from magnet import RemoteError

from ooidx.attribute_store import AttributeStore

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


class Stack:
    """An attribute store at C{url} (table C{table}) on a memory:// bus of its own, on C{clock}."""

    def __init__(self, clock: Any, url: str, table: str) -> None:
        self.url, self.table, self.clock = url, table, clock
        self.bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", clock, rpc_timeout=10)
        self.store = self.make_store()

    def make_store(self) -> AttributeStore:
        return AttributeStore("attribute_store", self.bus, node="n1", url=self.url, table=self.table, clock=self.clock)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield self.store.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.store.stopService()
        yield self.bus.stopService()

    def client(self, via: str) -> Callable[..., defer.Deferred]:
        """op(name, **kwargs) -> Deferred, over the bus (C{via="bus"}) or straight to the component."""
        if via == "bus":
            def over_bus(op: str, **kwargs: Any) -> defer.Deferred:
                return self.bus.call("attribute_store", op, **kwargs)
            return over_bus

        def direct(op: str, **kwargs: Any) -> defer.Deferred:
            return defer.maybeDeferred(getattr(self.store, op), **kwargs)
        return direct


async def error_of(d: defer.Deferred) -> Tuple[str, str]:
    """(type name, message) of the failure, whether it crossed the bus or not."""
    try:
        result = await d
    except RemoteError as e:
        return e.remote_type, e.message
    except Exception as e:
        return type(e).__name__, str(e)
    raise AssertionError(f"expected a failure, got {result!r}")


VALUES = [
    {"name": "sst", "url": "http://host/opendap/sst.nc", "status": "registered", "size": 0, "refresh": None},
    [1, 2.5, "three", None, True, {"x": []}],
    "plain text",
    "ünïcødé ✓ 海",
    42,
    -1.5e300,
    True,
    None,
    {},
    {"nested": {"deep": {"deeper": [[[]]]}}},
]
