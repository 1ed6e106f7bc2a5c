"""One component in a process of its own, supervised by its node's daemon.

    OOIDX_BROKER=amqp://... python -m ooidx.node.child --config etc/node-worker.yaml --component fetcher

The daemon spawns this for every instance of a ``process: child`` component
(under a L{twisted.runner.procmon.ProcessMonitor}) and passes the broker URL
in the environment (C{OOIDX_BROKER}), never on the command line, where
C{ps} would show its password. The child runs a bus and that one component
with one consumer, logs to stdout in the node's format (the daemon relays
those lines as they are), stops cleanly on SIGTERM (status 0), and stops by
itself if its daemon goes away. A failed start exits with status 1, and the
daemon restarts it with backoff. When the daemon serves /metrics it passes
C{PROMETHEUS_MULTIPROC_DIR}, and the child's metrics are counted in files
there that the daemon reads (L{ooidx.node.metrics}).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure

from ooidx.node.bootstrap import declare_topology
from ooidx.config import COMPONENTS, ConfigError, load
from ooidx.node.daemon import bus_for, metrics_observer
from ooidx.node.logs import make_observer
from ooidx.node.metrics import share_with_daemon
from ooidx.node.bootstrap import make_component

log = Logger(namespace="ooidx.node.child")


class ChildRunner:
    """The bus and one component, started and stopped with the reactor."""

    def __init__(self, config: Any, name: str, reactor: Any) -> None:
        self.config = config
        self.name = name
        self.reactor = reactor
        share_with_daemon()  # before the first metric is made
        self.bus = bus_for(config, reactor, metrics_observer())
        self.component: Any = None
        self.exit_code = 0
        self._starting: Optional[Deferred] = None
        self._parent = os.getppid()
        self._watch = LoopingCall(self._check_parent)
        self._watch.clock = reactor

    def start(self) -> None:
        self.bus.startService()
        self._starting = self._start()
        self._starting.addErrback(self._failed)
        self._watch.start(1.0, now=False)

    @inlineCallbacks
    def _start(self) -> Any:
        if not self.bus.transport.connected:
            yield self.bus.transport.when_connected(None)
        yield declare_topology(self.bus)
        self.component = make_component(self.name, self.bus, node=self.config.node, instances=1,
                                        config=self.config, reactor=self.reactor)
        self.component.startService()
        yield self.component.start()
        log.info("child process {pid} of {node} serving {component}", pid=os.getpid(), node=self.config.node,
                 component=self.name)

    def _failed(self, failure: Failure) -> None:
        from twisted.internet.defer import CancelledError
        if failure.check(CancelledError):
            return
        log.critical("component {component} failed to start: {reason}", component=self.name,
                     reason=failure.getErrorMessage() or failure.type.__name__)
        self.exit_code = 1
        self.reactor.callWhenRunning(self.reactor.stop)

    def _check_parent(self) -> None:
        if os.getppid() != self._parent:
            log.warn("the daemon (pid {pid}) is gone; stopping", pid=self._parent, component=self.name)
            self.reactor.stop()

    @inlineCallbacks
    def stop(self) -> Any:
        if self._watch.running:
            self._watch.stop()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        if self.component is not None and self.component.running:
            yield self.component.stopService()
        if self.bus.running:
            yield self.bus.stopService()
        log.info("child process {pid} stopped", pid=os.getpid(), component=self.name)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ooidx.node.child",
                                     description="Run one DX component (a child process of the daemon).")
    parser.add_argument("--config", required=True, help="the node's YAML config file")
    parser.add_argument("--component", required=True, choices=COMPONENTS, help="the component to run")
    parser.add_argument("--broker", default=None,
                        help="broker URL (default: OOIDX_BROKER, then the file; prefer the environment)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config, broker_override=args.broker)
    except ConfigError as e:
        print(f"ooidx.node.child: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([make_observer(config, sys.stdout, component=args.component)],
                                     redirectStandardIO=False)
    runner = ChildRunner(config, args.component, reactor)
    reactor.callWhenRunning(runner.start)
    reactor.addSystemEventTrigger("before", "shutdown", runner.stop)
    reactor.run()
    return runner.exit_code


if __name__ == "__main__":
    sys.exit(main())
