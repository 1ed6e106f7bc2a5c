"""The topology of the original DX bootstrap, declared on the bus at start.

Every node declares the whole table, whatever it runs itself, so that any
node can send to any component the moment it is up: a message for a
component whose node is still starting waits in its durable queue instead of
being unroutable.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Type

from twisted.internet.defer import Deferred, DeferredList

from magnet import Bus
from magnet.bus import WORKER

from ooidx.component import Component
from ooidx.config import Config
from ooidx.node import metrics, token
from ooidx.wire import BUS_TABLE, BY_NAME, CONTROL_FANOUT

__all__ = ["declare_topology", "component_class", "component_options", "make_component", "CONTROL_FANOUT"]


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


def component_options(name: str, bus: Bus, config: Any) -> Dict[str, Any]:
    """What the node passes to component C{name} beyond the common arguments:
    the web edge gets the operator token's reader and the /metrics renderer,
    so it needs nothing of the node's modules."""
    if name == "web":
        return {"token": partial(token.ensure_token, config), "metrics": metrics.renderer_for(bus, config)}
    return {}


def make_component(name: str, bus: Bus, *, node: str, instances: int, config: Config, reactor: Any) -> Component:
    """Component C{name} as a node runs it (the daemon inline, or a child
    process): the typed arguments the config gives it, and what the node
    itself hands it (L{component_options})."""
    cls = component_class(name)
    return cls.from_config(name, bus, config, node=node, instances=instances, reactor=reactor,
                           **component_options(name, bus, config))
