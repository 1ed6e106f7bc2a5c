"""The node: the Daemon in-process on a memory:// bus whose time is a
task.Clock, and the component registry. (The tests that run `twistd -n ooidx`
as a process, or reach for an AMQP port, stay in tests/ooidx/test_daemon.py.)"""
from __future__ import annotations

import io
import os
import sys
import uuid
from pathlib import Path
from typing import Any, List

from twisted.internet import task
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ooidx.component import Component
from ooidx.config import load
from ooidx.node import bootstrap as bootstrap_module
from ooidx.node.bootstrap import component_class
from ooidx.node.daemon import Daemon
from ooidx.node.logs import LineObserver

from tests.fast.core.support import FastCase, LogEvents, drive, settle, threadless
from tests.ooidx.twistd_helpers import write_config

ROOT = Path(__file__).resolve().parents[3]


def memory_config(tmp_path: Path, **settings: Any) -> Any:
    settings.setdefault("node", "unit")
    settings.setdefault("broker", f"memory://daemon-{uuid.uuid4().hex}")
    settings.setdefault("components", {"fetcher": {"instances": 2}, "cache": None, "notification": None})
    settings.setdefault("timeouts", {"rpc": 5, "shutdown": 2})
    return load(str(write_config(tmp_path / "node.yaml", **settings)))


def lines_of(events: List[dict]) -> List[str]:
    return [LineObserver(io.StringIO(), node="n").fields(e)["message"] for e in events]


def until(case: FastCase, clock: task.Clock, predicate: Any, seconds: float = 10.0) -> None:
    """Move the clock on until C{predicate()} holds (at most C{seconds})."""
    settle(clock)
    waited = 0.0
    while not predicate():
        if waited >= seconds:
            case.fail("not true after %s s of clock time" % seconds)
        clock.advance(0.01)
        settle(clock)
        waited += 0.01


class FailingPubSub(Component):
    def setUp(self) -> Any:
        raise OSError("cannot open the subscription store /nonexistent")


class DaemonTests(FastCase):
    def test_node_starts_its_components_answers_and_stops(self) -> None:
        clock = threadless(self)
        fatal: List[int] = []
        node = Daemon(memory_config(self.tmp_path()), reactor=clock, on_fatal=fatal.append)
        node.startService()
        try:
            until(self, clock, lambda: node.started)
            assert set(node.components) == {"fetcher", "cache", "notification"}
            assert all(c.parent is node for c in node.components.values())
            answer = drive(self, clock, node.bus.call("fetcher", "ping", timeout=5))
            assert answer == {"component": "fetcher", "node": "unit", "pid": os.getpid()}
            assert node.health() == {"ok": True, "broker": "up",
                                     "components": {"cache": True, "fetcher": True, "notification": True}}
            status = node.status()
            assert status["components"]["fetcher"] == {"started": True, "instances": 2, "process": "inline"}
            assert status["node"] == "unit" and status["pid"] == os.getpid()
            replies = drive(self, clock, node.cluster_status(timeout=0.3))
            assert [r["node"] for r in replies] == ["unit"]
            assert replies[0]["components"] == status["components"]
        finally:
            drive(self, clock, node.stopService())
        assert fatal == []
        assert not any(c.started for c in node.components.values())
        assert node.health()["ok"] is False and node.health()["broker"] == "down"

    def test_components_stop_in_reverse_order_but_stop_first_ones_first(self) -> None:
        """The proxy (stop_first) drains its HTTP requests while the components
        that answer them still run, wherever the config lists it."""
        from ooidx.datapath.proxy import Proxy
        self.assertTrue(Proxy.stop_first)
        clock = threadless(self)
        node = Daemon(memory_config(self.tmp_path()), reactor=clock, on_fatal=lambda code: None)
        node.startService()
        stopped: List[str] = []
        try:
            until(self, clock, lambda: node.started)
            for name, component in node.components.items():
                stop = component.stopService
                component.stopService = lambda stop=stop, name=name: (stopped.append(name), stop())[1]
            node.components["cache"].stop_first = True  # listed between fetcher and notification
        finally:
            drive(self, clock, node.stopService())
        self.assertEqual(stopped, ["cache", "notification", "fetcher"])

    def test_cluster_status_lists_every_node_on_the_bus(self) -> None:
        clock = threadless(self)
        tmp_path = self.tmp_path()
        broker = f"memory://cluster-{uuid.uuid4().hex}"
        a = Daemon(memory_config(tmp_path, node="a", broker=broker, components={"controller": None}),
                   reactor=clock)
        (tmp_path / "b").mkdir()
        b = Daemon(memory_config(tmp_path / "b", node="b", broker=broker,
                                 components={"fetcher": {"instances": 3}}), reactor=clock)
        a.startService()
        b.startService()
        try:
            until(self, clock, lambda: a.started and b.started)
            replies = drive(self, clock, a.cluster_status(timeout=0.3))
            assert [r["node"] for r in replies] == ["a", "b"]
            assert replies[1]["components"] == {"fetcher": {"started": True, "instances": 3, "process": "inline"}}
            assert drive(self, clock, a.bus.call("fetcher", "ping", timeout=5))["node"] == "b"
        finally:
            drive(self, clock, a.stopService())
            drive(self, clock, b.stopService())

    def test_a_retired_component_in_the_config_is_a_warning_at_start(self) -> None:
        captured = LogEvents(self)
        clock = threadless(self)
        config = memory_config(self.tmp_path(), components={"notification": None, "distributor": {"instances": 2}})
        node = Daemon(config, reactor=clock)
        node.startService()
        try:
            until(self, clock, lambda: node.started)
            assert set(node.components) == {"notification"}
        finally:
            drive(self, clock, node.stopService())
        warnings = [line for e, line in zip(captured.events, lines_of(captured.events))
                    if e.get("log_level") == LogLevel.warn and "retired" in line]
        assert len(warnings) == 1 and "components.distributor: deprecated: the distributor component is retired" \
            in warnings[0], warnings

    def test_a_component_that_fails_to_start_stops_the_node(self) -> None:
        captured = LogEvents(self)
        self.patch(bootstrap_module, "component_class",
                   lambda name: FailingPubSub if name == "pub_sub" else component_class(name))
        clock = threadless(self)
        fatal: List[int] = []
        config = memory_config(self.tmp_path(), components={"fetcher": None, "cache": None, "pub_sub": None,
                                                             "user_pub_sub": None})
        node = Daemon(config, reactor=clock, on_fatal=fatal.append)
        node.startService()
        until(self, clock, lambda: fatal)
        drive(self, clock, node.stopService())
        assert fatal == [1] and node.exit_code == 1
        assert not node.started
        # never half-started: what had started (cache, fetcher) is stopped, what came after never started
        assert node.components["cache"].started is False
        assert node.components["fetcher"].started is False
        assert "user_pub_sub" not in node.components
        critical = [e for e in captured.events if e.get("log_level") == LogLevel.critical]
        assert len(critical) == 1
        message = lines_of(captured.events)[captured.events.index(critical[0])]
        assert message == ("component pub_sub failed to start: OSError: cannot open the subscription store "
                           "/nonexistent; stopping node unit")
        assert critical[0]["component"] == "pub_sub"

    def test_registry_maps_every_component(self) -> None:
        from ooidx.config import COMPONENTS

        for name in COMPONENTS:
            cls = component_class(name)
            assert issubclass(cls, Component), name
        assert component_class("web").__name__ == "Web"


# --------------------------------------------------------------------------- #
# child processes, spawned by a stand-in reactor (no process is started)


class FakeProcess:
    """The transport of a spawned child: it records signals; a TERM or KILL
    ends it on the clock (unless it is stubborn) and a test can end it."""

    def __init__(self, reactor: Any, protocol: Any, args: List[str], env: dict, pid: int) -> None:
        self.reactor, self.protocol, self.args, self.env, self.pid = reactor, protocol, args, env, pid
        self.signals: List[str] = []
        self.stubborn = False  # ignores TERM
        self.immortal = False  # ignores KILL too (a process stuck in the kernel)
        self.ended = False
        protocol.makeConnection(self)

    def signalProcess(self, signal: str) -> None:
        from twisted.internet.error import ProcessExitedAlready

        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signal)
        if self.immortal:
            return
        if not self.stubborn or signal == "KILL":
            self.reactor.callLater(0, self.end, 0 if signal == "TERM" else None, signal)

    def end(self, code: Any = 0, signal: Any = None) -> None:
        from twisted.internet.error import ProcessDone, ProcessTerminated

        if self.ended:
            return
        self.ended = True
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(code, signal)
        self.protocol.processEnded(Failure(reason))

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass


def spawning_clock(case: FastCase) -> Any:
    """A threadless clock that is also IReactorProcess: spawnProcess makes a
    L{FakeProcess} (kept in C{clock.spawned})."""
    from twisted.internet.interfaces import IReactorProcess
    from zope.interface import alsoProvides

    clock = threadless(case)
    clock.spawned = []

    def spawnProcess(protocol: Any, executable: str, args: List[str], env: dict = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: bool = False, childFDs: Any = None) -> FakeProcess:
        assert executable == args[0]
        process = FakeProcess(clock, protocol, list(args), dict(env or {}), 40000 + len(clock.spawned))
        clock.spawned.append(process)
        return process

    clock.spawnProcess = spawnProcess
    alsoProvides(clock, IReactorProcess)
    return clock




class Stand(Component):
    """A component that only starts and stops (in place of the web port); it
    takes and drops what the node hands the web port (token, metrics)."""

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, **web_arguments: Any) -> None:
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        self.web_arguments = web_arguments  # what the node gives the web port (token, metrics, listen...)


class ChildrenTests(FastCase):
    def node(self, components: dict, observer: Any = None) -> Any:
        """A Daemon whose config has child processes (so an amqp:// broker in
        the config) on a memory:// bus of its own."""
        import magnet

        clock = spawning_clock(self)
        tmp_path = self.tmp_path()
        config = load(str(write_config(tmp_path / "node.yaml", node="kids",
                                       broker="amqp://dx:s3cret@rabbit.test:5672/",
                                       components=components, timeouts={"rpc": 5, "shutdown": 2})))
        bus = magnet.connect(f"memory://children-{uuid.uuid4().hex}", clock, node="kids", rpc_timeout=5,
                             observer=observer)
        self.patch(bootstrap_module, "component_class",
                   lambda name: Stand if name == "web" else component_class(name))
        node = Daemon(config, reactor=clock, bus=bus, on_fatal=self.fail)
        return clock, node, tmp_path

    def test_children_are_spawned_with_the_broker_in_their_environment(self) -> None:
        clock, node, tmp_path = self.node({"fetcher": {"instances": 2, "process": "child"}, "cache": None})
        node.startService()
        until(self, clock, lambda: node.started)
        assert [p.args for p in clock.spawned] == [
            [sys.executable, "-m", "ooidx.node.child", "--config", str(tmp_path / "node.yaml"),
             "--component", "fetcher"]] * 2
        env = clock.spawned[0].env
        assert env["OOIDX_BROKER"] == "amqp://dx:s3cret@rabbit.test:5672/"
        assert not any("s3cret" in arg for arg in clock.spawned[0].args)  # never in argv (ps)
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
        assert set(node.components) == {"cache"}  # the child component does not run here
        status = node.status()
        assert status["components"]["fetcher"] == {"started": True, "instances": 2, "process": "child",
                                                   "running": 2}
        assert status["broker"] == "amqp://dx:***@rabbit.test:5672/"
        assert node.health()["components"] == {"fetcher": True, "cache": True}
        assert node.children.live_pids() == {40000, 40001}
        drive(self, clock, node.stopService())
        assert [p.signals for p in clock.spawned] == [["TERM"], ["TERM"]]
        assert node.status()["components"]["fetcher"]["started"] is False

    def test_a_child_that_dies_is_restarted_with_backoff(self) -> None:
        events = LogEvents(self)
        clock, node, _ = self.node({"csv": {"instances": 1, "process": "child"}})
        node.startService()
        until(self, clock, lambda: node.started)
        first = clock.spawned[0]
        first.end(1)  # dies at once: sooner than the threshold
        settle(clock)
        assert node.status()["components"]["csv"] == {"started": False, "instances": 1, "process": "child",
                                                      "running": 0}
        assert not node.health()["ok"]
        clock.advance(0.99)
        assert len(clock.spawned) == 1  # minRestartDelay is 1 s
        clock.advance(0.01)
        assert len(clock.spawned) == 2 and clock.spawned[1].pid != first.pid
        assert node.component_started("csv")
        texts = lines_of(events.events)
        assert "starting child process csv.0" in texts and "restarting child process csv.0" in texts
        drive(self, clock, node.stopService())

    def test_a_child_that_will_not_stop_is_killed_then_given_up_on(self) -> None:
        events = LogEvents(self)
        clock, node, _ = self.node({"csv": {"instances": 1, "process": "child"}})
        node.startService()
        until(self, clock, lambda: node.started)
        stubborn = clock.spawned[0]
        stubborn.stubborn = True
        finished: List[Any] = []
        done = node.stopService().addBoth(finished.append)
        settle(clock)
        assert stubborn.signals == ["TERM"] and finished == []
        clock.advance(node.children.killTime)  # shutdown 2 s + 2 s
        settle(clock)
        assert stubborn.signals == ["TERM", "KILL"]
        drive(self, clock, done)
        assert finished == [None]
        assert not [t for t in lines_of(events.events) if "did not exit" in t]

    def test_a_child_that_never_exits_is_given_up_on_after_the_kill_time(self) -> None:
        events = LogEvents(self)
        clock, node, _ = self.node({"csv": {"instances": 1, "process": "child"}})
        node.startService()
        until(self, clock, lambda: node.started)
        clock.spawned[0].immortal = True
        finished: List[Any] = []
        node.stopService().addBoth(finished.append)
        clock.advance(node.children.killTime + 1.9)
        settle(clock)
        assert finished == []
        clock.advance(0.2)
        settle(clock)
        assert finished == [None]
        assert [t for t in lines_of(events.events) if t == "child processes ['csv.0'] did not exit"]

    def test_children_s_metrics_are_shared_with_a_web_component_here(self) -> None:
        from ooidx.node.metrics import MULTIPROC_ENV, PrometheusObserver

        observer = PrometheusObserver()
        clock, node, tmp_path = self.node({"fetcher": {"instances": 1, "process": "child"}, "web": None},
                                          observer=observer)
        node.startService()
        until(self, clock, lambda: node.started)
        directory = clock.spawned[0].env[MULTIPROC_ENV]
        assert directory.startswith(str(tmp_path / "node-data")) and os.path.isdir(directory)
        assert node.child_metrics is not None
        assert node.child_metrics in observer._sources
        drive(self, clock, node.stopService())
        assert node.child_metrics is None and not os.path.exists(directory)  # closed: the directory goes

    def test_children_s_metrics_stay_apart_when_no_directory_can_be_made(self) -> None:
        from ooidx.node.metrics import MULTIPROC_ENV, PrometheusObserver

        events = LogEvents(self)
        clock, node, tmp_path = self.node({"fetcher": {"instances": 1, "process": "child"}, "web": None},
                                          observer=PrometheusObserver())
        (tmp_path / "node-data").write_text("a file where the data directory should be")
        node.startService()
        until(self, clock, lambda: node.started)
        assert MULTIPROC_ENV not in clock.spawned[0].env and node.child_metrics is None
        assert [t for t in lines_of(events.events) if "the child processes' metrics are not in /metrics" in t]
        drive(self, clock, node.stopService())


class StatusTests(FastCase):
    def test_dead_letters_are_counted_from_the_bus_metrics(self) -> None:
        import magnet
        from ooidx.node.metrics import PrometheusObserver

        clock = threadless(self)
        observer = PrometheusObserver()
        observer.dead_letter("cache")
        observer.dead_letter("cache")
        config = memory_config(self.tmp_path(), components={"cache": None})
        bus = magnet.connect(config.broker[0], clock, observer=observer)
        node = Daemon(config, reactor=clock, bus=bus)
        assert node.dead_letters() == {"cache": 2}
        assert node.status()["dead_letters"] == {"cache": 2}
        # without metrics: no counts, no error
        plain = Daemon(config, reactor=clock, bus=magnet.connect(config.broker[0], clock))
        assert plain.dead_letters() == {}

    def test_a_status_request_without_a_reply_address_is_ignored(self) -> None:
        from magnet import Message
        from ooidx import wire

        clock = threadless(self)
        node = Daemon(memory_config(self.tmp_path(), components={"cache": None}), reactor=clock)
        assert node._on_control(Message.of_json({}, type=wire.STATUS)) is None
        assert node._on_control(Message.of_json({}, type="other", reply_to="x")) is None

    def test_fatal_without_on_fatal_stops_the_reactor_when_it_runs(self) -> None:
        clock = threadless(self)
        stopped: List[bool] = []
        clock.stop = lambda: stopped.append(True)
        node = Daemon(memory_config(self.tmp_path(), components={"cache": None}), reactor=clock)
        node.fatal(3)
        assert node.exit_code == 3 and stopped == [True]
        drive(self, clock, node.stopService())
