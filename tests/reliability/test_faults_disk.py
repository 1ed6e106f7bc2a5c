"""Scenario 7: the disk under the cache's data directory full, then
read-only (a 1 MiB tmpfs mounted there: needs root, as in CI containers).

Properties: every proxied request is still answered whole (served, not
stored); the cache says why in its log; no half-written file is left in
the store; once the disk has room again, answers are stored as before.
(The persister's full disk is covered in-process by tests/ooidx/test_persister.py.)
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.reliability.faultlib import classify, eventually, http_fetch, sleep, start_node, wait_started


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    where = tmp_path / "dx-data" / "cache"
    where.mkdir(parents=True)
    done = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where))
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (root needed): {done.stderr.strip()}", pytrace=False)
    try:
        yield where
    finally:
        for _ in range(2):  # the read-only bind mount, then the tmpfs
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".tmp", ".part")) or
                  (p.suffix == ".body" and p.stat().st_size == 0))


@pytest_twisted.ensureDeferred
async def test_cache_disk_full_then_read_only(tmp_path: Path, small_disk: Path, vhost: str, upstream: Any,
                                              nodes: list, record: Any) -> None:
    node = start_node(tmp_path, "dx", vhost, {"attribute_store": {"url": str(tmp_path / "attrs.sqlite3")},
                                              "controller": None, "fetcher": {"instances": 1}, "cache": None,
                                              "proxyng": None}, proxy=True)
    nodes.append(node)
    await wait_started(node)
    await deferToThread(node.api, "controller", "register", name="big", url=upstream.url("big"))
    results = []

    async def get(size: int) -> dict:
        r = await deferToThread(http_fetch, node.proxy_port, upstream.url(f"big/{size}.bin"), timeout=30,
                                expect=b"\xab" * size)
        results.append(r)
        return r

    # full: a body larger than the disk
    r = await get(3_000_000)
    assert r["ok"], r
    await eventually(lambda: "No space left" in node.log() or "ENOSPC" in node.log(), 15, "the cache says why")
    await sleep(0.5)
    assert _leftovers(small_disk) == [], os.listdir(small_disk)
    again = await get(3_000_000)
    assert again["ok"] and again.get("source") != "cache", again
    # room again: a small body is stored and then served from the cache
    await get(100_000)
    await sleep(1)
    stored = await get(100_000)
    # read-only
    # (a read-only bind mount over it: the store keeps files open, so the tmpfs itself cannot be remounted)
    done = _mount("--bind", str(small_disk), str(small_disk))
    assert done.returncode == 0, done.stderr
    done = _mount("-o", "remount,bind,ro", str(small_disk))
    assert done.returncode == 0, done.stderr
    ro = await get(200_000)
    await eventually(lambda: "Read-only file system" in node.log() or "EROFS" in node.log(), 15,
                     "the cache says the disk is read-only")
    assert ro["ok"], ro
    assert _leftovers(small_disk) == [], os.listdir(small_disk)
    outcomes = classify(results)
    errors = [line for line in node.log().splitlines() if "No space" in line or "Read-only" in line]
    record("cache disk full / read-only (tmpfs 1 MiB)", faults_injected=2, sent=len(results),
           processed=outcomes["ok"], errors=len(results) - outcomes["ok"],
           notes=f"answers {outcomes}; small body afterwards from {stored.get('source')}; log: "
                 f"{[e[-160:] for e in errors[:2]]}; no temporary or empty file left")
    assert outcomes["ok"] == len(results), results
    assert stored.get("source") == "cache", stored
