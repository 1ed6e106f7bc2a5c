"""One DX node: the bus, this node's components, their child processes.

    daemon = Daemon(config, reactor=reactor, config_path="etc/dx.yaml")
    daemon.startService()      # twistd does this; see ooidx.node.tap

Start: the components with no queue of their own (the web edge) start at
once, so /healthz answers (503, with the broker's last error, while there is
no link); the bus connects (and keeps retrying, with backoff, while the
broker is unreachable: the node waits, it does not exit; but a broker that
refuses the login stops the start with one line and exit 1, since no retry
helps until the config changes), the component table is declared, every
other inline component of this node is created and started in the config's
order, the child processes of ``process: child`` components are spawned
under a L{ProcessMonitor}, and the node subscribes to the control fanout to
answer status requests. If a component fails to start, the node logs one
critical line naming it and why, stops everything it started and asks the
process to exit non-zero (C{on_fatal}): it never runs half-started.

Stop (SIGTERM under twistd): components stop taking messages, in-flight work
finishes (bounded by C{timeouts.shutdown}), child processes get SIGTERM
(SIGKILL after the same bound), then the bus closes. The components stop one
at a time in the reverse of the config's order, but one that says
C{stop_first} (the proxy: it drains its HTTP requests, whose answers need the
rest of the node) stops before all the others wherever it is listed.

With a web component in the daemon, the children's metrics are in its
/metrics too: they count in files under C{DATA_DIR/child-metrics/PID} that
the daemon reads (L{ooidx.node.metrics.ChildMetrics}, which says why and how).
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (CancelledError, Deferred, inlineCallbacks,
                                    maybeDeferred, succeed)
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

import magnet
import ooidx
from magnet import Bus, Message
from magnet.amqp.connection import LoginRefused
from magnet.errors import BadMessage

from ooidx.node.bootstrap import CONTROL_FANOUT, declare_topology
from ooidx.config import BROKER_ENV, Config
from ooidx.node.logs import add_secret
from ooidx.node.bootstrap import make_component
from ooidx.node.token import private_directory
from ooidx import wire

__all__ = ["Daemon", "ChildProcesses", "bus_for", "cluster_status", "STATUS", "STATUS_REPLY"]

#: Message types on the control fanout.
STATUS = wire.STATUS
STATUS_REPLY = wire.STATUS_REPLY


def metrics_observer() -> Optional[magnet.BusObserver]:
    """The Prometheus bus observer of L{ooidx.node.metrics}, if that module is there."""
    try:
        from ooidx.node.metrics import PrometheusObserver  # type: ignore[attr-defined]
    except ImportError:
        return None
    return PrometheusObserver()


def bus_for(config: Config, reactor: Any, observer: Optional[magnet.BusObserver] = None) -> Bus:
    """A (not started) L{Bus} on the config's broker, with its timeouts and limits."""
    broker: Any = list(config.broker) if len(config.broker) > 1 else config.broker[0]
    bus = magnet.connect(
        broker, reactor,
        node=config.node,
        rpc_timeout=config.timeouts.rpc,
        send_timeout=config.timeouts.send,
        retry_limit=config.retries.limit,
        prefetch=config.prefetch,
        shutdown_timeout=config.timeouts.shutdown,
        queue_type=config.queue_type,
        heartbeat=config.timeouts.heartbeat,
        connect_timeout=config.timeouts.connect,
        observer=observer,
    )
    if observer is not None and hasattr(bus.transport, "observer"):
        bus.transport.observer = observer  # the AMQP transport's consumer restarts, in the same metrics
    return bus


@inlineCallbacks
def cluster_status(bus: Bus, timeout: float = 1.5, clock: Any = None, expect: Iterable[str] = ()) -> Any:
    """Ask every node on the bus for its status; fires with their replies
    (sorted by node) that arrived within C{timeout} seconds, or as soon as
    every node named in C{expect} has answered (without it, after C{timeout}:
    no one knows how many nodes there are)."""
    clock = clock if clock is not None else bus.clock
    request_id = uuid.uuid4().hex
    replies: List[dict] = []
    waiting = set(expect)
    done: Deferred = Deferred()

    def on_reply(message: Message) -> None:
        if message.type != STATUS_REPLY or message.correlation_id != request_id:
            return
        try:
            value = message.json()
        except BadMessage:
            return
        if isinstance(value, dict):
            replies.append(value)
            waiting.discard(str(value.get("node")))
            if expect and not waiting and not done.called:
                done.callback(None)

    listener = yield bus.listen(on_reply)
    try:
        yield bus.declare_fanout(CONTROL_FANOUT)
        request = Message.of_json({}, type=STATUS, reply_to=listener.address, correlation_id=request_id,
                                  persistent=False)
        done.addTimeout(timeout, clock, onTimeoutCancel=lambda result, after: None)
        yield bus.send(CONTROL_FANOUT, request, mandatory=False)
        yield done
    finally:
        if not done.called:
            done.cancel()
        yield listener.close().addErrback(lambda _: None)
    return sorted(replies, key=lambda r: (str(r.get("node")), r.get("pid") or 0))


#: memory:// broker URL -> the nodes of this process running on it (they are all its nodes).
_MEMORY_NODES: Dict[str, Set[str]] = {}
#: How often (seconds) a status round on a broker waits its full timeout, to find nodes that joined.
STATUS_FULL_EVERY = 30.0


class ChildProcesses(ProcessMonitor):
    """A L{ProcessMonitor} whose stop waits (bounded) until its children have exited."""

    log = Logger()

    #: C{on_spawn(name, pid)} once a child process is spawned.
    on_spawn: Optional[Callable[[str, int], None]] = None
    #: C{on_exit(name)} once a child process has exited (before it is restarted).
    on_exit: Optional[Callable[[str], None]] = None

    def startProcess(self, name: str) -> None:
        if name in self.protocols:
            return
        again = name in self.timeStarted
        self.log.info("{verb} child process {name}", verb="restarting" if again else "starting", name=name,
                      component=name.rsplit(".", 1)[0])
        super().startProcess(name)
        pid = getattr(getattr(self.protocols.get(name), "transport", None), "pid", None)
        if pid and self.on_spawn is not None:
            self._hook(self.on_spawn, name, pid)

    def _monitoredProcessExited(self, name: str, reason: Optional[Failure] = None) -> None:
        super()._monitoredProcessExited(name, reason)
        if self.on_exit is not None:
            self._hook(self.on_exit, name)

    def _hook(self, hook: Callable[..., None], name: str, *args: Any) -> None:
        try:
            hook(name, *args)
        except Exception:  # noqa: BLE001 - supervising the children goes on
            self.log.failure("child process {name}: {hook}", name=name, hook=getattr(hook, "__name__", hook))

    def running_count(self, prefix: str) -> int:
        return sum(1 for name in self.protocols if name.rsplit(".", 1)[0] == prefix)

    def live_pids(self) -> Set[int]:
        """The pids of the child processes running now (not those that have exited)."""
        pids = set()
        for protocol in self.protocols.values():
            pid = getattr(getattr(protocol, "transport", None), "pid", None)
            if pid:
                pids.add(pid)
        return pids

    def stopService(self) -> Deferred:  # type: ignore[override]
        super().stopService()
        if not self.protocols:
            return succeed(None)
        done: Deferred = Deferred()
        deadline = self._clock.seconds() + self.killTime + 2.0

        def check() -> None:
            if not self.protocols or self._clock.seconds() > deadline:
                if self.protocols:
                    self.log.warn("child processes {names} did not exit", names=sorted(self.protocols))
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self._clock
        poll.start(0.05, now=True).addCallback(lambda _: done.callback(None))
        return done


class ComponentFailed(Exception):
    def __init__(self, name: str, reason: Failure) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"component {name} failed to start: {_reason(reason)}")


def _reason(failure: Failure) -> str:
    text = failure.getErrorMessage()
    kind = failure.type.__name__ if failure.type is not None else "Error"
    return f"{kind}: {text}" if text else kind


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _refusal(failure: Failure) -> str:
    """The broker's own words for a refused login (C{403 ACCESS_REFUSED - ...})."""
    text = failure.getErrorMessage()
    return text.split("AMQP handshake failed: ", 1)[-1]


class Daemon(MultiService):
    """A node of the Data Exchange.

    @param config: the node's validated L{Config}.
    @param reactor: the reactor (time, processes); tests pass their own.
    @param config_path: the config file, for the child processes (they load it too).
    @param bus: a ready-made (not started) bus; by default one for the config's broker.
    @param on_fatal: C{on_fatal(exit_code)} when the node cannot run (a
        component failed to start); by default the reactor stops.
    @param log_observer: the log observer for the application, when run by twistd
        (see L{setServiceParent}).
    @param open_files: the open-files limit (L{ooidx.node.limits.OpenFiles})
        twistd's node raised itself to; said in the start log, with a warning
        when it is low.
    """

    log = Logger()

    def __init__(self, config: Config, *, reactor: Any = None, config_path: Optional[str] = None,
                 bus: Optional[Bus] = None, on_fatal: Optional[Callable[[int], None]] = None,
                 log_observer: Optional[ILogObserver] = None, open_files: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.config_path = os.path.abspath(config_path or config.source)
        self.bus = bus if bus is not None else bus_for(config, reactor, metrics_observer())
        self.components: Dict[str, Any] = {}
        self.children: Optional[ChildProcesses] = None
        #: The children's metrics, read for /metrics (with a web component here), else None.
        self.child_metrics: Any = None
        self.started = False
        self.exit_code: Optional[int] = None
        self.log_observer = log_observer
        #: the open-files limit twistd's node raised itself to (L{ooidx.node.limits.OpenFiles}), said at start
        self.open_files = open_files
        self._on_fatal = on_fatal
        self._starting: Optional[Deferred] = None
        #: when the broker link went down (reactor seconds), None while it is up
        self._broker_down_since: Optional[float] = None
        self._control: Any = None
        self._stopping: Optional[Deferred] = None
        #: the nodes that answered the last full status round, and when it was (cluster_status)
        self._known_nodes: Set[str] = set()
        self._full_status_at: Optional[float] = None
        #: the memory:// broker's URL (its nodes all live in this process), else None
        self._memory_broker: Optional[str] = (config.broker[0] if len(config.broker) == 1
                                              and config.broker[0].startswith("memory:") else None)

    # twistd ----------------------------------------------------------------------

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the application: hand it this node's log
        observer (as a .tac file would, C{application.setComponent(ILogObserver, ...)})
        so that twistd logs through it, in the config's format."""
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    # lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._memory_broker is not None:
            _MEMORY_NODES.setdefault(self._memory_broker, set()).add(self.config.node)
        self._broker_down_since = self.reactor.seconds()
        self.bus.transport.add_link_listener(self._link_changed)
        self.bus.startService()
        self._starting = self._start()
        self._starting.addErrback(self._start_failed)

    @inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        for notice in config.warnings:
            # (not a "warning" key: the legacy log bridge takes such an event for a Python warning)
            self.log.warn("{config_notice}", config_notice=notice)
        self.log.info("node {node} starting (pid {pid}): {components}; broker {broker}",
                      node=config.node, pid=os.getpid(), components=", ".join(
                          f"{name} x{c.instances}" + (" (child)" if c.process == "child" else "")
                          for name, c in config.components.items()),
                      broker=config.redacted_broker())
        if self.open_files is not None:
            self.log.info("node {node}: {note}", node=config.node, note=self.open_files.note())
            warning = self.open_files.warning()
            if warning is not None:
                self.log.warn("node {node}: {text}", node=config.node, text=warning)
        when_running = getattr(self.reactor, "callWhenRunning", None)
        if when_running is not None:  # "started" means the reactor runs (signal handlers and all)
            running: Deferred = Deferred()
            when_running(lambda: running.called or running.callback(None))
            yield running
        private_directory(config.data_dir, self.log)
        inline = [name for name, settings in config.components.items() if settings.process != "child"]
        # the edges with no queue of their own (web) first, before the broker: /healthz says why not
        edges = [name for name in inline if name not in wire.BUS_TABLE]
        for name in edges:
            yield self._start_component(name)
        if not self.bus.transport.connected:
            self.log.info("waiting for the broker at {broker}", broker=config.redacted_broker())
            yield self.bus.transport.when_connected(None)
        yield declare_topology(self.bus)
        for name in inline:
            if name not in edges:
                yield self._start_component(name)
        self._hide_generated_token()
        self._start_children()
        self._control = yield self.bus.subscribe(CONTROL_FANOUT, self._on_control)
        self.started = True
        self.log.info("node {node} started: {count} component(s)", node=config.node,
                      count=len(config.components))

    @inlineCallbacks
    def _start_component(self, name: str) -> Any:
        settings = self.config.components[name]
        component = make_component(name, self.bus, node=self.config.node, instances=settings.instances,
                                   config=self.config, reactor=self.reactor)
        component.setServiceParent(self)
        self.components[name] = component
        try:
            yield component.start()
        except CancelledError:
            raise
        except Exception:
            raise ComponentFailed(name, Failure())

    def _link_changed(self, up: bool) -> None:
        """Remember since when the broker link is down, for /healthz."""
        if up:
            self._broker_down_since = None
        elif self._broker_down_since is None:
            self._broker_down_since = self.reactor.seconds()

    def _hide_generated_token(self) -> None:
        """A token the web edge made at first start (in the data directory) is a
        secret the config did not know of: keep it out of the logs too."""
        try:
            from ooidx.node.token import read_token_file, token_path
            add_secret(read_token_file(token_path(self.config.data_dir)))
        except Exception:  # noqa: BLE001 - no token module or file: nothing to hide
            pass

    def _start_children(self) -> None:
        children = [(name, c) for name, c in self.config.components.items() if c.process == "child"]
        if not children:
            return
        monitor = ChildProcesses(reactor=self.reactor)
        monitor.threshold = 5.0  # a child that dies sooner than this is restarted with backoff
        monitor.minRestartDelay = 1.0
        monitor.maxRestartDelay = 60.0
        monitor.killTime = self.config.timeouts.shutdown + 2.0
        env = self._child_environment()
        self.child_metrics = self._share_child_metrics(monitor, env)
        for name, settings in children:
            for i in range(settings.instances):
                args = [sys.executable, "-m", "ooidx.node.child", "--config", self.config_path, "--component", name]
                monitor.addProcess(f"{name}.{i}", args, env=env)
        self.children = monitor
        monitor.setServiceParent(self)

    def _share_child_metrics(self, monitor: ChildProcesses, env: Dict[str, str]) -> Any:
        """With a web component in this process, the children count in files
        that its /metrics reads (ooidx.node.metrics); otherwise nothing changes."""
        web = self.config.components.get("web")
        observer = getattr(self.bus, "observer", None)
        if web is None or web.process != "inline" or not hasattr(observer, "include"):
            return None
        from ooidx.node.metrics import MULTIPROC_ENV, ChildMetrics, prepare_directory
        try:
            directory = prepare_directory(self.config.data_dir)
        except OSError as e:
            self.log.warn("the child processes' metrics are not in /metrics: cannot make a directory "
                          "for them in {data_dir} ({reason})", data_dir=self.config.data_dir,
                          reason=e.strerror or e)
            return None
        shared = ChildMetrics(directory, monitor.live_pids)
        observer.include(shared)
        monitor.on_spawn = lambda name, pid: shared.child_started(pid)
        monitor.on_exit = lambda name: shared.retire()
        env[MULTIPROC_ENV] = directory
        self.log.info("the child processes' metrics are shared with /metrics through {directory}",
                      directory=directory)
        return shared

    def _close_child_metrics(self) -> None:
        shared, self.child_metrics = self.child_metrics, None
        if shared is not None:
            shared.close()

    def _child_environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        # the broker (its password) travels in the environment, never in argv (ps)
        env[BROKER_ENV] = ",".join(self.config.broker)
        # the folder that holds the ooidx package (not this module's own folder:
        # ooidx/http would shadow the standard library's http there)
        here = os.path.dirname(os.path.dirname(os.path.abspath(ooidx.__file__)))
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = here + (os.pathsep + path if path else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self._stopping is not None:
            return
        if failure.check(LoginRefused):
            self.log.critical("node {node} cannot start: the broker {broker} refused the login ({reason}); "
                              "check the user and password of broker: in {config} (or {env}); exiting",
                              node=self.config.node, broker=self.config.redacted_broker(),
                              reason=_refusal(failure), config=self.config_path, env=BROKER_ENV)
        elif failure.check(ComponentFailed):
            # not "message": twisted.python.log owns that key and a legacy observer
            # (trial's, or any log.addObserver) replaces it with () before ours reads it
            self.log.critical("{reason}; stopping node {node}", reason=str(failure.value),
                              node=self.config.node, component=failure.value.name)
        else:
            self.log.critical("node {node} failed to start: {reason}; stopping", node=self.config.node,
                              reason=_reason(failure))
        self.fatal(1)

    def fatal(self, exit_code: int) -> None:
        """The node cannot run: stop it, and the process, with C{exit_code}."""
        self.exit_code = exit_code
        self.stopService()  # whatever did start stops now; twistd's own stop then waits for it
        if self._on_fatal is not None:
            self._on_fatal(exit_code)
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred:
        if self._memory_broker is not None:
            _MEMORY_NODES.get(self._memory_broker, set()).discard(self.config.node)
        if self._stopping is not None:
            return self._stopping
        self.log.info("node {node} stopping", node=self.config.node)
        self.started = False
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        control, self._control = self._control, None
        d = control.cancel() if control is not None else succeed(None)
        d.addBoth(lambda _: self._stop_components())
        d.addErrback(lambda f: self.log.failure("stopping the components", f))
        d.addCallback(lambda _: self._close_child_metrics())
        d.addErrback(lambda f: self.log.failure("removing the child processes' metrics files", f))
        d.addCallback(lambda _: self.bus.stopService() if self.bus.running else None)
        d.addErrback(lambda f: self.log.failure("stopping the bus", f))
        d.addCallback(lambda _: self.log.info("node {node} stopped cleanly", node=self.config.node))
        self._stopping = d
        return d

    @inlineCallbacks
    def _stop_components(self) -> Any:
        """Stop the components one at a time, in the reverse of the config's order,
        so that what a component does on its way out (the controller saving its
        statistics in the attribute store) still finds the components it started
        after. (MultiService stops them all at once.)"""
        Service.stopService(self)
        services = list(reversed(list(self)))
        # an HTTP edge whose requests need the others (the proxy: its answers come from the cache,
        # the fetchers, the controller) stops first, so what it serves while it drains can still be answered
        services.sort(key=lambda service: not getattr(service, "stop_first", False))
        for service in services:
            try:
                yield maybeDeferred(service.stopService)
            except Exception:  # noqa: BLE001 - the others must stop all the same
                self.log.failure("stopping {service}", service=getattr(service, "name", service))

    # status --------------------------------------------------------------------------

    def component_started(self, name: str) -> bool:
        settings = self.config.components[name]
        if settings.process == "child":
            return self.children is not None and self.children.running_count(name) == settings.instances
        component = self.components.get(name)
        return bool(component is not None and component.started)

    def health(self) -> dict:
        """C{ok} iff the broker link is up and every component of this node has started.

        While the broker blocks publishers (a memory or disk alarm: sends are
        held, then fail naming the alarm) C{broker_blocked} says so, and
        C{ok} stays as it is (what is cached is served, consumers consume);
        C{consumers}, once a consumer was lost, names the queues without
        their consumer now (being restarted) and counts the restarts so far.
        """
        transport = self.bus.transport
        broker_up = bool(self.bus.running and transport.connected)
        components = {name: self.component_started(name) for name in self.config.components}
        health: Dict[str, Any] = {"ok": broker_up and all(components.values()),
                                  "broker": "up" if broker_up else "down", "components": components}
        if not broker_up:
            # why, and since when: the last attempt's error (no password in it)
            health["broker_error"] = getattr(transport, "last_error", None) or "not connected yet"
            if self._broker_down_since is not None:
                health["broker_down_since"] = _iso(self._broker_down_since)
        blocked = getattr(transport, "blocked", None)
        if broker_up and blocked:
            health["broker_blocked"] = f"blocked by the broker: {blocked}"
        consumer_health = getattr(transport, "consumer_health", None)
        consumers = consumer_health() if callable(consumer_health) else None
        if consumers and (consumers.get("down") or consumers.get("restarts")):
            health["consumers"] = consumers
        return health

    def status(self) -> dict:
        """What this node runs, for C{ooidx status} (the answer to a status request)."""
        components = {}
        for name, settings in self.config.components.items():
            entry = {"started": self.component_started(name), "instances": settings.instances,
                     "process": settings.process}
            if settings.process == "child":
                entry["running"] = self.children.running_count(name) if self.children is not None else 0
            components[name] = entry
        return {"node": self.config.node, "pid": os.getpid(), "components": components,
                "broker": self.config.redacted_broker(), "dead_letters": self.dead_letters(),
                **{k: v for k, v in self.health().items() if k in ("broker_blocked", "consumers")}}

    def dead_letters(self) -> Dict[str, int]:
        """Messages this node dead-lettered since it started (its child processes
        too, when /metrics has them), by the name they came from (from the bus's
        metrics; empty without them)."""
        observer = getattr(self.bus, "observer", None)
        out: Dict[str, int] = {}
        try:
            if hasattr(observer, "include"):
                families = [m for m in observer.collect() if m.name == "magnet_dead_letters"]
            else:
                families = observer.dead_letters.collect()
            for metric in families:
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        out[sample.labels.get("name", "?")] = int(sample.value)
        except Exception:  # noqa: BLE001 - no metrics: no counts
            return {}
        return out

    def cluster_status(self, timeout: float = 1.5) -> Deferred:
        """Every node's status (this one's too), sorted by node. It returns as
        soon as the expected nodes have answered: on a memory:// bus the nodes
        of this process on it (there can be no other); on a broker the nodes of the last round that waited
        its full C{timeout}, if that was less than L{STATUS_FULL_EVERY} seconds
        ago (else this round waits it, so that nodes that joined show up)."""
        now = self.reactor.seconds()
        if self._memory_broker is not None:
            expect: Set[str] = {self.config.node} | _MEMORY_NODES.get(self._memory_broker, set())
        elif self._full_status_at is not None and now - self._full_status_at < STATUS_FULL_EVERY:
            expect = {self.config.node} | self._known_nodes
        else:
            expect = set()

        def remember(nodes: List[dict]) -> List[dict]:
            if not expect:
                self._known_nodes = {str(n.get("node")) for n in nodes}
                self._full_status_at = now
            return nodes

        return cluster_status(self.bus, timeout, self.reactor, expect).addCallback(remember)

    def _on_control(self, message: Message) -> Optional[Deferred]:
        if message.type != STATUS or not message.reply_to:
            return None
        reply = Message.of_json(self.status(), type=STATUS_REPLY, correlation_id=message.correlation_id,
                                persistent=False)
        d = self.bus.send(message.reply_to, reply, mandatory=False)
        d.addErrback(lambda f: self.log.info("status reply to {address} not delivered: {reason}",
                                             address=message.reply_to, reason=f.getErrorMessage()))
        return d
