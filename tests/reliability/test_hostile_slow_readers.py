"""Slow readers: proxy clients that ask for a body and never read it, against a
`twistd -n ooidx` node on RabbitMQ (a virtual host of this test's own) with a
real, slow DAP upstream on loopback (tests/ooidx/dap_upstream.py, /big/ at a
set rate).

The attack (the issue's "eleven slow readers stop every cache miss"): more
clients than the fetcher has message slots (the bus prefetch, 10) each open a
proxy GET of a long body and never read a byte of it. Before the fix each held
a fetcher slot until a send to it timed out, and fresh misses waited behind
them. What must hold: during the attack, fresh misses (URLs nobody asked
before, from another client address) are served whole within their usual
time; the stalled clients are cut within a few seconds of stalling (the
proxy's stall_timeout), those over the per-address bound (max_per_client) are
answered 429 at once; the node logs no traceback.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Iterator, List

import pytest

from tests.reliability.hostile_node import Node, own_vhost, start_node, stop_node, upstream_in
from tests.reliability.results import latencies_ms, record

#: Stalled clients, from two addresses: of these, 2 * PER_CLIENT = 12 get
#: through, more than the fetcher has message slots (prefetch 10).
SLOW_READERS = 16
#: Fresh misses asked for during the attack (each a URL nobody asked before).
FRESH_MISSES = 6
#: The longest a fresh miss may take during the attack.
MISS_DEADLINE = 2.0
#: The slow readers' body: long enough to outlast the test at the upstream's rate.
SLOW_BODY = 64 * 1024 * 1024
SLOW_RATE = 4 * 1024 * 1024
#: The stalled clients' address, and how many requests the proxy lets one address have.
ATTACKERS = ("127.0.0.2", "127.0.0.3")
PER_CLIENT = 6
#: Seconds a client may read nothing before the proxy cuts it off.
STALL = 3.0


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Iterator[Any]:
    up = upstream_in(tmp_path_factory.mktemp("slowreaders-up"))
    with up:
        yield up


@pytest.fixture(scope="module")
def node(tmp_path_factory: Any, broker_url: str, upstream: Any) -> Iterator[Node]:
    vhost, delete = own_vhost(broker_url, "slowreaders")
    n = start_node(tmp_path_factory.mktemp("slowreaders"), "slowr", broker=vhost, upstream_port=upstream.port,
                   components={"attribute_store": None, "controller": None, "cache": None,
                               "proxyng": {"max_per_client": PER_CLIENT, "stall_timeout": STALL},
                               "web": None, "notification": None, "fetcher": None},
                   timeouts={"shutdown": 3, "rpc": 10})
    try:
        yield n
    finally:
        stop_node(n)
        delete()


def _stalled_client(node: Node, upstream: Any, i: int) -> socket.socket:
    """A proxy GET of a long body whose client never reads a byte (from
    127.0.0.2 or .3: other client addresses than the well-behaved one's)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((ATTACKERS[i % len(ATTACKERS)], 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", node.proxy_port))
    url = upstream.url(f"big/{SLOW_BODY}.bin?rate={SLOW_RATE}&reader={i}-{time.monotonic_ns()}")
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s


def _fresh_miss(node: Node, upstream: Any, k: int) -> float:
    """One fresh miss, read whole and checked; its latency."""
    url = upstream.url(f"big/{100_000 + k}.bin?fresh={k}-{time.monotonic_ns()}")
    started = time.monotonic()
    status, headers, body = node.proxy_get(url, timeout=MISS_DEADLINE * 2)
    took = time.monotonic() - started
    assert status == 200, (status, body[:300])
    assert len(body) == 100_000 + k and body == b"\xab" * len(body)
    return took


def _fate(s: socket.socket) -> str:
    """What became of a stalled client: "cut" (the proxy reset or closed the
    connection), "refused" (answered 429), or "open" (still being served)."""
    s.setblocking(False)
    first = b""
    try:
        while True:
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                return "refused" if first.startswith(b"HTTP/1.1 429 ") else "open"
            except OSError:
                return "cut"
            if not data:
                return "refused" if first.startswith(b"HTTP/1.1 429 ") else "cut"
            if len(first) < 64:
                first += data
    finally:
        s.setblocking(True)


def test_slow_readers_do_not_stop_fresh_misses(node: Node, upstream: Any) -> None:
    baseline = [_fresh_miss(node, upstream, k) for k in range(3)]
    started = time.monotonic()
    readers: List[socket.socket] = [_stalled_client(node, upstream, i) for i in range(SLOW_READERS)]
    during: List[float] = []
    errors = 0
    try:
        time.sleep(1.0)  # every stalled transfer has started and filled what buffers it can
        for k in range(FRESH_MISSES):
            try:
                during.append(_fresh_miss(node, upstream, 10 + k))
            except (AssertionError, OSError) as e:
                errors += 1
                print(f"fresh miss {k} failed: {e!r}")
        attack = time.monotonic() - started
        # read nothing until the stalled clients must have been cut, then look
        time.sleep(max(0.0, started + STALL + 5 - time.monotonic()))
        fates = [_fate(s) for s in readers]
    finally:
        for s in readers:
            s.close()
    cut, refused = fates.count("cut"), fates.count("refused")
    slow = [t for t in during if t > MISS_DEADLINE]
    base, load = latencies_ms(baseline), latencies_ms(during)
    assert node.alive(), node.daemon.describe()
    assert not node.tracebacks(), node.tracebacks()[:5]
    stalled_log = node.daemon.log().count("the client read nothing for")
    record("hostile", "slow readers", inputs_tried=SLOW_READERS, sent=FRESH_MISSES, processed=len(during),
           lost=FRESH_MISSES - len(during), errors=errors + len(slow), p50_ms=load["p50_ms"], p99_ms=load["p99_ms"],
           notes=f"{SLOW_READERS} proxy clients from {len(ATTACKERS)} addresses that never read a {SLOW_BODY >> 20} MiB body "
                 f"(upstream at {SLOW_RATE >> 20} MiB/s), node on RabbitMQ, fetcher prefetch 10; {len(during)} of "
                 f"{FRESH_MISSES} fresh misses served whole within {attack:.1f} s of the attack's start, p50 "
                 f"{load['p50_ms'] or 0:.0f} ms (baseline {base['p50_ms']:.0f} ms); stalled clients: {cut} cut "
                 f"(stall_timeout {STALL:g} s; {stalled_log} logged), {refused} answered 429 "
                 f"(max_per_client {PER_CLIENT})")
    assert errors == 0 and not slow, (errors, during)
    assert load["p50_ms"] < 1000, load
    assert refused == SLOW_READERS - PER_CLIENT * len(ATTACKERS), fates
    assert cut == PER_CLIENT * len(ATTACKERS), fates
