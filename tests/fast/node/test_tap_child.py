"""twistd's ooidx plugin (ooidx.node.tap) and the child-process runner
(ooidx.node.child), in-process: options, config errors as one line, where the
log goes, the exit status after twistd, and a child's bus and component on a
memory:// bus driven by a Clock. (twistd and real children as processes are
in tests/ooidx/test_daemon.py and tests/ooidx/test_multinode.py.)"""
from __future__ import annotations

import io
import os
import sys
import uuid
from typing import Any, List

from twisted.internet import reactor as global_reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage

from ooidx.component import Component
from ooidx.config import load
from ooidx.node import bootstrap as bootstrap_module
from ooidx.node import child as child_module
from ooidx.node import tap
from ooidx.node.daemon import Daemon

from tests.fast.core.support import FastCase, LogEvents, drive, settle, threadless
from tests.ooidx.twistd_helpers import write_config


def memory_config(case: FastCase, **settings: Any) -> Any:
    settings.setdefault("node", "unit")
    settings.setdefault("broker", f"memory://tap-{uuid.uuid4().hex}")
    settings.setdefault("components", {"fetcher": None})
    return str(write_config(case.tmp_path() / "node.yaml", **settings))


class TapTests(FastCase):
    def setUp(self) -> None:
        self.triggers: List[tuple] = []
        self.patch(global_reactor, "addSystemEventTrigger",
                   lambda *args, **kwargs: self.triggers.append(args))

    def options(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        options.parent = {"nodaemon": True, "logfile": None}  # as twistd -n gives it: log to stdout
        return options

    def test_options(self) -> None:
        assert self.options()["config"] == "etc/dx.yaml" and self.options()["broker"] is None
        options = self.options("-c", "x.yaml", "--broker", "amqp://h/")
        assert (options["config"], options["broker"]) == ("x.yaml", "amqp://h/")
        with self.assertRaises(usage.UsageError):
            self.options("--nonsense")

    def test_make_service_gives_the_node_and_sets_the_exit_status_trigger(self) -> None:
        path = memory_config(self)
        daemon = tap.makeService(self.options("--config", path))
        assert isinstance(daemon, Daemon)
        assert daemon.config.node == "unit" and daemon.config_path == path
        assert daemon.log_observer is not None
        [(phase, event, function, code)] = self.triggers
        assert (phase, event, function) == ("after", "shutdown", tap.exit_status_after_twistd)
        assert code() == 0
        daemon.exit_code = 1
        assert code() == 1

    def test_a_config_error_is_one_line_and_status_1(self) -> None:
        with self.assertRaises(SystemExit) as e:
            tap.makeService(self.options("--config", "/nonexistent/dx.yaml"))
        assert str(e.exception.code).startswith("ooidx: /nonexistent/dx.yaml: cannot read config: "
                                                "No such file or directory; make one with `ooidx config init")
        assert self.triggers == []

    def test_a_broker_override_is_checked_too(self) -> None:
        with self.assertRaises(SystemExit) as e:
            tap.makeService(self.options("--config", memory_config(self), "--broker", "amqp://u:pw@h:port/"))
        message = str(e.exception.code)
        assert message.startswith("ooidx: ") and "broker (from --broker)" in message and "pw@" not in message

    def test_log_output(self) -> None:
        class Server(dict):
            pass

        options = tap.Options()
        options.parent = Server(logfile="-", nodaemon=False)
        assert tap._log_output(options) is sys.stdout
        options.parent = Server(logfile=None, nodaemon=True)
        assert tap._log_output(options) is sys.stdout
        path = self.tmp_path() / "dx.log"
        options.parent = Server(logfile=str(path), nodaemon=False)
        logfile = tap._log_output(options)
        self.addCleanup(logfile.close)
        logfile.write("a line\n")
        logfile.flush()
        assert path.read_text() == "a line\n"

    def test_the_exit_status_is_raised_at_twistd_s_last_event(self) -> None:
        tap.exit_status_after_twistd(lambda: 3)
        last = {"log_format": tap._TWISTD_LAST_EVENT, "log_namespace": "twisted.application.app.AppLogger",
                "log_level": LogLevel.info, "log_time": 0.0}
        globalLogPublisher(dict(last, log_namespace="someone.else"))  # not twistd's: nothing happens
        with self.assertRaises(SystemExit) as e:
            globalLogPublisher(dict(last))
        assert e.exception.code == 3
        globalLogPublisher(dict(last))  # the observer is gone: once only


class Failing(Component):
    def setUp(self) -> Any:
        raise OSError("no room")


class ChildTests(FastCase):
    def setUp(self) -> None:
        self.monkeypatch().delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    def runner(self, component: str = "fetcher") -> Any:
        clock = threadless(self)
        clock.stopped = []
        clock.stop = lambda: clock.stopped.append(True)
        config = load(memory_config(self, components={component: None}))
        return clock, child_module.ChildRunner(config, component, clock)

    def test_parse_args(self) -> None:
        args = child_module.parse_args(["--config", "c.yaml", "--component", "csv"])
        assert (args.config, args.component, args.broker) == ("c.yaml", "csv", None)
        self.patch(sys, "stderr", io.StringIO())
        for argv in (["--config", "c.yaml"], ["--component", "csv"],
                     ["--config", "c.yaml", "--component", "nope"]):
            with self.assertRaises(SystemExit) as e:
                child_module.parse_args(argv)
            assert e.exception.code == 2

    def test_main_with_a_bad_config_is_status_2(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        assert child_module.main(["--config", "/nonexistent.yaml", "--component", "csv"]) == 2
        assert err.getvalue() == ("ooidx.node.child: /nonexistent.yaml: cannot read config: "
                                  "No such file or directory\n")

    def test_the_child_serves_its_component_and_stops(self) -> None:
        events = LogEvents(self)
        clock, runner = self.runner()
        runner.start()
        settle(clock)
        assert runner.component is not None and runner.component.started
        answer = drive(self, clock, runner.bus.call("fetcher", "ping", timeout=5))
        assert answer["component"] == "fetcher" and answer["pid"] == os.getpid()
        assert any("serving fetcher" in (e.get("log_format") or "") or e.get("component") == "fetcher"
                   for e in events.events)
        drive(self, clock, runner.stop())
        assert not runner.component.running and not runner.bus.running
        assert runner.exit_code == 0 and clock.stopped == []

    def test_a_child_whose_daemon_is_gone_stops(self) -> None:
        clock, runner = self.runner()
        runner.start()
        settle(clock)
        clock.advance(1.0)
        assert clock.stopped == []
        self.patch(os, "getppid", lambda: 1)
        clock.advance(1.0)
        assert clock.stopped == [True]
        drive(self, clock, runner.stop())

    def test_a_component_that_fails_to_start_is_status_1(self) -> None:
        self.patch(bootstrap_module, "component_class", lambda name: Failing)
        clock, runner = self.runner("csv")
        runner.start()
        settle(clock)
        assert runner.exit_code == 1 and clock.stopped == [True]
        drive(self, clock, runner.stop())

    def test_stopping_before_the_start_ends_cancels_it(self) -> None:
        clock, runner = self.runner()
        runner.bus.transport.connected = False
        runner.start()
        drive(self, clock, runner.stop())
        assert runner.exit_code == 0 and clock.stopped == []
