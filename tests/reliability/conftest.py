"""Fixtures of the reliability suite.

- ``record``: ``record(scenario, suite="faults", **figures)`` appends one result
  line (``tests.reliability.results.record``: the fields) to the results
  file, ``OOIDX_RELIABILITY_RESULTS`` or ``.reliability/results.jsonl``.
- ``vhost`` (tests/conftest.py, tests.support.vhost): the amqp:// URL of a
  virtual host of this test's own on the shared broker (component queues have
  fixed names; nothing else consumes them there), or a private node when
  rabbitmqctl cannot manage the broker. Never stopped.
- ``private_rabbitmq`` / ``private_rabbitmq_factory`` (tests/conftest.py): nodes
  of the test's own, for the faults that kill or restart a broker.
- ``rabbit_cluster``: three private nodes joined in one RabbitMQ cluster;
  ``rabbit_cluster_pause_minority``: the same with ``pause_minority`` and a
  short ``net_ticktime``, for the partition scenario.
- ``nodes``: a list; every ``faultlib.Node`` put in it is killed at teardown.
- ``buses``: ``make(urls, **options)`` -> a started magnet Bus, stopped at teardown.
- ``upstream``: the real DAP upstream (pydap's server, plus /big/ and /pattern/).
"""
from __future__ import annotations

import os
import time
from typing import Any, List, Optional

import pytest
import pytest_twisted

from tests.reliability.results import record as record_result
from tests.reliability.faultlib import OOIDX_TESTS, make_bus  # noqa: F401 - sets sys.path for the helpers

from dap_upstream import Upstream, make_files  # noqa: E402


def pytest_collection_modifyitems(items: List[Any]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.rabbitmq)


@pytest.fixture
def record() -> Any:
    def write(scenario: str, suite: str = "faults", **figures: Any) -> dict:
        line = record_result(suite, scenario, **figures)
        import sys
        sys.__stderr__.write(f"\n[reliability] {line}\n")
        return line

    return write


@pytest.fixture
def nodes() -> Any:
    made: List[Any] = []
    yield made
    for node in made:
        node.daemon.kill()


@pytest.fixture
def buses() -> Any:
    made: List[Any] = []

    def make(urls: Any, **options: Any) -> Any:
        bus = make_bus(urls, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        if bus.running:
            from twisted.internet import reactor
            pytest_twisted.blockon(bus.stopService().addTimeout(15, reactor))


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: Any) -> Any:
    directory = tmp_path_factory.mktemp("reliability-dap")
    files = make_files(directory)
    with Upstream(directory) as up:
        up.files = files
        yield up


class Cluster:
    """Three private RabbitMQ nodes of one cluster (one Erlang cookie)."""

    def __init__(self, nodes: List[Any]) -> None:
        self.nodes = nodes
        self.formed_seconds = 0.0

    @property
    def urls(self) -> List[str]:
        return [n.url for n in self.nodes]

    def by_port(self, port: int) -> Any:
        return next(n for n in self.nodes if n.port == port)


def form_cluster(make_node: Any, size: int = 3, partition_handling: Optional[str] = None,
                 net_ticktime: Optional[int] = None) -> Cluster:
    """Start C{size} private nodes sharing one cookie and join them to the
    first (stop_app, reset, join_cluster, start_app). Fails with rabbitmqctl's
    own words if the cluster cannot be formed.

    Node i opens its links to the other nodes from a loopback address of its
    own (C{node.dist_ip}, 127.0.0.(40+i)), so a firewall rule can tell them
    apart (faultlib.DistPartition). C{partition_handling} is RabbitMQ's
    C{cluster_partition_handling}; C{net_ticktime} (seconds, the node and its
    rabbitmqctl alike) bounds how long a silent link takes to count as down
    (RabbitMQ's default is 60 s)."""
    started = time.monotonic()
    nodes = [make_node(start=False) for _ in range(size)]
    base = 40 + (os.getpid() % 50) * 4
    for i, n in enumerate(nodes):
        n.dist_ip = f"127.0.0.{base + i}"
        with open(os.path.join(n.basedir, "advanced.config"), "w") as f:
            f.write("[{kernel, [{inet_dist_connect_options, [{ip, {%s}}]}]}].\n" % n.dist_ip.replace(".", ","))
        if partition_handling:
            with open(os.path.join(n.basedir, "rabbitmq.conf"), "a") as f:
                f.write(f"cluster_partition_handling = {partition_handling}\n")
        if net_ticktime:
            n.extra_erl_flags = f"-kernel net_ticktime {int(net_ticktime)}"
    cookie_of = lambda n: os.path.join(n.basedir, "home", ".erlang.cookie")  # noqa: E731
    with open(cookie_of(nodes[0])) as f:
        cookie = f.read()
    for n in nodes[1:]:
        path = cookie_of(n)
        os.chmod(path, 0o600)
        with open(path, "w") as f:
            f.write(cookie)
        os.chmod(path, 0o400)
    for n in nodes:
        n.start()
    for n in nodes[1:]:
        for args in (["stop_app"], ["reset"], ["join_cluster", nodes[0].nodename], ["start_app"]):
            done = n.ctl(*args, timeout=120)
            if done.returncode != 0:
                pytest.fail(f"cannot form a RabbitMQ cluster: rabbitmqctl -n {n.nodename} {' '.join(args)} "
                            f"exited {done.returncode}:\n{done.stdout.decode(errors='replace')[-2000:]}",
                            pytrace=False)
    status = nodes[0].ctl("cluster_status", "--formatter", "json", timeout=60)
    text = status.stdout.decode(errors="replace")
    for n in nodes:
        assert n.nodename in text, f"{n.nodename} not in the cluster:\n{text[-2000:]}"
    cluster = Cluster(nodes)
    cluster.formed_seconds = time.monotonic() - started
    return cluster


@pytest.fixture
def rabbit_cluster(private_rabbitmq_factory: Any) -> Any:
    return form_cluster(private_rabbitmq_factory)


@pytest.fixture
def rabbit_cluster_pause_minority(private_rabbitmq_factory: Any) -> Any:
    """Three nodes with C{cluster_partition_handling = pause_minority} and a
    6 s C{net_ticktime}: a node cut off from the other two pauses within
    about 6-8 s, and comes back by itself once its links do."""
    return form_cluster(private_rabbitmq_factory, partition_handling="pause_minority", net_ticktime=6)
