"""Scenario 5: a RabbitMQ cluster of three private nodes on this machine
(each its own node name, ports and data directory; one Erlang cookie; joined
with rabbitmqctl stop_app / reset / join_cluster / start_app).

The daemon is given all three URLs and ``queue_type: quorum``: its worker
queues are quorum queues, replicated on the three nodes. Under a steady load
of worker-queue tasks, the node the daemon is connected to is killed (-9):
the daemon fails over to another node within seconds, and no task whose
send was confirmed is lost.

The daemon's link and the test's producer bus both start on the first URL,
where the worker queues' leaders are (they were declared there): the kill
takes the leaders with it. RabbitMQ 3.10 then refuses (basic.nack), for the
channel's whole life, every publish of a channel whose first publish to a
quorum queue came before the queue's record named its new leader; magnet
publishes a refused message again on a fresh channel (magnet.amqp,
``nack_retries``), so sends are confirmed again within about a second.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.reliability.faultlib import TaskProducer, eventually, sleep, start_node, wait_started

pytestmark = [pytest.mark.slow]

FAILOVER_BOUND = 15.0
_CONNECTED = re.compile(r"connected to broker amqp://[^@]*@127\.0\.0\.1:(\d+)/")


def connected_ports(log: str) -> list:
    return [int(p) for p in _CONNECTED.findall(log)]


@pytest_twisted.ensureDeferred
async def test_cluster_node_killed_under_load_daemon_fails_over(tmp_path: Path, rabbit_cluster: Any, nodes: list,
                                                                buses: Any, record: Any) -> None:
    cluster = rabbit_cluster
    node = start_node(tmp_path, "dx", cluster.urls, {"attribute_store": None, "controller": None},
                      queue_type="quorum", timeouts={"heartbeat": 1, "connect": 2})
    nodes.append(node)
    await wait_started(node)
    bus = buses(cluster.urls, queue_type="quorum")
    await bus.when_connected(30)

    # worker queues are quorum queues, with a member on every node
    listed = cluster.nodes[0].ctl("list_queues", "name", "type", "--formatter", "json").stdout.decode()
    assert re.search(r'"name":"controller","type":"quorum"', listed.replace(" ", "")), listed[-2000:]
    assert re.search(r'"name":"attribute_store","type":"quorum"', listed.replace(" ", "")), listed[-2000:]

    producer = TaskProducer(bus, rate=100, concurrency=5).start()
    await sleep(4)
    ports = connected_ports(node.log())
    assert ports, node.describe()
    victim = cluster.by_port(ports[-1])
    seen = len(ports)
    producer_port = bus.transport._protocol.url.port if bus.transport._protocol is not None else None

    t_kill = time.monotonic()
    await deferToThread(victim.kill)
    await eventually(lambda: len(connected_ports(node.log())) > seen, 60, "the daemon connected to another node",
                     interval=0.05)
    t_link = time.monotonic() - t_kill
    new_port = connected_ports(node.log())[-1]
    assert new_port != victim.port
    # and work flows again: a task sent now is done
    probe = TaskProducer(bus, rate=20, concurrency=1).start()
    try:
        await eventually(lambda: probe.confirmed, 30, "a send confirmed after the kill")
    except AssertionError as e:
        alive = next(n for n in cluster.nodes if n is not victim)
        fresh = buses(alive.url, queue_type="quorum")
        await fresh.when_connected(20)
        try:
            await fresh.post("controller", "record", dataset="fresh-probe")
            fresh_result = "a fresh connection's post is confirmed"
        except Exception as f:  # noqa: BLE001 - a diagnosis
            fresh_result = f"a fresh connection's post fails too: {f!r}"
        e = AssertionError(f"{e}; {fresh_result}")
        await producer.stop()
        record("cluster: connected node kill -9 (quorum queues)", faults_injected=1, sent=producer.sent,
               confirmed=len(producer.confirmed), errors=len(probe.failed),
               notes=f"daemon linked to another node after {t_link:.1f} s, but no send confirmed on the "
                     f"reconnected link within 30 s; {fresh_result}")
        queues = alive.ctl("list_queues", "name", "type", "leader", "members", "online").stdout.decode()
        raise AssertionError(f"{e}: {probe.failed[-3:]} {bus.transport!r}\n{queues}\n{victim.nodename}\n"
                             + alive.log_tail(30)) from None
    await probe.stop()
    await eventually(lambda: _all_counted(probe, bus), 30, "a task sent after the kill done", interval=0.1)
    t_work = time.monotonic() - t_kill
    await sleep(3)
    await producer.stop()
    figures = await producer.settle(bus, timeout=60)
    after = [t - t_kill for t in producer.confirm_times if t > t_kill]
    t_confirm = f"{min(after):.2f} s" if after else "never"
    notes = (f"cluster formed in {cluster.formed_seconds:.0f} s; daemon (and producer, on :{producer_port}) "
             f"on :{victim.port} killed -9; daemon linked to :{new_port} after {t_link:.1f} s; first send "
             f"confirmed {t_confirm} after the kill (producer: {bus.transport.nacked} refused by basic.nack and "
             f"sent again, {bus.transport.publishers_replaced} publishing channels replaced); a new task done "
             f"{t_work:.1f} s after the kill; "
             f"failed sends {figures['failed_sends']} {figures['failed_examples'][:2]}")
    record("cluster: connected node kill -9 (quorum queues)", faults_injected=1, sent=figures["sent"],
           confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], notes=notes)
    assert figures["lost"] == 0, figures
    assert t_link < FAILOVER_BOUND and t_work < FAILOVER_BOUND + 10, notes


async def _all_counted(producer: TaskProducer, bus: Any) -> bool:
    counts = await producer.counts(bus)
    return producer.confirmed <= set(counts)
