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

Scenario 5b: a partition inside the cluster (``pause_minority``), made with
iptables on the nodes' Erlang distribution links
(faultlib.DistPartition): see the test's docstring and docs/reliability.md.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Optional

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


async def _stalled_then_healed(record: Any, scenario: str, node: Any, bus: Any, producer: Any, load: Any,
                               t_paused: float, first: str, known: str, stalled: str) -> None:
    """No work was done while the partition lasted (the daemon found no
    majority node to link to, or no send was confirmed there): heal it, wait
    for the daemon, count the tasks (nothing confirmed may be lost even so),
    record, and fail."""
    from tests.reliability.faultlib import classify
    t_heal = time.monotonic()
    try:
        await eventually(lambda: node.health() is not None, 180, "the daemon's /healthz after the restore",
                         interval=0.5)
    except AssertionError as e:
        load.stop()
        await producer.stop()
        record(scenario, faults_injected=1, sent=producer.sent, confirmed=len(producer.confirmed), errors=2,
               notes=f"C paused {t_paused:.1f} s after the cut; no work during the partition: {first}; and the "
                     f"daemon not healthy 180 s after the restore (tasks not counted); {known}")
        raise AssertionError(f"{e}\n{stalled}\n--- after the restore:\n{node.describe()}") from None
    t_back = time.monotonic() - t_heal
    load.stop()
    await producer.stop()
    figures = await producer.settle(bus, timeout=120)
    outcomes = classify(load.results)
    setups = node.log().count("did not complete the connection setup in time")
    record(scenario, faults_injected=1, sent=figures["sent"], confirmed=figures["confirmed"],
           processed=figures["processed"], lost=figures["lost"], duplicated=figures["duplicated"],
           errors=outcomes["wrong"] + 1,
           notes=f"C paused {t_paused:.1f} s after the cut; the daemon's link to C closed (320 CONNECTION_FORCED); "
                 f"no work during the partition: {first}; {setups} link setups of the daemon timed out after 32 s; "
                 f"after the restore the daemon was healthy again in {t_back:.1f} s; HTTP {outcomes}; {known}")
    assert figures["lost"] == 0, figures
    raise AssertionError(f"no failover during the partition: {stalled}")


async def _all_counted(producer: TaskProducer, bus: Any) -> bool:
    counts = await producer.counts(bus)
    return producer.confirmed <= set(counts)


class _MagnetLog:
    """The test process's magnet log lines (its buses'), with their time."""

    def __init__(self) -> None:
        from twisted.logger import globalLogPublisher
        self.lines: list = []
        self._publisher = globalLogPublisher
        self._publisher.addObserver(self)

    def __call__(self, event: dict) -> None:
        if str(event.get("log_namespace", "")).startswith("magnet.amqp"):
            from twisted.logger import formatEvent
            self.lines.append((time.monotonic(), formatEvent(event)))

    def stop(self) -> None:
        self._publisher.removeObserver(self)


def _magnet_log() -> _MagnetLog:
    return _MagnetLog()


_SAID = re.compile(r"fresh channel|connected to broker|lost \(|did not|unreachable|no data|closed the connection")


def _said_since(said: _MagnetLog, t0: float) -> str:
    """The link and publishing-channel lines logged since C{t0}, each with its time after it."""
    lines = [f"{t - t0:+.1f} s {text[:110]}" for t, text in said.lines if t >= t0 and _SAID.search(text)]
    return "; ".join(lines[:12]) or "nothing logged"


def _link_port(bus: Any) -> Any:
    """The port of the broker node C{bus} is linked to now (None while it has no link)."""
    protocol = bus.transport._protocol
    return protocol.url.port if protocol is not None else None


def _cluster_view(node: Any) -> dict:
    """C{node}'s cluster_status as JSON (C{{"error": ...}} when it cannot say: paused)."""
    import json
    done = node.ctl("cluster_status", "--formatter", "json", timeout=30)
    try:
        return json.loads(done.stdout.decode(errors="replace"))
    except ValueError:
        return {"error": done.stdout.decode(errors="replace")[-300:]}


def _diagnose(cluster: Any, cut: Any) -> str:
    """What the running nodes say of their queues and of the channels that wait (where each one is stuck)."""
    out = []
    for n in cluster.nodes:
        if n is not cut:  # the channels that wait for confirms, per node
            out.append(f"{n.nodename} (:{n.port}) channels: " + n.ctl(
                "list_channels", "name", "messages_unconfirmed", "--timeout", "20",
                timeout=40).stdout.decode(errors="replace")[-1500:])
    for n in cluster.nodes[:1]:
        if n is cut:
            continue
        out.append(n.ctl("list_queues", "name", "type", "durable", "exclusive", "state", "pid", "leader",
                         "--timeout", "20", timeout=40).stdout.decode(errors="replace")[-3000:])
        out.append(n.ctl("eval", "[{P, erlang:process_info(P, [registered_name, current_stacktrace])} "
                                 "|| P <- erlang:processes(), "
                                 "case erlang:process_info(P, current_function) of "
                                 "{current_function, {M, _, _}} -> lists:member(M, [erpc, rpc, gen, ra, "
                                 "rabbit_fifo_client, mnesia_tm, global]); _ -> false end].",
                         timeout=40).stdout.decode(errors="replace")[-6000:])
    return "\n".join(out)


def _paused(node: Any) -> bool:
    """The node's VM runs but its rabbit application does not (pause_minority pauses it so)."""
    done = node.ctl("eval", "rabbit:is_running().", timeout=30)
    return done.returncode == 0 and done.stdout.decode(errors="replace").strip().endswith("false")


REFUSED = ("REJECT", "--reject-with", "tcp-reset")
SILENT = ("DROP",)
#: Found by this scenario (RabbitMQ 3.10.8, Erlang 25), when the cut is silent
#: (8 runs of 10 in an earlier session; the other two passed): the majority
#: side stalls. Its processes wait in calls to C (a channel's
#: first publish to a quorum queue, in rabbit_fifo_client:enqueue's rpc:call
#: to the leader's node; the quorum queues' rpc:multicall ticks; the node
#: monitor's net_adm:ping): each auto-connects to C and waits net_setuptime
#: (7 s by default); list_queues times out, and the queue records still name
#: C as the leader a minute after the cut. The daemon's link setup on A
#: (confirm mode, about 20 quorum queue declarations, its consumers) did not
#: finish within its 32 s bound, nor on B after it, while the cut lasted; in
#: another run it did, but no send on A was confirmed within 40 s: that part
#: was a publishing channel RabbitMQ never confirms on again, which magnet now
#: replaces after a send timed out (docs/reliability.md); with it the silent
#: cut passed in 6 runs of 6, the stall above not seen, so it must pass too.
#: When no work is done during a cut the failure says so:
SILENT_STALLS = ("RabbitMQ 3.10.8: with a silent cut, the majority side may wait in calls to the paused node, and "
                 "no work is done while the cut lasts (the daemon's link setup on A and B times out): "
                 "docs/reliability.md")


#: A refused cut with C's AMQP port silent too passed in 3 runs of 7 in an
#: earlier session (the test's producer bus confirmed nothing for 40 s on A: the
#: publishing channel that never confirms again, now replaced by magnet), and
#: in 6 of 7 here after that fix; in the other the work went on during the
#: cut, but the cluster was not healed (three running nodes, no partitions)
#: 120 s after the restore: not diagnosed (the test now says what each node
#: said then, and records the row).
REFUSED_SILENT_CLIENTS = ("with C's AMQP port silent too, 1 run of 7 saw the cluster not healed 120 s after the "
                          "restore (not diagnosed yet): docs/reliability.md")


#: The variants that run by default (CI: its 90 minutes cannot take three
#: runs that may each wait out their 900 s bound); OOIDX_PARTITION_VARIANTS=all
#: (or a comma-separated list of ids) runs the others.
PARTITION_VARIANTS = os.environ.get("OOIDX_PARTITION_VARIANTS", "refused-cluster-links")


def _variant(dist_cut: tuple, clients_cut: bool, id: str, reason: Optional[str] = None) -> Any:
    """One cut; C{reason}: why it is marked xfail (not strict), None when it must pass."""
    chosen = PARTITION_VARIANTS == "all" or id in PARTITION_VARIANTS.split(",")
    marks = [pytest.mark.skipif(not chosen, reason=f"{id}: not in OOIDX_PARTITION_VARIANTS ({PARTITION_VARIANTS})")]
    if reason is not None:
        marks.append(pytest.mark.xfail(reason=reason, strict=False))
    return pytest.param(dist_cut, clients_cut, id=id, marks=marks)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dist_cut, clients_cut", [
    _variant(REFUSED, False, "refused-cluster-links"),
    _variant(REFUSED, True, "refused-cluster-links-silent-client-links", REFUSED_SILENT_CLIENTS),
    _variant(SILENT, False, "silent-cluster-links"),
])
@pytest_twisted.ensureDeferred
async def test_cluster_partition_minority_node_pauses_daemon_fails_over(
        tmp_path: Path, rabbit_cluster_pause_minority: Any, upstream: Any, nodes: list, buses: Any,
        record: Any, dist_cut: tuple, clients_cut: bool) -> None:
    """Scenario 5b: a partition inside the cluster. Three nodes with
    C{cluster_partition_handling = pause_minority}; the daemon and the test's
    producer are linked to node C (the first of their URLs), where the worker
    queues (quorum) were declared, so their leaders are there too. Under a
    load of tasks and proxied requests, C's cluster links are cut
    (faultlib.DistPartition: iptables REJECT with a reset, or DROP: silence), and with C{clients_cut}
    its AMQP port too (C vanishes from the network: the daemon's link goes
    silent, new connections to C are never answered). C pauses, A and B
    elect new leaders, the daemon fails over to A or B, work goes on; the
    links are restored: C starts again and rejoins (three running nodes, no
    partition listed); every confirmed task is done."""
    from tests.reliability.faultlib import DistPartition, HttpLoad, classify, http_fetch, partition_unavailable
    from tests.reliability.test_faults_broker import _direct, data_path_components
    problem = partition_unavailable()
    if problem:
        pytest.fail(f"cannot cut a cluster node off here: {problem}", pytrace=False)
    cluster = rabbit_cluster_pause_minority
    a, b, c = cluster.nodes
    urls = [c.url, a.url, b.url]
    node = start_node(tmp_path, "dx", urls, data_path_components(), proxy=True, queue_type="quorum",
                      timeouts={"heartbeat": 1, "connect": 2})
    nodes.append(node)
    await wait_started(node)
    assert connected_ports(node.log())[-1] == c.port, node.describe()
    await deferToThread(node.api, "controller", "register", name="sst", url=upstream.url("sst.nc"))
    await deferToThread(node.api, "controller", "register", name="big", url=upstream.url("big"), check=False)
    small = upstream.url("sst.nc.dods?time")
    big = upstream.url("big/300000.bin")
    expect = {small: await deferToThread(_direct, small), big: b"\xab" * 300_000}
    bus = buses(urls, queue_type="quorum")
    await bus.when_connected(30)
    producer = TaskProducer(bus, rate=100, concurrency=5).start()
    load = HttpLoad(node.proxy_port, [small, big, upstream.url("sst.nc.das")], clients=3, timeout=60,
                    expect=expect, unique_every=2).start()
    await sleep(4)
    seen = len(connected_ports(node.log()))
    leaders = c.ctl("list_queues", "name", "leader", "--formatter", "json").stdout.decode(errors="replace")
    leaders_on_c = leaders.count(c.nodename)
    how = "refused" if dist_cut == REFUSED else "silent"
    scenario = f"cluster: partition ({how} cluster links), minority node paused (pause_minority)" + (
        ", its clients' links silent too" if clients_cut else "")

    partition = DistPartition()
    said = _magnet_log()  # what the test's producer bus logs (its links, its fresh publishing channels)
    t_cut = time.monotonic()
    try:
        partition.isolate(c, [a, b], silence_ports=[c.port] if clients_cut else [], target=dist_cut)
        stamps: dict = {}
        linked = eventually(lambda: len(connected_ports(node.log())) > seen, 60,
                            "the daemon linked to another node", interval=0.05)
        linked.addCallback(lambda _: stamps.setdefault("link", time.monotonic() - t_cut))
        # pause_minority: C stops its rabbit application; A and B see it gone
        await eventually(lambda: deferToThread(_paused, c), 60, "the minority node paused", interval=0.2)
        t_paused = time.monotonic() - t_cut
        # A may still list C as running for a moment after C paused itself (A learns it
        # from its own side of the cut links): bounded, as every wait
        seen_a: dict = {}

        def a_sees_c_gone() -> bool:
            seen_a.update(_cluster_view(a))
            return c.nodename not in seen_a.get("running_nodes", [])

        try:
            await eventually(lambda: deferToThread(a_sees_c_gone), 30, "A listing the paused C as not running",
                             interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}; A's last view: {seen_a}") from None
        refused = not await deferToThread(c.answers, 1.0)
        try:
            await linked
            t_link = stamps["link"]
            new_port = connected_ports(node.log())[-1]
            assert new_port in (a.port, b.port), node.describe()
            # work goes on during the partition: a task sent now is done, a request never asked before is served
            probe = TaskProducer(bus, rate=20, concurrency=1).start()
            try:
                await eventually(lambda: probe.confirmed, 40, "a send confirmed during the partition")
            finally:
                await probe.stop()
            await eventually(lambda: _all_counted(probe, bus), 40, "a task sent during the partition done",
                             interval=0.2)
            n = [0]

            def fresh_request() -> bool:
                n[0] += 1
                r = http_fetch(node.proxy_port, upstream.url(f"big/{2000 + n[0]}.bin"), timeout=15)
                return r["ok"] and r["bytes"] == 2000 + n[0]

            await eventually(lambda: deferToThread(fresh_request), 40, "a new proxied request served",
                             interval=0.2)
        except AssertionError as e:
            # no work while cut: heal, then count what was confirmed, and say so
            first = str(e).splitlines()[0][:200]
            bus_state = (f"producer bus: {_said_since(said, t_cut)}\n"
                         f"producer: sent {producer.sent}, failed {len(producer.failed)} {producer.failed[-3:]}; "
                         f"bus {bus.transport!r} on :{_link_port(bus)}, last error {bus.transport.last_error!r}, "
                         f"pending {bus.transport.pending()}, publishing channels replaced "
                         f"{bus.transport.publishers_replaced} ({bus.transport.confirms_given_up} after a send "
                         f"timed out); probe sent {probe.sent if 'probe' in locals() else '-'}")
            stalled = f"{e}\n{bus_state}\n{await deferToThread(_diagnose, cluster, c)}\n{node.describe()}"
            await deferToThread(partition.heal)
            await _stalled_then_healed(record, scenario, node, bus, producer, load, t_paused, first,
                                       SILENT_STALLS if how == "silent" else
                                       "the refused cut did no work during it", stalled)
        t_work = time.monotonic() - t_cut
        dropped = await deferToThread(partition.dropped)
        assert dropped > 0, "the rules dropped nothing: no partition happened"
        await sleep(3)
    finally:
        await deferToThread(partition.heal)
        said.stop()
    t_heal = time.monotonic()
    everyone = sorted(x.nodename for x in cluster.nodes)

    views: list = []

    def healed() -> bool:
        views[:] = [_cluster_view(n_) for n_ in cluster.nodes]
        return all(sorted(v.get("running_nodes", [])) == everyone and not v.get("partitions") for v in views)

    try:
        await eventually(lambda: deferToThread(healed), 120,
                         "the cluster healed (three running nodes, no partitions)", interval=1.0)
    except AssertionError as e:
        # work was done during the cut; the cluster did not come back: count, record, and say what each node said
        seen = "; ".join(f"{n_.nodename}: " + (f"running {sorted(v.get('running_nodes', []))}, partitions "
                                               f"{v.get('partitions')}" if "error" not in v else v["error"][-200:])
                         for n_, v in zip(cluster.nodes, views))
        load.stop()
        await producer.stop()
        figures = await producer.settle(bus, timeout=90)
        outcomes = classify(load.results)
        record(scenario, faults_injected=1, sent=figures["sent"], confirmed=figures["confirmed"],
               processed=figures["processed"], lost=figures["lost"], duplicated=figures["duplicated"],
               errors=outcomes["wrong"] + 1,
               notes=f"C paused {t_paused:.1f} s after the cut; daemon linked to :{new_port} {t_link:.1f} s after it; "
                     f"work done during the cut; but the cluster not healed 120 s after the restore: {seen}; "
                     f"HTTP {outcomes}")
        raise AssertionError(f"{e}: {seen}\n--- {c.nodename}:\n{c.log_tail(40)}") from None
    t_healed = time.monotonic() - t_heal
    await sleep(3)
    load.stop()
    await producer.stop()
    figures = await producer.settle(bus, timeout=90)
    outcomes = classify(load.results)
    after = [t - t_cut for t in producer.confirm_times if t > t_cut]
    critical = [line[:300] for line in node.log().splitlines() if " critical " in line]
    notes = (f"cluster formed in {cluster.formed_seconds:.0f} s; C (:{c.port}; the daemon's and the producer's "
             f"link; leader of {leaders_on_c} quorum queues) cut off from A and B by iptables"
             f" ({' '.join(dist_cut)}){' with its AMQP port silenced' if clients_cut else ''} ({dropped} packets "
             f"dropped or refused); C paused "
             f"{t_paused:.1f} s after the cut (AMQP {'not answering' if refused else 'still answering'}), A lists "
             f"it not running; daemon linked to :{new_port} {t_link:.1f} s after the cut; first send confirmed "
             f"{(min(after) if after else float('nan')):.1f} s after the cut; a new task done and a new request "
             f"served {t_work:.1f} s after the cut; links restored: three running nodes and no partitions "
             f"{t_healed:.1f} s later; producer {bus.transport.nacked} nacked and sent again, "
             f"{bus.transport.confirms_given_up} publishing channels replaced after a send timed out; HTTP {outcomes}; "
             f"failed sends {figures['failed_sends']} {figures['failed_examples'][:2]}; critical log lines "
             f"{len(critical)}; producer bus: {_said_since(said, t_cut)}")
    record(scenario, faults_injected=1, sent=figures["sent"], confirmed=figures["confirmed"],
           processed=figures["processed"], lost=figures["lost"], duplicated=figures["duplicated"],
           errors=outcomes["wrong"], notes=notes)
    assert figures["lost"] == 0, figures
    assert outcomes["wrong"] == 0, [r for r in load.results if not r["ok"] and r["status"] not in (502, 503, 504)]
    assert t_link < FAILOVER_BOUND + (0 if clients_cut else t_paused), notes
    # the node's close (320 CONNECTION_FORCED) is a lost link, retried: no component gives up on it
    assert not critical, critical
