"""Nodes as separate `twistd -n ooidx` processes on RabbitMQ, doing real work
across them: child processes supervised and restarted, two nodes with
different component sets seen from outside (bus, status, HTTP).

The component queues have fixed names (fetcher, cache, ...), so each test
runs in a RabbitMQ virtual host of its own, made for it and deleted after
(or, when the test broker is not the local one rabbitmqctl manages, on a
private RabbitMQ node of its own): nothing else consumes its queues.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import reactor

import magnet
from ooidx.node.daemon import cluster_status

from twistd_helpers import Daemon, environment, eventually, free_port, write_config

pytestmark = [pytest.mark.rabbitmq]

TOKEN = "multinode-token-" + uuid.uuid4().hex


@pytest.fixture
def isolated_broker(vhost: str) -> str:
    """The amqp:// URL of a virtual host of this test's own (the suite's
    ``vhost`` fixture, tests/conftest.py)."""
    return vhost


@pytest.fixture
def daemons() -> Any:
    made: List[Daemon] = []
    yield made
    for d in made:
        d.kill()


@pytest.fixture
def test_bus(isolated_broker: str) -> Any:
    bus = magnet.connect(isolated_broker, reactor, node="tester", rpc_timeout=5, send_timeout=5,
                         shutdown_timeout=2, heartbeat=5)
    bus.startService()
    yield bus
    pytest_twisted.blockon(bus.stopService())


def start_node(tmp_path: Path, broker: str, name: str, components: dict, **settings: Any) -> Daemon:
    settings.setdefault("http", {"web_port": 0, "proxy_port": 0})
    settings.setdefault("timeouts", {"shutdown": 3, "rpc": 5})
    settings.setdefault("security", {"token": TOKEN})
    # the broker (with its password) comes from the environment, as in production
    config = write_config(tmp_path / f"{name}.yaml", node=name, broker="amqp://guest@127.0.0.1:5672/",
                          components=components, **settings)
    return Daemon(config, env=environment(OOIDX_BROKER=broker))


async def pings(bus: magnet.Bus, count: int) -> List[dict]:
    return [await bus.call("fetcher", "ping", timeout=5) for _ in range(count)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_child_processes_are_supervised_and_restarted(tmp_path: Path, isolated_broker: str,
                                                            test_bus: magnet.Bus, daemons: List[Daemon]) -> None:
    d = start_node(tmp_path, isolated_broker, "worker",
                   {"fetcher": {"instances": 2, "process": "child"}, "cache": None})
    daemons.append(d)
    await eventually(lambda: d.has("node worker started"), 60, "node started")
    await eventually(lambda: d.log().count("serving fetcher") >= 2, 60, "two fetcher children serving")

    answers = await pings(test_bus, 10)
    pids = {a["pid"] for a in answers}
    assert {a["node"] for a in answers} == {"worker"}
    assert d.pid not in pids, "fetcher must answer from a child process, not the daemon"
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode()
        assert "ooidx.node.child" in argv and "fetcher" in argv
        assert "guest:guest" not in argv and isolated_broker not in argv  # the broker is not in ps
    cache = await test_bus.call("cache", "ping", timeout=5)
    assert cache["pid"] == d.pid  # inline

    # status shows the children
    replies = await cluster_status(test_bus, timeout=1.5)
    assert [r["node"] for r in replies] == ["worker"]
    assert replies[0]["components"]["fetcher"] == {"started": True, "instances": 2, "process": "child",
                                                   "running": 2}
    assert replies[0]["broker"].startswith("amqp://guest:***@")

    # kill -9 one child: it comes back, and answers
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: not alive(victim) or open(f"/proc/{victim}/stat").read().split()[2] == "Z", 10,
                     "the child died")

    async def new_child_answers() -> bool:
        seen = {a["pid"] for a in await pings(test_bus, 6)}
        return bool(seen - pids)

    await eventually(new_child_answers, 45, "a restarted fetcher child answers", interval=0.5)
    assert d.has("restarting child process fetcher.")

    # SIGTERM: the daemon stops its children and exits 0
    children = {a["pid"] for a in await pings(test_bus, 6)}
    d.terminate()
    assert d.wait_exit(30) == 0, d.describe()
    for pid in children:
        await eventually(lambda: not alive(pid), 10, f"child {pid} gone")
    log = d.log()
    assert "node worker stopped cleanly" in log
    assert "child process" in log and "stopped" in log
    assert "guest:guest@" not in log and "Traceback" not in log, d.describe()


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_the_work(tmp_path: Path, isolated_broker: str, test_bus: magnet.Bus,
                                        daemons: List[Daemon]) -> None:
    web_port = free_port()
    a = start_node(tmp_path, isolated_broker, "node-a",
                   {"controller": None, "attribute_store": None, "pub_sub": None, "notification": None,
                    "web": {"port": web_port}},
                   logging={"format": "json", "level": "info"})
    b = start_node(tmp_path, isolated_broker, "node-b", {"fetcher": {"instances": 2}, "cache": None})
    daemons += [a, b]
    for d, name in ((a, "node-a"), (b, "node-b")):
        await eventually(lambda: d.has(f"node {name} started"), 60, f"{name} started")

    # work for fetcher goes to node B only, whoever sends it
    answers = await pings(test_bus, 20)
    assert {x["node"] for x in answers} == {"node-b"}
    assert {x["pid"] for x in answers} == {b.pid}
    assert (await test_bus.call("controller", "ping", timeout=5))["node"] == "node-a"
    assert (await test_bus.call("attribute_store", "ping", timeout=5))["pid"] == a.pid

    # every node answers the status request, with what it runs
    replies = await cluster_status(test_bus, timeout=1.5)
    assert [r["node"] for r in replies] == ["node-a", "node-b"]
    assert set(replies[0]["components"]) == {"attribute_store", "controller", "notification", "pub_sub", "web"}
    assert replies[1]["components"] == {
        "cache": {"started": True, "instances": 1, "process": "inline"},
        "fetcher": {"started": True, "instances": 2, "process": "inline"},
    }
    assert [r["pid"] for r in replies] == [a.pid, b.pid]

    # and through node A's web edge, over HTTP
    import treq

    base = f"http://127.0.0.1:{web_port}"
    response = await treq.post(f"{base}/api/call/fetcher/ping", json={},
                               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    body = json.loads(await response.content())
    assert response.code == 200, body
    assert body["result"]["node"] == "node-b" and body["result"]["pid"] == b.pid
    response = await treq.get(f"{base}/healthz", timeout=10)
    health = json.loads(await response.content())
    assert response.code == 200 and health["ok"] is True, health
    response = await treq.get(f"{base}/api/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.code == 200
    status = json.loads(await response.content())
    assert "node-b" in json.dumps(status)

    # node A logs JSON lines, no secret in them
    for d in (a, b):
        d.terminate()
    for d in (a, b):
        assert d.wait_exit(30) == 0, d.describe()
    records = [json.loads(line) for line in a.log().splitlines()]
    assert {r["node"] for r in records} == {"node-a"}
    assert "web" in {r["component"] for r in records}
    for d in (a, b):
        assert TOKEN not in d.log() and "guest:guest@" not in d.log()


# --------------------------------------------------------------------------- #
# the children's metrics in the daemon's /metrics


def _samples(text: str) -> dict:
    """{(sample name, sorted labels): value}; the text must be valid exposition
    with each family once."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    names = []
    for family in text_string_to_metric_families(text):
        names.append(family.name)
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"{key} twice in /metrics"
            out[key] = s.value
    assert len(names) == len(set(names)), f"a family twice in /metrics: {sorted(names)}"
    return out


def _child_files(directory: Path) -> dict:
    """{pid: [file names]} of the metrics files in C{directory}."""
    import re

    out: dict = {}
    for path in directory.iterdir():
        m = re.fullmatch(r"(?:counter|histogram|gauge_[a-z]+)_([0-9]+)\.db", path.name)
        if m:
            out.setdefault(int(m.group(1)), []).append(path.name)
    return out


@pytest_twisted.ensureDeferred
async def test_child_processes_count_in_the_daemons_metrics(tmp_path: Path, isolated_broker: str,
                                                            daemons: List[Daemon]) -> None:
    """fetcher in two child processes, web in the daemon: the children's work is
    in the daemon's /metrics, under the same names and labels; a child killed
    with SIGKILL and restarted takes nothing away and adds nothing twice; bad
    files in the metrics directory are logged and left out."""
    import struct
    import time

    import treq

    web_port = free_port()
    d = start_node(tmp_path, isolated_broker, "worker",
                   {"fetcher": {"instances": 2, "process": "child"}, "web": {"port": web_port}})
    daemons.append(d)
    await eventually(lambda: d.has("node worker started"), 60, "node started")
    await eventually(lambda: d.log().count("serving fetcher") >= 2, 60, "two fetcher children serving")
    base = f"http://127.0.0.1:{web_port}"
    directory = tmp_path / "worker-data" / "child-metrics" / str(d.pid)
    scrape_times: List[float] = []

    async def metrics() -> dict:
        started = time.monotonic()
        response = await treq.get(f"{base}/metrics", timeout=10)
        body = (await response.content()).decode()
        scrape_times.append(time.monotonic() - started)
        assert response.code == 200, body
        return _samples(body)

    async def ping(count: int) -> List[int]:
        pids = []
        for _ in range(count):
            response = await treq.post(f"{base}/api/call/fetcher/ping", json={},
                                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            body = json.loads(await response.content())
            assert response.code == 200, body
            pids.append(body["result"]["pid"])
        return pids

    def value(s: dict, metric: str, /, **labels: str) -> float:
        return s.get((metric, tuple(sorted(labels.items()))), 0.0)

    def fetched(s: dict) -> float:
        return value(s, "magnet_messages_in_total", name="fetcher")

    ok = {"address": "fetcher", "op": "ping", "outcome": "ok"}

    answered = await ping(20)
    assert d.pid not in answered and len(set(answered)) == 2, answered
    s = await metrics()
    # the children's (only they consume the fetcher queue) ...
    assert fetched(s) == 20
    assert value(s, "magnet_inflight", name="fetcher") == 0
    # ... and the daemon's own (web sends the calls, takes the replies), as before
    assert value(s, "magnet_messages_out_total", name="fetcher") == 20
    assert value(s, "magnet_messages_in_total", name="magnet.listen") == 20
    assert value(s, "magnet_rpc_latency_seconds_count", **ok) == 20
    assert value(s, "magnet_rpc_latency_seconds_bucket", le="+Inf", **ok) == 20
    assert value(s, "ooidx_component_up", component="fetcher") == 1
    # the same names and labels as one process would have: no pid or child label
    assert not [k for k in s if any(label in ("pid", "child", "process") for label, _ in k[1])]
    files = _child_files(directory)
    assert set(files) == set(answered) and all(len(names) == 4 for names in files.values()), files
    used_bytes = sum(p.stat().st_blocks * 512 for p in directory.iterdir())

    # kill -9 a child: while it dies and comes back, /metrics never goes down nor doubles
    victim = answered[0]
    os.kill(victim, signal.SIGKILL)
    seen = []

    async def restarted() -> bool:
        seen.append(fetched(await metrics()))
        return d.log().count("serving fetcher") >= 3 and victim not in _child_files(directory)

    await eventually(restarted, 45, "the killed child restarted, its files gone", interval=0.05)
    assert set(seen) == {20.0}, seen
    assert d.has("restarting child process fetcher.")
    after = await ping(10)
    assert victim not in after
    s = await metrics()
    assert fetched(s) == 30
    assert value(s, "magnet_rpc_latency_seconds_count", **ok) == 30
    files = _child_files(directory)
    assert len(files) == 2 and victim not in files and set(after) <= set(files), files

    # bad input: a foreign file, a file of a pid that is not a child, a live child's file corrupted
    (directory / "notes.txt").write_text("not metrics\n")
    (directory / "counter_4000000.db").write_bytes(b"\xff" * 100)
    corrupted = sorted(after)[0]
    with open(directory / f"histogram_{corrupted}.db", "r+b") as f:
        f.write(struct.pack("i", 1 << 30))
    s = await metrics()
    assert fetched(s) == 30  # the counter files are still read
    assert value(s, "magnet_rpc_latency_seconds_count", **ok) == 30
    await eventually(lambda: d.has("notes.txt is not a metrics file of this daemon's children"), 10, "logged")
    assert d.has("counter_4000000.db is not a metrics file of this daemon's children")
    assert d.has(f"histogram_{corrupted}.db cannot be read")
    await metrics()
    assert d.log().count("notes.txt is not a metrics file") == 1  # once, not per scrape
    # the child with the corrupt file dies: its counters are kept, the unreadable file goes
    os.kill(corrupted, signal.SIGKILL)
    await eventually(lambda: corrupted not in _child_files(directory), 30, "the corrupt child's files gone")
    assert d.has(f"histogram_{corrupted}.db of an exited child cannot be read")
    assert fetched(await metrics()) == 30
    assert (directory / "notes.txt").exists()  # not ours: left alone

    # SIGTERM: the children stop, the directory goes
    d.terminate()
    assert d.wait_exit(30) == 0, d.describe()
    assert not directory.exists()
    log = d.log()
    assert "Traceback" not in log, d.describe()
    scrape_times.sort()
    print(f"\n/metrics with 2 fetcher children: {len(scrape_times)} scrapes, median "
          f"{scrape_times[len(scrape_times) // 2] * 1000:.1f} ms, max {scrape_times[-1] * 1000:.1f} ms; "
          f"the children's files take {used_bytes // 1024} KiB on disk")
