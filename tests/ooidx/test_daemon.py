"""The node: the Daemon in-process on the memory bus, its logging, and
`twistd -n ooidx` as a real process (config errors, clean stop, a failed start)."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.python.failure import Failure

import magnet
from ooidx.node import bootstrap as bootstrap_module
from ooidx.component import Component
from ooidx.config import load, parse
from ooidx.node.daemon import Daemon
from ooidx.node.logs import CHILD_OUTPUT_NAMESPACE, LineObserver, Redactor, make_observer
from ooidx.node.bootstrap import component_class

from twistd_helpers import Daemon as DaemonProcess
from twistd_helpers import eventually, free_port, run_twistd, write_config


# --------------------------------------------------------------------------- #
# the node in-process, on the memory bus


def memory_config(tmp_path: Path, **settings: Any) -> Any:
    settings.setdefault("node", "unit")
    settings.setdefault("broker", f"memory://daemon-{uuid.uuid4().hex}")
    settings.setdefault("components", {"fetcher": {"instances": 2}, "cache": None, "notification": None})
    settings.setdefault("timeouts", {"rpc": 5, "shutdown": 2})
    return load(str(write_config(tmp_path / "node.yaml", **settings)))


class LogCapture:
    def __init__(self) -> None:
        self.events: List[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def lines(self) -> List[str]:
        return [LineObserver(io.StringIO(), node="n").fields(e)["message"] for e in self.events]


@pytest.fixture
def captured() -> Any:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


async def started(node: Daemon, timeout: float = 10) -> None:
    await eventually(lambda: node.started, timeout, "node started")


@pytest_twisted.ensureDeferred
async def test_node_starts_its_components_answers_and_stops(tmp_path: Path) -> None:
    fatal: List[int] = []
    node = Daemon(memory_config(tmp_path), reactor=reactor, on_fatal=fatal.append)
    node.startService()
    try:
        await started(node)
        assert set(node.components) == {"fetcher", "cache", "notification"}
        assert all(c.parent is node for c in node.components.values())
        answer = await node.bus.call("fetcher", "ping", timeout=5)
        assert answer == {"component": "fetcher", "node": "unit", "pid": os.getpid()}
        assert node.health() == {"ok": True, "broker": "up",
                                 "components": {"cache": True, "fetcher": True, "notification": True}}
        status = node.status()
        assert status["components"]["fetcher"] == {"started": True, "instances": 2, "process": "inline"}
        assert status["node"] == "unit" and status["pid"] == os.getpid()
        replies = await node.cluster_status(timeout=0.3)
        assert [r["node"] for r in replies] == ["unit"]
        assert replies[0]["components"] == status["components"]
    finally:
        await node.stopService()
    assert fatal == []
    assert not any(c.started for c in node.components.values())
    assert node.health()["ok"] is False and node.health()["broker"] == "down"


@pytest_twisted.ensureDeferred
async def test_cluster_status_lists_every_node_on_the_bus(tmp_path: Path) -> None:
    broker = f"memory://cluster-{uuid.uuid4().hex}"
    a = Daemon(memory_config(tmp_path, node="a", broker=broker, components={"controller": None}), reactor=reactor)
    (tmp_path / "b").mkdir()
    b = Daemon(memory_config(tmp_path / "b", node="b", broker=broker, components={"fetcher": {"instances": 3}}),
               reactor=reactor)
    a.startService()
    b.startService()
    try:
        await started(a)
        await started(b)
        replies = await a.cluster_status(timeout=0.3)
        assert [r["node"] for r in replies] == ["a", "b"]
        assert replies[1]["components"] == {"fetcher": {"started": True, "instances": 3, "process": "inline"}}
        assert (await a.bus.call("fetcher", "ping", timeout=5))["node"] == "b"
    finally:
        await a.stopService()
        await b.stopService()


class FailingPubSub(Component):
    def setUp(self) -> Any:
        raise OSError("cannot open the subscription store /nonexistent")


@pytest_twisted.ensureDeferred
async def test_a_component_that_fails_to_start_stops_the_node(tmp_path: Path, monkeypatch: Any,
                                                              captured: LogCapture) -> None:
    monkeypatch.setattr(bootstrap_module, "component_class",
                        lambda name: FailingPubSub if name == "pub_sub" else component_class(name))
    fatal: List[int] = []
    config = memory_config(tmp_path, components={"fetcher": None, "cache": None, "pub_sub": None,
                                                 "user_pub_sub": None})
    node = Daemon(config, reactor=reactor, on_fatal=fatal.append)
    node.startService()
    await eventually(lambda: fatal, 10, "on_fatal called")
    await node.stopService()
    assert fatal == [1] and node.exit_code == 1
    assert not node.started
    # never half-started: what had started (cache, fetcher) is stopped, what came after never started
    assert node.components["cache"].started is False
    assert node.components["fetcher"].started is False
    assert "user_pub_sub" not in node.components
    critical = [e for e in captured.events if e.get("log_level") == LogLevel.critical]
    assert len(critical) == 1
    message = captured.lines()[captured.events.index(critical[0])]
    assert message == ("component pub_sub failed to start: OSError: cannot open the subscription store "
                       "/nonexistent; stopping node unit")
    assert critical[0]["component"] == "pub_sub"


@pytest_twisted.ensureDeferred
async def test_an_unreachable_broker_is_retried_and_the_node_waits(tmp_path: Path,
                                                                   captured: LogCapture) -> None:
    port = free_port()  # nothing listens there
    config = memory_config(tmp_path, broker=f"amqp://guest:s3cret-pw@127.0.0.1:{port}/",
                           timeouts={"connect": 1, "shutdown": 1})
    fatal: List[int] = []
    node = Daemon(config, reactor=reactor, on_fatal=fatal.append)
    node.startService()
    try:
        await eventually(lambda: sum("unreachable" in line for line in captured.lines()) >= 2, 15,
                         "two retries logged")
        assert fatal == [] and not node.started
        assert node.health() == {"ok": False, "broker": "down",
                                 "components": {"cache": False, "fetcher": False, "notification": False}}
    finally:
        await node.stopService()
    assert fatal == []
    # what the log shows has no password
    out = io.StringIO()
    observer = make_observer(config, out)
    for event in captured.events:
        observer(event)
    assert "s3cret-pw" not in out.getvalue()
    assert f"guest:***@127.0.0.1:{port}" in out.getvalue() or "guest@127.0.0.1" in out.getvalue()


def test_registry_maps_every_component() -> None:
    from ooidx.config import COMPONENTS

    for name in COMPONENTS:
        cls = component_class(name)
        assert issubclass(cls, Component), name
    assert component_class("web").__name__ == "Web"


# --------------------------------------------------------------------------- #
# logging


def event(message: str, level: LogLevel = LogLevel.info, namespace: str = "magnet.amqp.AMQPTransport",
          **fields: Any) -> dict:
    return {"log_format": message, "log_level": level, "log_namespace": namespace, "log_time": 1700000000.25,
            **fields}


def test_text_lines_name_time_level_node_and_component() -> None:
    out = io.StringIO()
    observer = LineObserver(out, node="edge-1")
    observer(event("fetched {url}", url="http://x/", component="fetcher"))
    observer(event("link up"))
    lines = out.getvalue().splitlines()
    assert lines == [
        "2023-11-14T22:13:20.250Z info     edge-1 fetcher: fetched http://x/",
        "2023-11-14T22:13:20.250Z info     edge-1 magnet.amqp: link up",
    ]


def test_json_lines_are_one_object_per_line() -> None:
    out = io.StringIO()
    observer = LineObserver(out, node="w", format="json", component="fetcher")
    observer(event("a\nb {n}", n=1, level=LogLevel.warn))
    try:
        1 / 0
    except ZeroDivisionError:
        observer(event("it broke", level=LogLevel.error, log_failure=Failure()))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first == {"time": "2023-11-14T22:13:20.250Z", "level": "warn", "node": "w", "component": "fetcher",
                     "namespace": "magnet.amqp.AMQPTransport", "message": "a\nb 1"}
    assert second["message"] == "it broke" and "ZeroDivisionError" in second["traceback"]


def test_a_failure_stays_on_one_text_line() -> None:
    out = io.StringIO()
    try:
        raise ValueError("bad")
    except ValueError:
        LineObserver(out, node="n")(event("oops", level=LogLevel.critical, log_failure=Failure()))
    assert out.getvalue().count("\n") == 1
    assert "critical" in out.getvalue() and "ValueError: bad" in out.getvalue()


def test_no_secret_in_any_line(tmp_path: Path) -> None:
    token = "operator-token-0123456789abcdef"
    config = parse(f"node: n\nbroker: amqp://dx:p%40ss-w0rd@rabbit:5672/dx\nsecurity: {{token: {token}}}\n"
                   "components: {fetcher: }\nlogging: {format: json}\n", str(tmp_path / "x.yaml"))
    out = io.StringIO()
    observer = make_observer(config, out)
    observer(event("connecting to {url}", url="amqp://dx:p%40ss-w0rd@rabbit:5672/dx"))
    observer(event("decoded {pw} and {other}", pw="p@ss-w0rd", other="amqps://u:zz-top@h/"))
    observer(event("token is {t}", t=token))
    try:
        raise RuntimeError(f"failed at amqp://dx:p%40ss-w0rd@rabbit:5672/dx with {token}")
    except RuntimeError:
        observer(event("boom", level=LogLevel.error, log_failure=Failure()))
    text = out.getvalue()
    for secret in ("p%40ss-w0rd", "p@ss-w0rd", "zz-top", token):
        assert secret not in text
    messages = [json.loads(line)["message"] for line in text.splitlines()]
    assert messages[:3] == ["connecting to amqp://dx:***@rabbit:5672/dx", "decoded *** and amqps://u:***@h/",
                            "token is ***"]


def test_redactor_masks_url_passwords_and_added_secrets() -> None:
    redact = Redactor(["generated-token-xyz"])
    assert redact("amqp://guest:guest@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert redact("no password amqp://guest@h/ here") == "no password amqp://guest@h/ here"
    assert redact("postgresql://u:pw@db/x, amqp://:p@h/") == "postgresql://u:***@db/x, amqp://:***@h/"
    assert redact("Bearer generated-token-xyz") == "Bearer ***"


def test_level_filter() -> None:
    config = parse("node: n\ncomponents: {fetcher: }\nlogging: {level: warn}\n", "x.yaml")
    out = io.StringIO()
    observer = make_observer(config, out)
    observer(event("quiet", level=LogLevel.info))
    observer(event("loud", level=LogLevel.warn))
    observer(event("louder", level=LogLevel.error))
    assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == ["loud", "louder"]


def test_child_output_is_relayed_as_it_is() -> None:
    config = parse("node: n\ncomponents: {fetcher: }\nlogging: {level: error}\n", "x.yaml")
    out = io.StringIO()
    observer = make_observer(config, out)
    child_line = "2023-11-14T22:13:20.250Z info     n fetcher: fetched amqp://a:b@c/"
    observer({"log_format": "[{tag}] {line}", "tag": "fetcher.0", "line": child_line, "stream": "stdout",
              "log_level": LogLevel.info, "log_namespace": CHILD_OUTPUT_NAMESPACE, "log_time": 1.0})
    assert out.getvalue() == child_line.replace("a:b@", "a:***@") + "\n"


def test_components_log_with_their_name() -> None:
    out = io.StringIO()
    observer = LineObserver(out, node="n")
    log = Logger(observer=observer, namespace="ooidx.component.Component")
    log.info("{component} started on {node}", component="csv", node="n")
    assert " n csv: csv started on n" in out.getvalue()


# --------------------------------------------------------------------------- #
# twistd -n ooidx, as a process


BAD_CONFIGS = {
    "malformed YAML": ("node: [unclosed\ncomponents: {}\n", "not valid YAML"),
    "unknown key": ("node: n\ncomponets: {fetcher: }\n", "componets: unknown key"),
    "unknown component": ("node: n\ncomponents: {fetchr: }\n", "components.fetchr: unknown component"),
    "wrong type": ("node: n\ncomponents: {fetcher: {instances: four}}\n",
                   "components.fetcher.instances: expected an integer >= 1, got 'four'"),
    "child on memory": ("node: n\ncomponents: {fetcher: {process: child}}\n",
                        "components.fetcher.process: 'child' needs a broker"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors_are_one_line_and_a_nonzero_exit(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_twistd(path)
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ooidx: ") and str(path) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_a_port_in_use_is_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = write_config(tmp_path / "busy.yaml", node="n", broker="memory://",
                            components={"web": None}, http={"web_port": port, "proxy_port": 0})
        result = run_twistd(path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"ooidx: {path}: http.web_port: port {port} on 127.0.0.1 is in use"], result.stderr
    assert "Traceback" not in result.stdout


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_twistd(tmp_path / "nope.yaml")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot read config" in result.stderr


@pytest.fixture
def daemons() -> Any:
    made: List[DaemonProcess] = []
    yield made
    for d in made:
        d.kill()


def node_config(tmp_path: Path, name: str = "n1", **settings: Any) -> Path:
    settings.setdefault("node", name)
    settings.setdefault("broker", "memory://")
    settings.setdefault("components", {"fetcher": {"instances": 2}, "cache": None, "notification": None})
    settings.setdefault("http", {"web_port": 0, "proxy_port": 0})
    settings.setdefault("timeouts", {"shutdown": 3})
    return write_config(tmp_path / f"{name}.yaml", **settings)


def test_sigterm_stops_cleanly_with_status_zero(tmp_path: Path, daemons: List[DaemonProcess]) -> None:
    d = DaemonProcess(node_config(tmp_path))
    daemons.append(d)
    d.wait_log("node n1 started: 3 component(s)")  # logged once the reactor runs
    began = time.monotonic()
    d.terminate()
    assert d.wait_exit(3 + 10) == 0, d.describe()
    assert time.monotonic() - began < 3 + 5
    log = d.log()
    for line in ("Received SIGTERM", "node n1 stopping", "node n1 stopped cleanly", "Server Shut Down."):
        assert line in log, d.describe()
    assert log.index("node n1 stopping") < log.index("node n1 stopped cleanly")
    assert "Traceback" not in log + d.stderr()
    assert d.stderr().strip() == ""


def test_json_logs_from_twistd(tmp_path: Path, daemons: List[DaemonProcess]) -> None:
    d = DaemonProcess(node_config(tmp_path, logging={"format": "json", "level": "info"}))
    daemons.append(d)
    d.wait_log('node n1 started')
    d.terminate()
    assert d.wait_exit(15) == 0
    records = [json.loads(line) for line in d.log().splitlines()]
    assert {r["node"] for r in records} == {"n1"}
    assert {"fetcher", "cache", "notification", "ooidx.node.daemon"} <= {r["component"] for r in records}
    assert all(set(r) >= {"time", "level", "node", "component", "message"} for r in records)


FAILING_CACHE = """
import dataclasses, ooidx.wire as wire, ooidx.component as component
class FailingCache(component.Component):
    def setUp(self):
        raise OSError('cannot open the cache store')
import sys; sys.modules['failing_cache'] = type(sys)('failing_cache')
sys.modules['failing_cache'].FailingCache = FailingCache
wire.BY_NAME['cache'] = dataclasses.replace(wire.BY_NAME['cache'], implementation='failing_cache:FailingCache')
"""


def test_a_failed_start_exits_nonzero_with_one_clear_line(tmp_path: Path, daemons: List[DaemonProcess]) -> None:
    from twistd_helpers import environment

    d = DaemonProcess(node_config(tmp_path), env=environment(OOIDX_TEST_PRELUDE=FAILING_CACHE), launcher=True)
    daemons.append(d)
    code = d.wait_exit(30)
    assert code == 1, d.describe()
    critical = [line for line in d.log().splitlines() if " critical " in line]
    assert len(critical) == 1, d.describe()
    assert critical[0].endswith("cache: component cache failed to start: OSError: cannot open the cache store; "
                                "stopping node n1")
    assert "node n1 stopped cleanly" in d.log()
    assert "Server Shut Down." in d.log()
    assert "Traceback" not in d.log() + d.stderr()


def test_child_stderr_names_its_component_and_empty_lines_are_dropped() -> None:
    out = io.StringIO()
    observer = LineObserver(out, node="n")
    for line, stream in (("", "stdout"), ("", "stderr"), ("ImportError: no module x", "stderr")):
        observer({"log_format": "[{tag}] {line}", "tag": "fetcher.1", "line": line, "stream": stream,
                  "log_level": LogLevel.info, "log_namespace": CHILD_OUTPUT_NAMESPACE, "log_time": 1.0})
    assert out.getvalue().splitlines() == [
        "1970-01-01T00:00:01.000Z info     n fetcher: [fetcher.1] ImportError: no module x"]
