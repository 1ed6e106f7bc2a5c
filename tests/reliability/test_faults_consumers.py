"""Faults that kill consumers in the field (issue 17, points 1-4), against real
`twistd -n ooidx` daemons on private RabbitMQ nodes, a real DAP upstream,
steady load: controller tasks from a test bus (each confirmed one must be
done) and proxied requests (hits and misses that cross the bus to a fetcher).

  - the broker's resource alarms (memory, then disk): sends fail within a
    bound naming the alarm, never hang; /healthz says the broker blocks
    publishers; a proxied miss is answered 503 BrokerBlocked at once, with a
    Retry-After, naming the alarm (and no request waits for an answer the
    blocked broker holds); work resumes by itself when the alarm clears;
  - the fetcher's queue deleted while work flows: declared again with its
    dead-letter queue, consumed again within seconds, /healthz names it
    meanwhile;
  - the fetcher's dead-letter queue alone deleted while work flows: the
    node's bus declares it again within its check interval (the heartbeat),
    counted in /metrics, and a poison message sent afterwards is found
    dead-lettered in it (it used to stay gone, and a dead letter to go round
    for ever);
  - the daemon's connection closed by the broker (rabbitmqctl
    close_connection), five times in a row: each time the consumers are
    restarted within seconds, counted in /metrics;
  - consumer_timeout: the broker closes the channel of a fetcher slower than
    it allows; the fetch is redelivered and done once more (a duplicate,
    counted), and the fetcher keeps serving.

Each writes one JSON line (tests.reliability.results) with 0 lost, 0 errors.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.reliability.faultlib import (HttpLoad, Node, TaskProducer, classify, eventually, http_fetch,
                                        metric_value, sleep, start_node, wait_started)

pytestmark = [pytest.mark.slow]


def components() -> dict:
    return {"attribute_store": None, "controller": None, "fetcher": {"instances": 2, "timeout": 20},
            "cache": None, "proxyng": None}


async def data_node(tmp_path: Path, broker: Any, upstream: Any, nodes: list, **settings: Any) -> Node:
    settings.setdefault("timeouts", {"heartbeat": 2, "connect": 2})
    node = start_node(tmp_path, "dx", broker.url, components(), proxy=True, **settings)
    nodes.append(node)
    await wait_started(node)
    await deferToThread(node.api, "controller", "register", name="sst", url=upstream.url("sst.nc"))
    return node


#: the proxy's own bound on waiting for an answer to start (ooidx.datapath.proxy.DEFAULT_ANSWER_TIMEOUT)
PROXY_ANSWER_BOUND = 75.0
#: while the broker blocks publishers a miss is answered 503 at once (ooidx.datapath.exchange.blocked_error);
#: seconds allowed for that on a loaded test machine
BLOCKED_ANSWER_BOUND = 5.0


def blocked_miss(node: Node, upstream: Any, alarm: str) -> Dict[str, Any]:
    """A miss nobody asked before, through the proxy, while the broker blocks publishers:
    its status, error kind, Retry-After, body and time."""
    import http.client
    import uuid
    words = {"memory": "low on memory", "disk": "low on disk"}[alarm]
    conn = http.client.HTTPConnection("127.0.0.1", node.proxy_port, timeout=PROXY_ANSWER_BOUND + 15)
    began = time.monotonic()
    try:
        conn.request("GET", upstream.url(f"big/{1000 + len(alarm)}.bin?alarm={uuid.uuid4().hex}"))
        r = conn.getresponse()
        body = r.read().decode(errors="replace")
        return {"status": r.status, "kind": r.getheader("X-Ooidx-Error"), "retry_after": r.getheader("Retry-After"),
                "body": body[:300], "words": words, "seconds": time.monotonic() - began}
    finally:
        conn.close()


def load_on(node: Node, upstream: Any) -> HttpLoad:
    """Proxied requests: a DAP answer and a 20 kB file, every other one a miss (a fetch over the bus).

    The clients wait longer than the proxy's own bound, so a request the
    proxy gives up on ends as its 504, and one that outlasts it is a hang."""
    small = upstream.url("sst.nc.das")
    blob = upstream.url("big/20000.bin")
    return HttpLoad(node.proxy_port, [small, blob], clients=3, timeout=PROXY_ANSWER_BOUND + 15,
                    expect={blob: b"\xab" * 20000},
                    unique_every=2).start()


class HealthWatch:
    """/healthz polled every 0.1 s in a thread; keeps every answer seen."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.seen: List[Dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            health = self.node.health(timeout=2)
            if health is not None:
                self.seen.append(health)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def wrong(results: List[Dict[str, Any]]) -> List[tuple]:
    """The requests that ended neither well nor with a visible failure: what the assertion shows."""
    return [(r["url"], r["status"], r["error"], r["bytes"], round(r["elapsed"], 1), r["started"])
            for r in results if not r["ok"] and r["status"] not in (502, 503, 504)]


def log_about(node: Node, requests: List[tuple]) -> List[str]:
    """The daemon's log lines that name one of C{requests}' URLs (to see where a request stalled)."""
    marks = [url.rsplit("?", 1)[-1] for url, *_ in requests]
    return [line[:600] for line in node.log().splitlines() if any(m in line for m in marks)][:20]


def ctl(broker: Any, *args: str) -> str:
    done = broker.ctl(*args)
    assert done.returncode == 0, (args, done.stdout)
    return done.stdout.decode(errors="replace")


async def settled(producer: Any, bus: Any, load: Any, since: float,
                  also: Sequence[dict] = ()) -> Tuple[dict, dict, dict]:
    """After a row's load stopped: the producer's tasks settled (sent, confirmed,
    processed, lost, duplicated), the outcomes of every HTTP request (the load's
    and C{also}), and those of the load's requests started at C{since} or later."""
    figures = await producer.settle(bus, timeout=60)
    recent = [r for r in load.results if r["started"] >= since]
    return figures, classify(list(load.results) + list(also)), classify(recent)


@pytest_twisted.ensureDeferred
async def test_memory_then_disk_alarm_under_load(tmp_path: Path, private_rabbitmq: Any, upstream: Any,
                                                 nodes: list, buses: Any, record: Any) -> None:
    broker = private_rabbitmq
    node = await data_node(tmp_path, broker, upstream, nodes)
    bus = buses(broker.url, operation_timeout=5, send_timeout=5)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=100, concurrency=10).start()
    load = load_on(node, upstream)
    watch = HealthWatch(node)
    send_seconds: List[float] = []
    alarms: Dict[str, Any] = {}
    misses: Dict[str, Dict[str, Any]] = {}
    try:
        await sleep(3)
        for alarm, raise_it, clear, words in (
                ("memory", ("set_vm_memory_high_watermark", "0.0000001"), ("set_vm_memory_high_watermark", "0.4"),
                 "low on memory"),
                ("disk", ("set_disk_free_limit", str(shutil.disk_usage(broker.basedir).free + 10 ** 12)),
                 ("set_disk_free_limit", "10MB"), "low on disk")):
            t0 = time.monotonic()
            failed_before = len(producer.failed)
            await deferToThread(ctl, broker, *raise_it)
            await eventually(lambda: any(words in (h.get("broker_blocked") or "") for h in watch.seen[-20:]), 40,
                             f"/healthz to say the broker blocks publishers ({alarm} alarm)")
            t_blocked = time.monotonic() - t0
            await eventually(lambda: len(producer.failed) >= failed_before + 5, 30,
                             f"sends to fail during the {alarm} alarm")
            # a fresh miss through the proxy during the alarm: 503 at once, naming the alarm, with a Retry-After
            misses[alarm] = await deferToThread(blocked_miss, node, upstream, alarm)
            # a send during the alarm: it fails within the bus's send timeout, naming the alarm
            began = time.monotonic()
            try:
                await bus.post("controller", "record", dataset=f"alarm-{alarm}", url=None, hit=False, bytes=0,
                               status=200)
                outcome = "sent"
            except Exception as e:  # noqa: BLE001 - the failure is what is measured
                outcome = f"{type(e).__name__}: {e}"
            send_seconds.append(time.monotonic() - began)
            errors = sorted({e for _, e in producer.failed[failed_before:]})
            await deferToThread(ctl, broker, *clear)
            t_clear = time.monotonic()
            await eventually(lambda: producer.confirmed_since(t_clear) >= 50, 60,
                             f"tasks to be confirmed again after the {alarm} alarm")
            await eventually(lambda: not (watch.seen and watch.seen[-1].get("broker_blocked")), 30,
                             "/healthz to stop saying blocked")
            alarms[alarm] = {"healthz_blocked_after_s": round(t_blocked, 1), "send": outcome[:160],
                             "send_s": round(send_seconds[-1], 1), "failed_sends": len(producer.failed) - failed_before,
                             "errors": [e[:120] for e in errors[:2]],
                             "resumed_after_s": round(time.monotonic() - t_clear, 1)}
            assert words in outcome and "Blocked" in outcome, outcome
            assert all(words in e for e in errors), errors
        after = time.monotonic()
        await sleep(3)
    finally:
        watch.stop()
        load.stop()
        await producer.stop()
    figures, outcomes, late = await settled(producer, bus, load, after)
    blocked_said = sorted({h["broker_blocked"] for h in watch.seen if h.get("broker_blocked")})
    slowest = max(load.results, key=lambda r: r["elapsed"])
    refused = [r for r in load.results if r["status"] in (502, 503, 504)]
    slowest_refused = max((r["elapsed"] for r in refused), default=0.0)
    record("broker memory then disk alarm under load", faults_injected=2, sent=figures["sent"],
           confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], errors=outcomes["wrong"],
           notes=f"alarms {alarms}; /healthz said {blocked_said}; longest send {max(send_seconds):.1f} s "
                 f"(bus send timeout 5 s); HTTP {outcomes}, after both alarms {late}; slowest request "
                 f"{slowest['elapsed']:.1f} s ({slowest['status']}); a fresh miss during each alarm: "
                 + ", ".join(f"{a} {m['status']} {m['kind']} Retry-After {m['retry_after']} in {m['seconds']:.2f} s"
                             for a, m in misses.items())
                 + f"; the slowest of the {len(refused)} requests answered 5xx took {slowest_refused:.1f} s "
                   f"(was up to the proxy's answer timeout, {PROXY_ANSWER_BOUND:.0f} s, then 504)")
    assert figures["lost"] == 0, figures
    if outcomes["wrong"]:
        pytest.fail("\n".join([repr(wrong(load.results))] + log_about(node, wrong(load.results))))
    assert max(send_seconds) < 10, send_seconds
    for alarm, miss in misses.items():
        assert (miss["status"], miss["kind"], miss["retry_after"]) == (503, "BrokerBlocked", "10"), (alarm, miss)
        assert miss["words"] in miss["body"] and miss["seconds"] < BLOCKED_ANSWER_BOUND, (alarm, miss)
    # no request waits for an answer the blocked broker holds: each is answered 503 when the block starts
    assert slowest_refused < BLOCKED_ANSWER_BOUND + 5, [(r["url"], r["status"], round(r["elapsed"], 1))
                                                        for r in refused if r["elapsed"] >= BLOCKED_ANSWER_BOUND]
    assert slowest["elapsed"] < PROXY_ANSWER_BOUND + 5, wrong([slowest])
    assert late["ok"] == sum(late.values()) > 0, late
    assert any("memory" in b for b in blocked_said) and any("disk" in b for b in blocked_said), blocked_said


@pytest_twisted.ensureDeferred
async def test_fetcher_queue_deleted_while_work_flows(tmp_path: Path, private_rabbitmq: Any, upstream: Any,
                                                      nodes: list, buses: Any, record: Any) -> None:
    broker = private_rabbitmq
    node = await data_node(tmp_path, broker, upstream, nodes)
    bus = buses(broker.url)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=100, concurrency=10).start()
    load = load_on(node, upstream)
    watch = HealthWatch(node)
    try:
        await sleep(3)
        t_delete = time.monotonic()
        # the dead-letter queue first: deleted after the queue, it could go after magnet had declared
        # both again (the queue's cancel comes at once); a dead-letter queue deleted alone is the next
        # row's (the bus's own check declares it again, within its interval)
        await deferToThread(ctl, broker, "delete_queue", "fetcher.dead")
        await deferToThread(ctl, broker, "delete_queue", "fetcher")

        def back() -> bool:
            out = ctl(broker, "list_queues", "name", "consumers")
            rows = dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)
            return rows.get("fetcher", "0") not in ("0", "consumers") and "fetcher.dead" in rows

        await eventually(lambda: deferToThread(back), 30, "the fetcher queue and its dead-letter queue back, "
                                                          "consumed", interval=0.2)
        t_back = time.monotonic() - t_delete
        n = [0]

        def fresh_miss() -> bool:
            n[0] += 1
            r = http_fetch(node.proxy_port, upstream.url(f"big/{2000 + n[0]}.bin"), timeout=15)
            return r["ok"] and r["bytes"] == 2000 + n[0]

        await eventually(lambda: deferToThread(fresh_miss), 30, "a fresh miss to be fetched again", interval=0.1)
        recovered = time.monotonic()
        await sleep(3)
    finally:
        watch.stop()
        load.stop()
        await producer.stop()
    figures, outcomes, after = await settled(producer, bus, load, recovered)
    shown = [h["consumers"] for h in watch.seen if "fetcher" in (h.get("consumers") or {}).get("down", [])]
    restarts = metric_value(node.metrics(), "magnet_consumer_restarts_total", name="fetcher", reason="cancelled")
    record("fetcher queue deleted under its consumers while work flows", faults_injected=1, sent=figures["sent"],
           confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], errors=outcomes["wrong"],
           notes=f"queue and dead-letter queue declared again and consumed {t_back:.1f} s after the delete; "
                 f"/healthz named it down {len(shown)} times; consumer restarts (cancelled) {restarts:.0f}; "
                 f"HTTP {outcomes}, after recovery {after}")
    assert figures["lost"] == 0, figures
    assert outcomes["wrong"] == 0, wrong(load.results)
    assert after["ok"] == sum(after.values()) > 0, after
    assert t_back < 10 and restarts >= 2 and shown, (t_back, restarts, shown)


#: seconds from the delete of fetcher.dead (rabbitmqctl returned) to its being declared again, counted in
#: /metrics: the node's bus checks every timeouts.heartbeat (2 s here)
DEAD_LETTER_BOUND = 10.0


def queue_rows(broker: Any) -> Dict[str, int]:
    """rabbitmqctl list_queues: name -> messages ready."""
    out = ctl(broker, "list_queues", "name", "messages")
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return {row[0]: int(row[1]) for row in rows if len(row) >= 2 and row[1].isdigit()}


@pytest_twisted.ensureDeferred
async def test_fetcher_dead_letter_queue_deleted_alone(tmp_path: Path, private_rabbitmq: Any, upstream: Any,
                                                      nodes: list, buses: Any, record: Any) -> None:
    """`rabbitmqctl delete_queue fetcher.dead` while work flows (the queue
    itself stays, so no consumer is cancelled and nothing else tells): the
    node declares it again, counted as magnet_consumer_restarts_total
    {name="fetcher", reason="dead_letter_queue"}; an undecodable message sent
    to the fetcher afterwards (a poison message: dead-lettered at once) is
    found in fetcher.dead, and the work goes on."""
    import magnet
    broker = private_rabbitmq
    node = await data_node(tmp_path, broker, upstream, nodes)
    bus = buses(broker.url)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=100, concurrency=10).start()
    load = load_on(node, upstream)
    try:
        await sleep(3)
        assert "fetcher.dead" in await deferToThread(queue_rows, broker)
        before = (await deferToThread(queue_rows, broker)).get("fetcher.dead", 0)
        await deferToThread(ctl, broker, "delete_queue", "fetcher.dead")
        t_delete = time.monotonic()  # rabbitmqctl has returned: the queue is gone

        def counted_now() -> float:
            return metric_value(node.metrics(), "magnet_consumer_restarts_total", name="fetcher",
                                reason="dead_letter_queue")

        await eventually(lambda: counted_now() >= 1, DEAD_LETTER_BOUND + 20, "fetcher.dead declared again (counted)",
                         interval=0.1)
        t_back = time.monotonic() - t_delete
        assert "fetcher.dead" in await deferToThread(queue_rows, broker)
        counted = counted_now()
        await bus.send("fetcher", magnet.Message(body=b"{not json", content_type="application/json"), timeout=10)
        await eventually(lambda: deferToThread(lambda: queue_rows(broker).get("fetcher.dead", 0) >= 1), 30,
                         "the poison message dead-lettered into fetcher.dead", interval=0.2)
        dead_now = (await deferToThread(queue_rows, broker)).get("fetcher.dead", 0)
        recovered = time.monotonic()
        await sleep(3)
    finally:
        load.stop()
        await producer.stop()
    figures, outcomes, after = await settled(producer, bus, load, recovered)
    lines = [line for line in node.log().splitlines() if "dead-letter queue 'fetcher.dead'" in line]
    record("fetcher's dead-letter queue deleted alone, then a poison message", faults_injected=2,
           sent=figures["sent"], confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], errors=outcomes["wrong"],
           notes=f"fetcher.dead ({before} message(s) in it) deleted; declared again {t_back:.1f} s later (heartbeat "
                 f"2 s), counted {counted:.0f} (magnet_consumer_restarts_total reason dead_letter_queue), logged "
                 f"{len(lines)} time(s); a poison message sent afterwards found in it ({dead_now} message(s)); "
                 f"HTTP {outcomes}, after {after}")
    assert figures["lost"] == 0, figures
    assert outcomes["wrong"] == 0, wrong(load.results)
    assert after["ok"] == sum(after.values()) > 0, after
    assert t_back < DEAD_LETTER_BOUND and counted >= 1 and len(lines) >= 1, (t_back, counted, lines)
    assert dead_now >= 1


#: seconds from `rabbitmqctl close_connection` to the controller's consumer counted back (rabbitmqctl's own
#: time, a second or two on a loaded machine, included; the link itself is back within a second). About one
#: close in five used to take 30 s or never come back: a declaration made while the broker closed the
#: connection held the declarations lock for ever (tests/fast/magnet/test_amqp_reconnect_lock.py)
RECONNECT_BOUND = 15.0
#: closes in a row (each must come back within the bound)
CLOSES = 5


@pytest_twisted.ensureDeferred
async def test_daemon_connection_closed_by_the_broker(tmp_path: Path, private_rabbitmq: Any, upstream: Any,
                                                      nodes: list, buses: Any, record: Any) -> None:
    """`rabbitmqctl close_connection` on the daemon's connection, CLOSES times in a
    row under load: each time its consumers are restarted on the next link
    (counted in /metrics) within RECONNECT_BOUND, and the work resumes."""
    broker = private_rabbitmq
    node = await data_node(tmp_path, broker, upstream, nodes)
    bus = buses(broker.url)
    await bus.when_connected(20)
    mine = bus.transport._protocol.transport.getHost().port
    producer = TaskProducer(bus, rate=100, concurrency=10).start()
    load = load_on(node, upstream)
    backs: List[float] = []
    closed = 0
    try:
        await sleep(3)
        for _ in range(CLOSES):
            before = metric_value(node.metrics(), "magnet_consumer_restarts_total", name="controller",
                                  reason="reconnect")
            rows = (await deferToThread(ctl, broker, "list_connections", "pid", "peer_port")).splitlines()
            daemon = [line.split("\t")[0] for line in rows if "\t" in line and line.split("\t")[1] != str(mine)
                      and line.startswith("<")]
            assert daemon, rows
            t_close = time.monotonic()
            for pid in daemon:
                await deferToThread(ctl, broker, "close_connection", pid, "reliability: consumer connection closed")
                closed += 1
            try:
                await eventually(lambda: metric_value(node.metrics(), "magnet_consumer_restarts_total",
                                                      name="controller", reason="reconnect") > before,
                                 RECONNECT_BOUND + 30, "the controller's consumer back")
            except AssertionError as e:
                restarts = [line for line in node.metrics().splitlines() if "consumer_restarts" in line]
                link = [line[:300] for line in node.log().splitlines() if "magnet" in line][-30:]
                raise AssertionError("\n".join([str(e), f"{daemon} {rows}"] + restarts + link)) from None
            backs.append(time.monotonic() - t_close)
            await eventually(lambda: producer.confirmed_since(time.monotonic() - 1) > 0, 30, "tasks flowing")
            await sleep(2)
        recovered = time.monotonic()
        await sleep(3)
    finally:
        load.stop()
        await producer.stop()
    figures, outcomes, after = await settled(producer, bus, load, recovered)
    metrics = node.metrics()
    restarts = sum(float(line.rpartition(" ")[2]) for line in metrics.splitlines()
                   if line.startswith("magnet_consumer_restarts_total{") and 'reason="reconnect"' in line)
    record("daemon's consumer connection closed by the broker", faults_injected=closed, sent=figures["sent"],
           confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], errors=outcomes["wrong"],
           notes=f"{closed} connection(s) closed, {CLOSES} times in a row; consumers back in "
                 f"{', '.join(f'{b:.1f}' for b in backs)} s (rabbitmqctl included); "
                 f"magnet_consumer_restarts_total (reconnect) {restarts:.0f}; HTTP {outcomes}, after {after}")
    assert figures["lost"] == 0, figures
    assert outcomes["wrong"] == 0, wrong(load.results)
    assert after["ok"] == sum(after.values()) > 0, after
    assert max(backs) < RECONNECT_BOUND, f"consumers back {', '.join(f'{b:.1f}' for b in backs)} s after the closes"


#: the component whose message a slow miss holds unacknowledged: the cache,
#: which fetches a miss itself and acknowledges its answer when it ends
HOLDER = "cache"


def consumer_timeout_node(factory: Any, timeout_ms: int = 3000) -> Any:
    """A private node that closes the channel of a delivery unacknowledged for
    C{timeout_ms}, checked every second (RabbitMQ looks once a minute by default)."""
    node = factory(start=False)
    with open(os.path.join(node.basedir, "rabbitmq.conf"), "a") as f:
        f.write(f"consumer_timeout = {timeout_ms}\n")
    with open(os.path.join(node.basedir, "advanced.config"), "w") as f:
        f.write("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
    node.start()
    return node


@pytest_twisted.ensureDeferred
async def test_consumer_timeout_on_a_slow_fetch(tmp_path: Path, private_rabbitmq_factory: Any, upstream: Any,
                                                nodes: list, buses: Any, record: Any) -> None:
    """consumer_timeout 3 s; a miss of a slow upstream file (about 6 s) keeps
    its message unacknowledged longer: on the data path a miss is fetched by
    the cache that answers it (C{cache.answer}, acknowledged when the answer
    ends), so the broker closes the cache's channel; magnet consumes again,
    the answer is redelivered and done once more (counted), and the cache and
    the fetchers keep serving (tasks and fast misses meanwhile)."""
    broker = consumer_timeout_node(private_rabbitmq_factory)
    node = await data_node(tmp_path, broker, upstream, nodes)
    bus = buses(broker.url)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=50, concurrency=5).start()
    load = load_on(node, upstream)
    slow_results: List[Dict[str, Any]] = []
    try:
        await sleep(2)
        fetches_before = metric_value(node.metrics(), "magnet_messages_in_total", name=HOLDER)
        size = 300_000
        slow = upstream.url(f"big/{size}.bin?rate=50000")
        slow_results.append(await deferToThread(http_fetch, node.proxy_port, slow, timeout=60,
                                                expect=b"\xab" * size))
        await eventually(lambda: metric_value(node.metrics(), "magnet_consumer_restarts_total", name=HOLDER,
                                              reason="channel_closed") >= 1, 30, "the cache's channel closed")
        await sleep(8)  # the redelivered slow fetch runs to its end too
        recovered = time.monotonic()
        await sleep(3)
    finally:
        load.stop()
        await producer.stop()
    figures, outcomes, after = await settled(producer, bus, load, recovered, also=slow_results)
    metrics = node.metrics()
    restarts = metric_value(metrics, "magnet_consumer_restarts_total", name=HOLDER, reason="channel_closed")
    record("consumer_timeout closes the channel holding a slow miss", faults_injected=1, sent=figures["sent"],
           confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], errors=outcomes["wrong"],
           notes=f"consumer_timeout 3 s, a 6 s fetch: the broker closed the {HOLDER}'s channel {restarts:.0f} "
                 f"time(s), so the fetch was delivered {1 + restarts:.0f} times; its client got "
                 f"{slow_results[0]['status']} "
                 f"{slow_results[0]['bytes']} bytes in {slow_results[0]['elapsed']:.1f} s (whole: "
                 f"{slow_results[0]['ok']}; a 502 when the proxy sees its request delivered again); {HOLDER} "
                 f"deliveries during "
                 f"the test {metric_value(metrics, 'magnet_messages_in_total', name=HOLDER) - fetches_before:.0f}; "
                 f"HTTP {outcomes}, after {after}")
    assert figures["lost"] == 0, figures
    assert outcomes["wrong"] == 0, wrong(load.results + slow_results)
    assert restarts >= 1
    assert after["ok"] == sum(after.values()) > 0, after
