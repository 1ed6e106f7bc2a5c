"""Node faults: a daemon killed (kill -9) in the middle of downloads, and a
daemon stopped with SIGTERM during load.

Scenario 2: node W1 runs the only cache, which fetches every miss (the cache
answers the controller's one post, docs/data-path.md "route"); slow clients
hold three downloads from it through the proxy of node E. Node W2 (a second
cache) starts, W1 is killed with SIGKILL: the answers W1 held are redelivered
to W2 and done there;
the clients' cut transfers end promptly (never a spliced or truncated body
passed as whole), and their retries are served whole by W2.

Scenario 3: SIGTERM to a node during steady load of worker-queue tasks: it
stops cleanly (exit status 0 within its shutdown bound), tasks sent while it
is down wait in the broker, and after a restart every confirmed task is done.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from dap_upstream import pattern_bytes
from tests.reliability.faultlib import (HttpLoad, TaskProducer, classify, eventually, http_fetch, metric_value,
                                        sleep, start_node, wait_started)

SIZE = 6_000_000
RATE = 1_000_000  # bytes a second: each download lasts about 6 s


@pytest_twisted.ensureDeferred
async def test_fetcher_node_killed_mid_download(tmp_path: Path, vhost: str, upstream: Any, nodes: list,
                                                record: Any) -> None:
    edge = start_node(tmp_path, "edge", vhost, {"attribute_store": None, "controller": None, "proxyng": None},
                      proxy=True)
    w1 = start_node(tmp_path, "w1", vhost, {"cache": None})
    nodes += [edge, w1]
    await wait_started(edge)
    await wait_started(w1)
    await deferToThread(edge.api, "controller", "register", name="pattern", url=upstream.url("pattern"), check=False)  # not DAP

    urls = [upstream.url(f"pattern/{SIZE + i}.bin?rate={RATE}") for i in range(3)]
    first: List[Dict[str, Any]] = []

    def client(url: str) -> None:
        first.append(http_fetch(edge.proxy_port, url, timeout=120,
                                expect=pattern_bytes(int(url.rsplit("/", 1)[1].split(".")[0]))))

    threads = [threading.Thread(target=client, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    try:
        await eventually(lambda: metric_value(w1.metrics(), "magnet_inflight", name="cache") >= 3, 30,
                         "w1 to hold three downloads")
    except AssertionError:
        raise AssertionError("\n".join(l for l in w1.metrics().splitlines() if "cache" in l) + str(first)
                             + edge.describe() + w1.describe())
    w2 = start_node(tmp_path, "w2", vhost, {"cache": None})
    nodes.append(w2)
    await wait_started(w2)
    assert metric_value(w2.metrics(), "magnet_messages_in_total", name="cache") == 0

    t_kill = time.monotonic()
    await deferToThread(w1.kill9)
    await eventually(lambda: metric_value(w2.metrics(), "magnet_messages_in_total", name="cache") >= 3, 30,
                     "the three answers w1 held to be redelivered to w2")
    t_redelivered = time.monotonic() - t_kill
    for t in threads:
        await deferToThread(t.join, 120)
    t_clients = time.monotonic() - t_kill
    outcomes = classify(first)
    # the redelivered fetches run to their end at w2 (nothing left in flight there)
    await eventually(lambda: metric_value(w2.metrics(), "magnet_inflight", name="cache") == 0, 60,
                     "w2 to finish the redelivered fetches")

    retries = [await deferToThread(http_fetch, edge.proxy_port, u, timeout=120,
                                   expect=pattern_bytes(SIZE + i)) for i, u in enumerate(urls)]
    retried = classify(retries)
    w2_in = metric_value(w2.metrics(), "magnet_messages_in_total", name="cache")
    notes = (f"3 downloads of {SIZE // 10**6} MB at {RATE // 1000} kB/s held by w1 when it was killed; redelivered to w2 "
             f"{t_redelivered:.1f} s after the kill; the first transfers ended {t_clients:.1f} s after the kill: "
             f"{outcomes}; retries {retried}; w2 took {w2_in:.0f} answer messages")
    record("cache node (the miss's fetch) kill -9 mid-download", faults_injected=1, sent=3, confirmed=3,
           processed=int(min(w2_in, 3)), lost=3 - int(min(w2_in, 3)), errors=outcomes["wrong"] + 3 - retried["ok"],
           notes=notes)
    assert outcomes["wrong"] == 0, first
    assert retried["ok"] == 3, retries
    assert t_clients < 30, f"the cut transfers took {t_clients:.1f} s to end after the cache died"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigterm_under_load_stops_cleanly_and_loses_nothing(tmp_path: Path, private_rabbitmq: Any,
                                                                   upstream: Any, nodes: list, buses: Any,
                                                                   record: Any) -> None:
    broker = private_rabbitmq
    shutdown = 5
    node = start_node(tmp_path, "dx", broker.url, {"attribute_store": None, "controller": None,
                                                   "fetcher": {"instances": 2, "timeout": 10}, "cache": None,
                                                   "proxyng": None}, proxy=True, timeouts={"shutdown": shutdown})
    nodes.append(node)
    await wait_started(node)
    await deferToThread(node.api, "controller", "register", name="sst", url=upstream.url("sst.nc"))
    bus = buses(broker.url)
    await bus.when_connected(20)
    producer = TaskProducer(bus, rate=150, concurrency=10).start()
    load = HttpLoad(node.proxy_port, [upstream.url("sst.nc.dods?time"), upstream.url("sst.nc.das")],
                    clients=3, timeout=30).start()
    await sleep(3)

    t_term = time.monotonic()
    node.daemon.terminate()
    code = await deferToThread(node.daemon.wait_exit, shutdown + 20)
    stop_seconds = time.monotonic() - t_term
    load.stop()
    http_outcomes = classify(load.results)
    # tasks go on being sent while the node is down: they wait in the broker,
    # and must survive a broker crash there too (kill -9 and restart)
    await sleep(2)
    backlog_before_crash = len(producer.confirmed)
    await deferToThread(broker.kill)
    await broker.start_async()
    await bus.when_connected(30)
    await sleep(2)
    await producer.stop()
    node.restart()
    await wait_started(node)
    figures = await producer.settle(bus, timeout=60)
    clean = "node dx stopped cleanly" in node.log() or "stopped cleanly" in open(
        node.daemon.log_path.parent / "dx.out").read()
    notes = (f"SIGTERM: exit {code} after {stop_seconds:.1f} s (shutdown bound {shutdown} s); HTTP during the "
             f"load {http_outcomes}; tasks queued while the node was down, then the broker was killed (-9) and "
             f"restarted with them queued ({backlog_before_crash} confirmed by then); after the node's restart: "
             f"{figures['processed']} processed, {figures['lost']} lost, {figures['duplicated']} duplicates; "
             f"failed sends {figures['failed_sends']}")
    record("SIGTERM under load, restart", faults_injected=2, sent=figures["sent"], confirmed=figures["confirmed"],
           processed=figures["processed"], lost=figures["lost"], duplicated=figures["duplicated"],
           errors=http_outcomes["wrong"] + (code != 0), notes=notes)
    assert code == 0, node.describe()
    assert stop_seconds < shutdown + 5, notes
    assert clean, node.describe()
    assert figures["lost"] == 0, (figures, [line for line in node.log().splitlines() if "statistic" in line])
    assert http_outcomes["wrong"] == 0, [
        (r["url"], r["status"], r["bytes"], r["error"], f"began {r['started'] - t_term:+.3f} s from SIGTERM, "
         f"ended {r['started'] + r['elapsed'] - t_term:+.3f} s") for r in load.results if classify([r])["wrong"]]
