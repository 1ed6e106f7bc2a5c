"""The topology of the original DX bootstrap, declared on the bus at start.

Every node declares the whole table, whatever it runs itself, so that any
node can send to any component the moment it is up: a message for a
component whose node is still starting waits in its durable queue instead of
being unroutable.
"""
from __future__ import annotations

from typing import Type

from twisted.internet.defer import Deferred, DeferredList

from magnet import Bus
from magnet.bus import WORKER

from ooidx.component import Component
from ooidx.wire import BUS_TABLE, BY_NAME, CONTROL_FANOUT

__all__ = ["declare_topology", "component_class", "CONTROL_FANOUT"]


def declare_topology(bus: Bus) -> Deferred:
    """Declare every worker queue and fanout of the table, and the control fanout."""
    ds = []
    for name, pattern in BUS_TABLE.items():
        ds.append(bus.declare_worker_queue(name) if pattern == WORKER else bus.declare_fanout(name))
    ds.append(bus.declare_fanout(CONTROL_FANOUT))
    return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallback(lambda _: None)


def component_class(name: str) -> Type[Component]:
    """The class that runs component C{name} (imported now, not before)."""
    import importlib
    module_name, _, class_name = BY_NAME[name].implementation.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
