"""Scenario 1: the broker killed (kill -9 of a private RabbitMQ node) during
steady load of worker-queue tasks and proxy requests, then restarted.

Properties: every task whose send the broker confirmed is done (at least
once; duplicates are counted); the daemon recovers within seconds of the
broker's return with no operator action; proxy requests in flight end as a
502/503/504 or a visibly failed transfer (never a hang, never a truncated
200 passed as whole); new requests succeed after recovery.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.reliability.results import percentile
from tests.reliability.faultlib import (HttpLoad, TaskProducer, classify, eventually, http_fetch, sleep,
                                        start_node, wait_started)

pytestmark = [pytest.mark.slow]

#: The daemon must be back this soon after the broker answers again.
RECOVERY_BOUND = 20.0


def data_path_components() -> dict:
    return {"attribute_store": None, "controller": None, "fetcher": {"instances": 2, "timeout": 10},
            "cache": None, "proxyng": None}


@pytest_twisted.ensureDeferred
async def test_broker_kill9_and_restart_under_load(tmp_path: Path, private_rabbitmq: Any, upstream: Any,
                                                   nodes: list, buses: Any, record: Any) -> None:
    broker = private_rabbitmq
    node = start_node(tmp_path, "dx", broker.url, data_path_components(), proxy=True,
                      timeouts={"heartbeat": 2, "connect": 2})
    nodes.append(node)
    await wait_started(node)
    await deferToThread(node.api, "controller", "register", name="sst", url=upstream.url("sst.nc"))
    await deferToThread(node.api, "controller", "register", name="big", url=upstream.url("big"), check=False)  # not DAP: not checked
    small = upstream.url("sst.nc.dods?time")
    big = upstream.url("big/3000000.bin")
    expect = {small: await deferToThread(_direct, small), big: b"\xab" * 3_000_000}

    bus = buses(broker.url)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=150, concurrency=10).start()
    load = HttpLoad(node.proxy_port, [small, big, upstream.url("sst.nc.das")], clients=4, timeout=60,
                    expect=expect, unique_every=2).start()
    await sleep(4)
    before_kill = len(load.results)

    t_kill = time.monotonic()
    await deferToThread(broker.kill)
    await eventually(lambda: node.health() is None, 15, "the daemon to see the broker gone")
    t_noticed = time.monotonic() - t_kill
    await sleep(3)
    await broker.start_async()
    t_up = time.monotonic()

    # recovery: /healthz and a request that must cross the bus (a URL never asked before)
    await eventually(lambda: node.health() is not None, 60, "the daemon's /healthz to be 200 again", interval=0.1)
    t_health = time.monotonic() - t_up
    n = [0]

    def fresh_request() -> bool:
        n[0] += 1
        r = http_fetch(node.proxy_port, upstream.url(f"big/{1000 + n[0]}.bin"), timeout=15)
        return r["ok"] and r["bytes"] == 1000 + n[0]

    await eventually(lambda: deferToThread(fresh_request), 60, "a new proxied request to succeed", interval=0.1)
    t_proxy = time.monotonic() - t_up
    t_recovered = time.monotonic()
    await sleep(4)
    load.stop()
    await producer.stop()
    figures = await producer.settle(bus, timeout=60)

    outcomes = classify(load.results)
    after = [r for r in load.results if r["started"] >= t_recovered]
    after_outcomes = classify(after)
    around = [r for r in load.results if r["started"] < t_recovered and r["started"] + r["elapsed"] > t_kill]
    around_outcomes = classify(around)
    latencies = [r["elapsed"] * 1000 for r in load.results if r["ok"]]
    slowest = max((r["elapsed"] for r in load.results), default=0)
    notes = (f"broker down {t_up - t_kill:.1f} s; daemon noticed in {t_noticed:.1f} s; healthz back "
             f"{t_health:.1f} s and first new proxied request served {t_proxy:.1f} s after the broker answered; "
             f"HTTP {len(load.results)} requests ({before_kill} before the kill): {outcomes}; "
             f"in flight or during the outage {around_outcomes}; after recovery {after_outcomes}; "
             f"slowest {slowest:.1f} s; failed sends {figures['failed_sends']} {figures['failed_examples']}")
    record("broker kill -9 + restart under load", faults_injected=1, sent=figures["sent"],
           confirmed=figures["confirmed"], processed=figures["processed"], lost=figures["lost"],
           duplicated=figures["duplicated"], errors=outcomes["wrong"],
           p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99), notes=notes)

    assert figures["lost"] == 0, f"confirmed tasks never done: {figures}\n{node.describe()}"
    assert outcomes["wrong"] == 0, [r for r in load.results if not r["ok"] and r["status"] not in (502, 503, 504)]
    assert after_outcomes["ok"] == len(after) and after, f"requests after recovery failed: {after_outcomes}"
    assert slowest < 45, ("a proxied request hung", [r for r in load.results if r["elapsed"] >= 45])
    assert t_proxy < RECOVERY_BOUND, notes


def _direct(url: str) -> bytes:
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as r:
        return r.read()


@pytest_twisted.ensureDeferred
async def test_poison_messages_are_dead_lettered_counted_and_the_component_keeps_serving(
        tmp_path: Path, vhost: str, nodes: list, buses: Any, record: Any) -> None:
    """Scenario 6: an undecodable message (dead-lettered at once) and a request
    that always fails (retried up to retries.limit, then dead-lettered) to the
    attribute store: both land in attribute_store.dead with the error, are
    counted in /metrics and in the node's status, and the store keeps serving."""
    import magnet
    from tests.reliability.faultlib import metric_value
    limit = 2
    node = start_node(tmp_path, "dx", vhost, {"attribute_store": None}, retries={"limit": limit})
    nodes.append(node)
    await wait_started(node)
    bus = buses(vhost)
    await bus.when_connected(20)
    poisons = [magnet.Message(b"\xff\x00 not json at all", content_type="application/json",
                              headers={"x-magnet-op": "set"}),
               magnet.Message(b'{"key": "", "value": 1}', content_type="application/json",
                              headers={"x-magnet-op": "set"}, type="call"),  # InvalidKey, every time
               ]
    for message in poisons:
        await bus.send("attribute_store", message)
    await bus.post("attribute_store", "set", key="", value=1)  # the same through the API: InvalidKey
    await eventually(lambda: metric_value(node.metrics(), "magnet_dead_letters_total", name="attribute_store") >= 3,
                     30, "three dead letters")
    dead: list = []
    await bus.consume("attribute_store.dead", lambda m: dead.append(m))
    await eventually(lambda: len(dead) >= 3, 20, "the dead letters in attribute_store.dead")
    errors = [m.headers.get("x-magnet-error") for m in dead]
    # the component keeps serving
    await bus.call("attribute_store", "set", key="after-poison", value={"ok": True}, timeout=10)
    assert await bus.call("attribute_store", "get", key="after-poison", timeout=10) == {"ok": True}
    status = await deferToThread(node.status)
    metrics = node.metrics()
    handled = metric_value(metrics, "magnet_handler_errors_total", name="attribute_store")
    record("poison messages dead-lettered", faults_injected=3, sent=3, confirmed=3, processed=len(dead), lost=0,
           notes=f"retries.limit {limit}; dead letters {len(dead)} with errors {errors}; handler errors "
                 f"{handled:.0f}; status {json.dumps(status)[:300]}")
    assert len(dead) == 3 and all(errors), errors
    assert any("InvalidKey" in (e or "") for e in errors) and any("BadMessage" in (e or "") for e in errors), errors
    assert handled >= 3, metrics
    assert '"attribute_store": 3' in json.dumps(status), status
