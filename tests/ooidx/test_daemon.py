"""The node against a real AMQP port, and `twistd -n ooidx` as a real process
(config errors, clean stop, a failed start). The Daemon in-process on the
memory bus and its logging are in the fast tier, tests/fast/node/."""
from __future__ import annotations

import io
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from ooidx.config import load
from ooidx.node.daemon import Daemon
from ooidx.node.logs import LineObserver, make_observer

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
        health = node.health()
        assert {k: health[k] for k in ("ok", "broker", "components")} == {
            "ok": False, "broker": "down", "components": {"cache": False, "fetcher": False, "notification": False}}
        assert "refused" in health["broker_error"].lower(), health  # the last attempt's error: why
        assert health["broker_down_since"].endswith("Z"), health
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
    def __init__(self, name, bus, options=None, directory=None, security=None, fetch_options=None, **kwargs):
        super().__init__(name, bus, **kwargs)
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


# --------------------------------------------------------------------------- #
# a wrong broker (issue 18)


def _healthz(port: int) -> Any:
    import urllib.error
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_refused_login_stops_the_start_with_one_line_and_exit_1(tmp_path: Path,
                                                                   daemons: List[DaemonProcess]) -> None:
    """The real RabbitMQ, a wrong password: no retry helps, so the node says
    so once and exits 1 (systemd retries), instead of retrying forever."""
    web_port = free_port()
    d = DaemonProcess(node_config(tmp_path, broker="amqp://guest:wrong-Passw0rd@127.0.0.1:5672/",
                                  components={"fetcher": None, "web": None},
                                  http={"web_port": web_port, "proxy_port": 0},
                                  timeouts={"shutdown": 3, "connect": 2}))
    daemons.append(d)
    assert d.wait_exit(30) == 1, d.describe()
    log = d.log()
    critical = [line for line in log.splitlines() if " critical " in line]
    assert len(critical) == 1, d.describe()
    assert "refused the login (403 ACCESS_REFUSED" in critical[0], critical
    assert "check the user and password of broker: in " in critical[0] and "n1.yaml" in critical[0], critical
    assert "amqp://guest:***@127.0.0.1:5672/" in critical[0], critical
    assert "wrong-Passw0rd" not in log + d.stderr()
    assert log.count("retrying in") <= 1, d.describe()  # not retried like a network error
    # the one clear line: nothing else at warn or above says it (the link's and
    # the protocol's own lines about the refusal are info)
    loud = [line for line in log.splitlines() if " warn " in line or " error " in line]
    assert not [line for line in loud if "refused" in line or "closed the connection" in line], loud
    assert "Traceback" not in log + d.stderr()


def test_an_unreachable_broker_opens_the_web_port_and_healthz_says_why(tmp_path: Path,
                                                                        daemons: List[DaemonProcess]) -> None:
    """A closed broker port: the node keeps retrying, but the web port opens at
    once and /healthz answers 503 with the reason; guest:guest is masked like
    any other credentials (the user name shown, the password not)."""
    web_port, closed = free_port(), free_port()
    d = DaemonProcess(node_config(tmp_path, broker=f"amqp://guest:guest@127.0.0.1:{closed}/",
                                  components={"fetcher": None, "web": None},
                                  http={"web_port": web_port, "proxy_port": 0},
                                  timeouts={"shutdown": 3, "connect": 1}))
    daemons.append(d)
    d.wait_log(f"web listening on http://127.0.0.1:{web_port}", 20)
    d.wait_log("broker unreachable", 20)
    code, health = _healthz(web_port)
    assert code == 503, health
    assert health["ok"] is False and health["broker"] == "down", health
    assert "refused" in health["broker_error"].lower(), health
    assert health["broker_down_since"].endswith("Z"), health
    assert health["components"] == {"fetcher": False, "web": True}, health
    log = d.log()
    assert f"amqp://guest:***@127.0.0.1:{closed}/" in log, d.describe()
    assert "***:***@" not in log, d.describe()
    d.terminate()
    assert d.wait_exit(15) == 0, d.describe()


def _open_files_soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


@pytest.mark.parametrize("soft,hard", [(256, 256), (256, 8192)])
def test_the_node_raises_its_open_files_limit_or_warns(tmp_path: Path, daemons: List[DaemonProcess], soft: int,
                                                       hard: int) -> None:
    """Every HTTP client is an open file: a node started under a low soft
    limit raises it to the hard one, and warns when it stays under 4096
    (ooidx.node.limits; 500 clients on one node in tests/reliability/test_load_500.py)."""
    from twistd_helpers import environment

    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))"
    d = DaemonProcess(node_config(tmp_path), env=environment(OOIDX_TEST_PRELUDE=prelude), launcher=True)
    daemons.append(d)
    d.wait_log("node n1 started")
    assert _open_files_soft_limit(d.pid) == hard
    log = d.log()
    if hard == soft:
        assert f"node n1: open files limit {soft}, hard limit {hard}: room for about" in log, d.describe()
        warning = [line for line in log.splitlines() if "open files limited to 256 (hard limit 256)" in line]
        assert len(warning) == 1 and " warn " in warning[0], d.describe()
        assert "ulimit -n" in warning[0]
    else:
        assert f"node n1: open files limit {hard} (raised from {soft}), hard limit {hard}" in log, d.describe()
        assert "open files limited" not in log
    d.terminate()
    assert d.wait_exit(15) == 0, d.describe()
