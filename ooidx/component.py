"""What every DX component is: a Twisted service that meets the bus under its name.

A worker-queue component serves its operations (methods marked with
L{magnet.operation}) on the queue of its name, with as many competing
consumers as the config's C{instances}. A fanout component subscribes to the
fanout of its name and gets every message sent to it, and serves its
operations on a worker queue of its own (C{NAME.ops}, L{ooidx.wire.operations_address}).
Either way it answers C{ping}, so the operator's C{ooidx call NAME ping} shows
which node answered.

Components that do real work subclass L{Component}, add operations, and
override L{setUp} / L{tearDown} for what they must open and close.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from magnet import Bus, Message, operation
from magnet.bus import FANOUT

from ooidx.config import Config, component_arguments
from ooidx.wire import BUS_TABLE, COMPONENTS, operations_address


class Component(Service):
    """One DX component on one node."""

    log = Logger()

    #: How many requests one consumer of this component's queue holds at once;
    #: None: the bus's (the config's C{prefetch}). A component whose requests
    #: last as long as a transfer says how many it runs at once.
    prefetch: Optional[int] = None

    def __init__(self, name: str, bus: Bus, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None) -> None:
        self.name = name
        self.bus = bus
        self.node = node
        self.instances = instances
        #: The reactor the component listens, connects and runs threads with,
        #: and its clock (C{callLater}, C{seconds}): the same object in a node;
        #: a test may pass a C{task.Clock} as C{clock} beside a real reactor.
        self.reactor = reactor if reactor is not None else (clock if clock is not None else bus.clock)
        self.clock = clock if clock is not None else self.reactor
        self.pattern = BUS_TABLE.get(name)
        self.started = False
        self._subscriptions: List[Any] = []

    @classmethod
    def from_config(cls, name: str, bus: Bus, config: Config, **kwargs: Any) -> "Component":
        """Component C{name} with the typed arguments the config gives it
        (L{ooidx.config.component_arguments}): what the node does, and a
        test's shorthand. C{kwargs} (node, instances, the reactor, test
        doubles) go to the constructor as they are."""
        return cls(name, bus, **{**component_arguments(config, cls.table_name() or name), **kwargs})

    @classmethod
    def table_name(cls) -> Optional[str]:
        """The name this class runs under in the component table (L{ooidx.wire}),
        whatever name an instance is given (tests give theirs queue names of
        their own); None for a class the table does not name."""
        for spec in COMPONENTS:
            if spec.implementation == f"{cls.__module__}:{cls.__qualname__}":
                return spec.name
        return None

    # lifecycle -----------------------------------------------------------------

    @inlineCallbacks
    def start(self) -> Any:
        """Open what the component needs, then begin taking messages. The
        daemon calls this (not startService) so that it can wait for it and
        stop the whole node if it fails."""
        yield maybeDeferred(self.setUp)
        if self.pattern == FANOUT:
            for _ in range(self.instances):
                self._subscriptions.append((yield self.bus.subscribe(self.name, self.on_fanout_message)))
            self._subscriptions.append((yield self.serve_operations()))
        elif self.pattern is not None:
            for _ in range(self.instances):
                self._subscriptions.append((yield self.bus.serve(self.name, self, prefetch=self.prefetch)))
        self.started = True
        self.log.info("{component} started on {node} ({instances} instance(s))",
                      component=self.name, node=self.node, instances=self.instances)

    def serve_operations(self) -> Deferred:
        """Serve this fanout component's operations (C{ping} ...) on a worker
        queue of its own (C{NAME.ops}): a fanout takes no calls. Fires with
        the subscription, for L{stopService} to cancel."""
        return self.bus.serve(operations_address(self.name), self)

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        self.started = False
        subscriptions, self._subscriptions = self._subscriptions, []
        d = DeferredList([s.cancel() for s in subscriptions], consumeErrors=True)
        d.addCallback(lambda _: maybeDeferred(self.tearDown))
        d.addErrback(lambda f: self.log.failure("stopping {component}", f, component=self.name))
        return d

    def setUp(self) -> Any:
        """Open stores, listeners, HTTP ports: whatever the component needs first."""

    def tearDown(self) -> Any:
        """Close what L{setUp} opened."""

    # on the bus ----------------------------------------------------------------

    def on_fanout_message(self, message: Message) -> Any:
        """A message sent to this component's fanout (fanout components only)."""
        self.log.debug("{component} got a {type} message", component=self.name, type=message.type)

    @operation
    def ping(self) -> dict:
        """Who answered: the component, its node and process."""
        return {"component": self.name, "node": self.node, "pid": os.getpid()}
