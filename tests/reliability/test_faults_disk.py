"""Scenario 7: a full disk, a real one (a 1 MiB tmpfs mounted in the data
directory: needs root, as in CI containers).

The cache's disk full, then read-only. Properties: every proxied request is
still answered whole (served, not stored); the cache says why in its log; no
half-written file is left in the store; once the disk has room again,
answers are stored as before.

The persister's disk full. Properties: nothing half-written is left; the
persister says why and asks for the dataset again, over and over while the
disk stays full; once there is room, the version is saved whole (netCDF4
reads the upstream's values from it) and the asking stops.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.reliability.faultlib import classify, eventually, http_fetch, sleep, start_node, wait_started


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def _tmpfs(where: Path) -> Any:
    """A 1 MiB tmpfs mounted at C{where} (in node "dx"'s data directory) while in use."""
    where.mkdir(parents=True)
    done = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where))
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (root needed): {done.stderr.strip()}", pytrace=False)
    try:
        yield where
    finally:
        for _ in range(2):  # a read-only bind mount over it, if any, then the tmpfs
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    with _tmpfs(tmp_path / "dx-data" / "cache") as where:
        yield where


@pytest.fixture
def small_datasets_disk(tmp_path: Path) -> Any:
    with _tmpfs(tmp_path / "dx-data" / "datasets") as where:
        yield where


def _fill(directory: Path) -> Path:
    """Write a file in C{directory} until the disk has no room left; its path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


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
    await deferToThread(node.api, "controller", "register", name="big", url=upstream.url("big"), check=False)  # not DAP: not checked
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


@pytest_twisted.ensureDeferred
async def test_persister_disk_full_then_room(tmp_path: Path, small_datasets_disk: Path, vhost: str, upstream: Any,
                                             nodes: list, record: Any) -> None:
    import netCDF4
    import numpy as np

    node = start_node(tmp_path, "dx", vhost, {
        "attribute_store": {"url": str(tmp_path / "attrs.sqlite3")}, "controller": None, "fetcher": None,
        "pub_sub": None, "notification": None,
        "persister": {"retry_after": 1, "retry_max": 2}})
    nodes.append(node)
    await wait_started(node)
    await eventually(lambda: node.daemon.has("persister: subscription persister ->"), 30, "the persister subscribed")
    filler = _fill(small_datasets_disk)
    await deferToThread(node.api, "controller", "register", name="sst", url=upstream.url("sst.nc"))
    full_since = time.monotonic()
    await deferToThread(node.api, "controller", "get_dataset", name="sst")
    await eventually(lambda: "dataset sst not saved (disk): cannot write" in node.log(), 30,
                     "the persister says why it did not save")
    assert "ENOSPC" in node.log()
    # full for a while: the persister keeps asking (1 s, then every 2 s) and each delivery fails the same way
    await eventually(lambda: node.log().count("asking again for dataset sst") >= 2, 30,
                     "the persister asked for the dataset again, twice")
    failures = node.log().count("dataset sst not saved (disk)")
    assert failures >= 2, node.log()[-3000:]
    dataset_dir = small_datasets_disk / "sst"
    assert not dataset_dir.exists() or os.listdir(dataset_dir) == [], os.listdir(dataset_dir)
    filler.unlink()
    room_at = time.monotonic()
    await eventually(lambda: "dataset sst saved as version" in node.log(), 30, "the version saved once there is room")
    saved_after = time.monotonic() - room_at
    versions = os.listdir(dataset_dir)
    assert len(versions) == 1 and not versions[0].startswith("."), versions
    with netCDF4.Dataset(dataset_dir / versions[0] / "sst.nc") as mirrored, \
            netCDF4.Dataset(upstream.files["sst"]) as source:
        for name in ("time", "lat", "sst"):
            assert np.array_equal(mirrored[name][:], source[name][:]), name
    asked = node.log().count("asking again for dataset sst")
    await sleep(4)  # longer than retry_max: no more asking once saved
    assert node.log().count("asking again for dataset sst") == asked
    record("persister disk full, then room (tmpfs 1 MiB)", faults_injected=1, sent=failures + 1,
           processed=1, errors=0,
           notes=f"{failures} deliveries refused by ENOSPC over {room_at - full_since:.1f} s, {asked} asked again, "
                 f"saved {saved_after:.1f} s after room came back; nothing half-written; .nc equal to the upstream")
