"""The node: the Daemon in-process on a memory:// bus whose time is a
task.Clock, and the component registry. (The tests that run `twistd -n ooidx`
as a process, or reach for an AMQP port, stay in tests/ooidx/test_daemon.py.)"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any, List

from twisted.internet import task
from twisted.logger import LogLevel

from ooidx.component import Component
from ooidx.config import load
from ooidx.node import daemon as daemon_module
from ooidx.node.bootstrap import component_class
from ooidx.node.daemon import Daemon
from ooidx.node.logs import LineObserver

from tests.fast.core.support import FastCase, LogEvents, drive, settle, threadless
from tests.ooidx.twistd_helpers import write_config


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

    def test_a_component_that_fails_to_start_stops_the_node(self) -> None:
        captured = LogEvents(self)
        self.patch(daemon_module, "component_class",
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
