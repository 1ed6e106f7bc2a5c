"""The component table of the original DX bootstrap, declared on the bus at start.

Every node declares the whole table, whatever it runs itself, so that any
node can send to any component the moment it is up: a message for a
component whose node is still starting waits in its durable queue instead of
being unroutable.
"""
from __future__ import annotations

from typing import Dict

from twisted.internet.defer import Deferred, DeferredList

from magnet import Bus
from magnet.bus import FANOUT, WORKER

#: component -> how it meets the bus. The attribute store is served as RPC on
#: a worker queue of its own name; the web page is an edge and has no queue.
COMPONENT_TABLE: Dict[str, str] = {
    "attribute_store": WORKER,
    "cache": WORKER,
    "controller": WORKER,
    "csv": WORKER,
    "fetcher": WORKER,
    "persister": WORKER,
    "proxyng": WORKER,
    "pub_sub": WORKER,
    "user_notification": WORKER,
    "user_pub_sub": WORKER,
    "distributor": FANOUT,
    "notification": FANOUT,
}

#: The fanout every daemon listens on for operator-wide requests (status).
CONTROL_FANOUT = "dx.control"


def declare_topology(bus: Bus) -> Deferred:
    """Declare every worker queue and fanout of the table, and the control fanout."""
    ds = []
    for name, pattern in COMPONENT_TABLE.items():
        ds.append(bus.declare_worker_queue(name) if pattern == WORKER else bus.declare_fanout(name))
    ds.append(bus.declare_fanout(CONTROL_FANOUT))
    return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallback(lambda _: None)
