"""Scenario 4: network faults between a daemon and its broker, through a TCP
proxy that the test controls (tests/reliability/faultlib.TcpFaultProxy).

- drop: every connection closed at once (a reset link);
- stall: nothing forwarded, nothing closed (a dead network): heartbeats
  (timeouts.heartbeat: 1 s) must notice within a few intervals;
- slow: 50 ms of latency added each way.

Through all of it worker-queue tasks are sent (from a bus that does not go
through the proxy) and proxied HTTP requests are made; after each fault the
link comes back by itself, new requests succeed, and every confirmed task is
done in the end.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.rabbitmq import url_host_port
from tests.reliability.faultlib import (HttpLoad, TaskProducer, TcpFaultProxy, classify, eventually, http_fetch,
                                        sleep, start_node, wait_started)
from tests.reliability.results import percentile

HEARTBEAT = 1.0


@pytest_twisted.ensureDeferred
async def test_drop_stall_slow_link_to_the_broker(tmp_path: Path, vhost: str, upstream: Any, nodes: list,
                                                  buses: Any, record: Any) -> None:
    host, port = url_host_port(vhost)
    proxy = TcpFaultProxy(port, host)
    try:
        await _scenario(tmp_path, vhost, proxy, upstream, nodes, buses, record)
    finally:
        proxy.close()


async def _scenario(tmp_path: Path, vhost: str, proxy: TcpFaultProxy, upstream: Any, nodes: list, buses: Any,
                    record: Any) -> None:
    node = start_node(tmp_path, "dx", proxy.url(vhost),
                      {"attribute_store": None, "controller": None, "fetcher": {"instances": 2, "timeout": 10},
                       "cache": None, "proxyng": None}, proxy=True,
                      timeouts={"heartbeat": HEARTBEAT, "connect": 2, "rpc": 5})
    nodes.append(node)
    await wait_started(node)
    await deferToThread(node.api, "controller", "register", name="big", url=upstream.url("big"), check=False)  # not DAP: not checked
    bus = buses(vhost)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=100, concurrency=5).start()
    load = HttpLoad(node.proxy_port, [upstream.url("big/200000.bin"), upstream.url("big/5000.bin")], clients=3,
                    timeout=60, expect={upstream.url("big/200000.bin"): b"\xab" * 200000,
                                        upstream.url("big/5000.bin"): b"\xab" * 5000}, unique_every=2).start()
    fresh = [0]

    def a_new_request_works() -> bool:
        fresh[0] += 1
        size = 3000 + fresh[0]
        r = http_fetch(node.proxy_port, upstream.url(f"big/{size}.bin"), timeout=15, expect=b"\xab" * size)
        return r["ok"]

    figures: Dict[str, float] = {}
    await sleep(2)

    # drop: every connection reset
    t = time.monotonic()
    cut = proxy.drop()
    await eventually(lambda: node.health() is not None and proxy.accepted > 1, 30, "the link back after a drop",
                     interval=0.05)
    await eventually(lambda: deferToThread(a_new_request_works), 30, "a new request after the drop")
    figures["drop_back_s"] = time.monotonic() - t
    await sleep(2)

    # stall: nothing forwarded, nothing closed
    t = time.monotonic()
    proxy.stalled = True
    await eventually(lambda: node.health() is None, 15, "the stall noticed", interval=0.05)
    figures["stall_noticed_s"] = time.monotonic() - t
    await sleep(4)
    t = time.monotonic()
    proxy.stalled = False
    await eventually(lambda: node.health() is not None, 60, "the link back after the stall", interval=0.05)
    await eventually(lambda: deferToThread(a_new_request_works), 30, "a new request after the stall")
    figures["stall_back_s"] = time.monotonic() - t
    await sleep(2)

    # slow: latency on every chunk, each way; requests that cross the bus still complete
    proxy.delay = 0.05
    downs = 0
    slow_results = []
    for k in range(3):
        size = 7000 + k
        slow_results.append(await deferToThread(http_fetch, node.proxy_port, upstream.url(f"big/{size}.bin?slow={k}"),
                                                timeout=60, expect=b"\xab" * size))
        if node.health(timeout=5) is None:
            downs += 1
    proxy.delay = 0.0
    await eventually(lambda: deferToThread(a_new_request_works), 30, "a new request after the slow link")
    await sleep(1)
    load.stop()
    await producer.stop()
    tasks = await producer.settle(bus, timeout=60)

    outcomes = classify(load.results)
    slow_outcomes = classify(slow_results)
    slow_ok = [r["elapsed"] * 1000 for r in slow_results if r["ok"]]
    notes = (f"drop ({cut} links cut): link and a new request back in {figures['drop_back_s']:.1f} s; "
             f"stall (heartbeat {HEARTBEAT:g} s) noticed in {figures['stall_noticed_s']:.1f} s, back "
             f"{figures['stall_back_s']:.1f} s after it healed; slow link (+50 ms each way), 3 new requests: health down "
             f"{downs} times, HTTP {slow_outcomes} (p50 {percentile(slow_ok, 50)} ms); all HTTP {outcomes}; "
             f"tasks: failed sends {tasks['failed_sends']}")
    latencies = [r["elapsed"] * 1000 for r in load.results if r["ok"]]
    record("network drop / stall / slow (TCP proxy)", faults_injected=3, sent=tasks["sent"],
           confirmed=tasks["confirmed"], processed=tasks["processed"], lost=tasks["lost"],
           duplicated=tasks["duplicated"], errors=outcomes["wrong"], p50_ms=percentile(latencies, 50),
           p99_ms=percentile(latencies, 99), notes=notes)
    assert tasks["lost"] == 0, tasks
    assert outcomes["wrong"] == 0, [r for r in load.results if not r["ok"]][:5]
    assert figures["stall_noticed_s"] <= 3 * HEARTBEAT + 1.0, notes
    assert figures["drop_back_s"] < 10 and figures["stall_back_s"] < 15, notes
    assert downs == 0 and slow_outcomes["ok"] > 0 and slow_outcomes["ok"] == len(slow_results), notes
