"""The ooidx command against a real web edge on loopback (memory:// bus,
a fetcher and an attribute store serving), in-process and as a subprocess.
The parsing, the HTTP client against a stand-in opener and the --broker
client on memory:// are in the fast tier, tests/fast/cli/test_cli.py."""
from __future__ import annotations

import io
import json
import os
import sys
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads, utils

import magnet

from ooidx import cli
from ooidx.node.bootstrap import declare_topology
from ooidx.component import Component
from ooidx.node.token import TOKEN_FILE
from ooidx.web.app import Web

from tests.support.doubles import EchoStore

TOKEN = "cli-test-token-" + "y" * 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeDaemon:
    def health(self) -> Dict[str, Any]:
        return {"ok": True, "broker": "up", "components": {"fetcher": True}}

    def cluster_status(self, timeout: float = 1.5) -> Any:
        return [
            {"node": "node-a", "pid": 11, "broker": "memory://", "components": {
                "fetcher": {"started": True, "instances": 2, "process": "inline"},
                "web": {"started": True, "instances": 1, "process": "inline"}}},
            {"node": "node-b", "pid": 22, "broker": "memory://", "components": {
                "csv": {"started": False, "instances": 3, "process": "child", "running": 1}}},
        ]


class Daemonish:
    """A web edge and a bus with components, as a daemon would have them."""

    def __init__(self) -> None:
        self.bus = magnet.connect(f"memory://cli-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
        self.fetcher = Component("fetcher", self.bus, node="node-a")
        daemon = FakeDaemon()
        self.web = Web("web", self.bus, node="node-a", port=0, token=TOKEN, health=daemon.health,
                       cluster_status=daemon.cluster_status)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.fetcher.start()
        yield self.bus.serve("attribute_store", EchoStore())
        yield self.web.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.web.stopService()
        yield self.fetcher.stopService()
        yield self.bus.stopService()


@pytest_twisted.async_yield_fixture
async def daemon() -> Any:
    d = Daemonish()
    await d.start()
    yield d
    await d.stop()


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOIDX_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_in_thread(argv: List[str], environ: Optional[Dict[str, str]] = None) -> defer.Deferred:
    """(exit status, stdout, stderr) of cli.run in a thread, so the reactor keeps serving."""
    out, err = io.StringIO(), io.StringIO()

    def go() -> Tuple[int, str, str]:
        code = cli.run(argv, stdout=out, stderr=err, environ=environ if environ is not None else clean_env())
        return code, out.getvalue(), err.getvalue()

    return threads.deferToThread(go)


def run_process(args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> Any:
    """(stdout, stderr, exit status) of `python -m ooidx.cli ARGS`."""
    return utils.getProcessOutputAndValue(sys.executable, ["-m", "ooidx.cli", *args],
                                          env=env if env is not None else clean_env(), path=cwd or ROOT)


# --------------------------------------------------------------------------- #
# as a subprocess: the real console entry point


@pytest_twisted.ensureDeferred
async def test_call_ping_subprocess(daemon: Daemonish) -> None:
    out, err, code = await run_process(["--url", daemon.web.url, "--token", TOKEN, "call", "fetcher", "ping"])
    assert code == 0, err
    assert json.loads(out) == {"component": "fetcher", "node": "node-a", "pid": os.getpid()}
    assert out.startswith(b"{\n  ")  # pretty
    assert err == b""


@pytest_twisted.ensureDeferred
async def test_call_remote_error_subprocess(daemon: Daemonish) -> None:
    out, err, code = await run_process(["--url", daemon.web.url, "call", "attribute_store", "get", "key=nope"],
                                       env=clean_env(OOIDX_TOKEN=TOKEN))
    assert code == 1
    assert out == b""
    assert err == b"error: KeyError: 'nope'\n"


@pytest_twisted.ensureDeferred
async def test_url_from_environment_and_bytes_result_subprocess(daemon: Daemonish) -> None:
    out, err, code = await run_process(["call", "attribute_store", "raw"],
                                       env=clean_env(OOIDX_TOKEN=TOKEN, OOIDX_URL=daemon.web.url))
    assert code == 0, err
    assert out == b"\x00raw\xff"


@pytest_twisted.ensureDeferred
async def test_unreachable_daemon_is_exit_3_subprocess(daemon: Daemonish) -> None:
    port = daemon.web.port
    await daemon.web.stopService()
    out, err, code = await run_process(["--url", f"http://127.0.0.1:{port}", "--token", TOKEN,
                                        "call", "fetcher", "ping"])
    assert code == 3
    assert err.startswith(b"error: cannot reach the daemon at http://127.0.0.1:")


@pytest.mark.parametrize("args", [
    [],
    ["call"],
    ["call", "fetcher"],
    ["call", "fetcher", "ping", "novalue"],
    ["call", "fetcher", "ping", "=1"],
    ["call", "fetcher", "ping", "a=1", "a=2"],
    ["--timeout", "-1", "call", "fetcher", "ping"],
    ["--timeout", "nan", "call", "fetcher", "ping"],
    ["--url", "ftp://x", "call", "fetcher", "ping"],
    ["--broker", "memory://", "call", "fetcher", "ping"],
    ["--broker", "not a url", "status"],
    ["nosuchcommand"],
])
@pytest_twisted.ensureDeferred
async def test_usage_errors_are_exit_2_subprocess(args: List[str]) -> None:
    out, err, code = await run_process(["--token", TOKEN, *args])
    assert code == 2, (out, err)
    assert err


@pytest_twisted.ensureDeferred
async def test_token_found_through_default_config_subprocess(daemon: Daemonish, tmp_path: Any) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "dx.yaml").write_text("broker: memory://\ndata_dir: ../var\n")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / TOKEN_FILE).write_text(TOKEN + "\n")
    out, err, code = await run_process(["--url", daemon.web.url, "call", "fetcher", "ping"], cwd=str(tmp_path))
    assert code == 0, err
    assert json.loads(out)["component"] == "fetcher"


# --------------------------------------------------------------------------- #
# in-process (cli.run in a thread)


@pytest_twisted.ensureDeferred
async def test_call_with_arguments(daemon: Daemonish) -> None:
    code, out, err = await run_in_thread(["--url", daemon.web.url, "--token", TOKEN, "call", "attribute_store",
                                          "echo", "n=1", "x=2.5", "b=true", "z=null", "l=[1,\"x\"]",
                                          "s=plain text", "q=\"42\"", "e=", "eq=a=b"])
    assert code == 0, err
    assert json.loads(out) == {"n": 1, "x": 2.5, "b": True, "z": None, "l": [1, "x"], "s": "plain text",
                               "q": "42", "e": "", "eq": "a=b"}


@pytest.mark.parametrize("argv, expected", [
    (["call", "attribute_store", "get"], "error: BadArguments: "),
    (["call", "attribute_store", "nope"], "error: UnknownOperation: "),
    (["call", "nosuch", "ping"], "error: UnknownService: "),
    (["call", "Fetcher", "ping"], "error: BadRequest: bad service name"),
    (["call", "fetcher/../x", "ping"], "error: BadRequest: bad service name"),
    (["--timeout", "0.3", "call", "csv", "ping"], "error: Timeout: "),
])
@pytest_twisted.ensureDeferred
async def test_error_answers_are_exit_1(daemon: Daemonish, argv: List[str], expected: str) -> None:
    code, out, err = await run_in_thread(["--url", daemon.web.url, "--token", TOKEN, *argv])
    assert code == 1
    assert out == ""
    assert err.startswith(expected), err


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_token(daemon: Daemonish, tmp_path: Any) -> None:
    code, _, err = await run_in_thread(["--url", daemon.web.url, "--token", "wrong-token-wrong-token",
                                        "call", "fetcher", "ping"])
    assert code == 1
    assert err == "error: Unauthorized: the operator token is not valid\n"
    code, _, err = await run_in_thread(["--url", daemon.web.url, "--config", str(tmp_path / "none.yaml"),
                                        "call", "fetcher", "ping"])
    assert code == 2
    assert "none.yaml" in err
    (tmp_path / "dx.yaml").write_text("data_dir: data\n")
    code, _, err = await run_in_thread(["--url", daemon.web.url, "--config", str(tmp_path / "dx.yaml"),
                                        "call", "fetcher", "ping"])
    assert code == 1
    assert err.startswith("error: Unauthorized: an operator token is required")
    assert "OOIDX_TOKEN" in err


@pytest_twisted.ensureDeferred
async def test_status_table(daemon: Daemonish) -> None:
    code, out, err = await run_in_thread(["--url", daemon.web.url, "status"])  # no token needed
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "COMPONENT", "STARTED", "INSTANCES", "PROCESS", "PID"]
    assert [line.split() for line in lines[1:]] == [
        ["node-a", "fetcher", "yes", "2", "inline", "11"],
        ["node-a", "web", "yes", "1", "inline", "11"],
        ["node-b", "csv", "NO", "1/3", "child", "22"],
    ]


@pytest_twisted.ensureDeferred
async def test_status_json(daemon: Daemonish) -> None:
    code, out, err = await run_in_thread(["--url", daemon.web.url, "status", "--json"])
    assert code == 0, err
    assert [n["node"] for n in json.loads(out)] == ["node-a", "node-b"]


# --------------------------------------------------------------------------- #
# straight through a broker (the --broker client on memory:// is in tests/fast/cli)


@pytest_twisted.ensureDeferred
async def test_broker_unreachable_is_exit_3_subprocess() -> None:
    # (task.react cannot run inside the test's own reactor: a process it is.)
    out, err, code = await run_process(["--broker", "amqp://guest:secret@127.0.0.1:1/", "--timeout", "1",
                                        "call", "fetcher", "ping"])
    assert code == 3, err
    assert err.startswith(b"error: cannot reach the broker")
    assert b"secret" not in err


@pytest.mark.rabbitmq
@pytest_twisted.ensureDeferred
async def test_call_straight_through_rabbitmq_subprocess(broker_url: str) -> None:
    node = f"cli-{uuid.uuid4().hex[:8]}"
    bus = magnet.connect(broker_url, reactor, node=node, rpc_timeout=5)
    bus.startService()
    csv = Component("csv", bus, node=node)
    try:
        await bus.when_connected(10)
        await declare_topology(bus)
        await csv.start()
        out, err, code = await run_process(["--broker", broker_url, "--timeout", "10", "call", "csv", "ping"])
        assert code == 0, err
        assert json.loads(out) == {"component": "csv", "node": node, "pid": os.getpid()}
        out, err, code = await run_process(["--broker", broker_url, "--timeout", "10", "call", "csv", "nope"])
        assert code == 1
        assert err.startswith(b"error: UnknownOperation: ")
    finally:
        await csv.stopService()
        await bus.stopService()
