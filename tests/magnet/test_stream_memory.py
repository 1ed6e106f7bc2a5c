"""A large stream keeps memory bounded on both sides, on both transports."""
from __future__ import annotations

import os
from typing import Any, List

import pytest_twisted
from twisted.internet import reactor, task

STREAM_BYTES = int(os.environ.get("MAGNET_TEST_STREAM_BYTES", 1024 * 1024 * 1024))
ALLOWED_GROWTH = 40 * 1024 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest_twisted.inlineCallbacks
def test_large_stream_keeps_rss_bounded(make_bus: Any) -> Any:
    sender, receiver = make_bus(send_timeout=60), make_bus()
    listener = yield receiver.listen()
    block = os.urandom(1024 * 1024)
    blocks = STREAM_BYTES // len(block)
    baseline = rss()
    peak: List[int] = [baseline]
    sampler = task.LoopingCall(lambda: peak.append(rss()))
    sampler.start(0.05)
    sent = sender.send_stream(listener.address, {"status": 200}, (block for _ in range(blocks)))
    s = yield listener.next_stream(timeout=30)
    received: List[int] = [0]

    def sink(data: bytes) -> None:
        received[0] += len(data)

    try:
        total = yield s.deliver(sink).addTimeout(600, reactor)
        yield sent.addTimeout(60, reactor)
    finally:
        sampler.stop()
    assert total == received[0] == blocks * len(block)
    growth = max(peak) - baseline
    print(f"streamed {total >> 20} MiB; RSS grew by at most {growth / 2**20:.1f} MiB")
    assert growth < ALLOWED_GROWTH, f"RSS grew by {growth / 2**20:.1f} MiB"
