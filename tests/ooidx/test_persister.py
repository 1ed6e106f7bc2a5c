"""The persister on a memory:// bus, with a fake pub_sub that keeps the
contract's subscribe/route: dataset streams (as the fetcher sends them, with
real pydap answers) become version directories; identical versions are not
written again; a full disk, a broken stream and malformed messages leave
nothing half-written and say why in an event."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict

import netCDF4
import numpy as np
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

import magnet
from magnet import Message

from ooidx.errors import UnknownDataset
from ooidx.dissemination.persister import MANIFEST, Persister

from tests.ooidx.dap_upstream import Upstream, make_files
from tests.ooidx.dissemination_helpers import EventLog, FakePubSub
from tests.support.waiting import eventually as until


@pytest.fixture(scope="module")
def answers(tmp_path_factory: Any) -> Dict[str, Any]:
    directory = tmp_path_factory.mktemp("persister-data")
    files = make_files(directory)
    with Upstream(directory) as up:
        parts = {s: urllib.request.urlopen(up.url(f"sst.nc.{s}"), timeout=30).read() for s in ("das", "dds", "dods")}
        base = up.url("sst.nc")
    return dict(parts, source=files["sst"], url=base)


class Rig:
    """A bus, a fake pub_sub, an event log and a persister writing under a directory."""

    def __init__(self, data_dir: Path, subscription: str = "persister", **options: Any) -> None:
        self.bus = magnet.connect(f"memory://persister-{uuid.uuid4().hex}", reactor, rpc_timeout=5, send_timeout=5,
                                  shutdown_timeout=2, stream_idle_timeout=5)
        self.data_dir = data_dir
        self.pub_sub = FakePubSub(self.bus)
        self.persister = Persister("persister", self.bus, node="t", data_dir=str(data_dir),
                                   subscription=subscription, reactor=reactor, **options)
        self.subs: list = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        self.subs.append((yield self.bus.serve("pub_sub", self.pub_sub)))
        self.events = yield EventLog.on(self.bus)
        yield self.persister.start()
        self.address = yield self.persister.ready
        return self

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.persister.stopService()
        yield self.events.cancel()
        for s in self.subs:
            yield s.cancel()
        yield self.bus.stopService()

    def send(self, answers: Dict[str, Any], dods: bytes = None, *, name: str = "sst", abort: bool = False,
             **changes: Any) -> defer.Deferred:
        """A dataset stream as the fetcher sends it."""
        dods = answers["dods"] if dods is None else dods
        metadata = {"topic": f"dataset.{name}", "dataset": name, "url": answers["url"], "fetched": 1700000000.0,
                    "das": answers["das"].decode(), "dds": answers["dds"].decode(), "status": 200,
                    "headers": [["Content-Type", "application/octet-stream"]], "length": len(dods)}
        metadata.update(changes)
        writer = self.bus.open_stream(self.address, metadata, chunk_size=1024)
        if abort:
            d = writer.write(dods[: len(dods) // 2])
            return d.addCallback(lambda _: writer.abort(RuntimeError("upstream broke")))
        return magnet.stream.send_stream(writer, [dods[i:i + 700] for i in range(0, len(dods), 700)])

    def versions(self, name: str = "sst") -> list:
        d = self.data_dir / "datasets" / name
        return sorted(os.listdir(d)) if d.exists() else []


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> Any:
    r = Rig(tmp_path / "data")
    await r.start()
    yield r
    await r.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_subscribes_through_pub_sub(rig: Rig) -> None:
    assert rig.pub_sub.subscriptions == {
        "persister": {"name": "persister", "regex": r"^dataset\.", "address": "pubsub.sub.persister"}}
    assert rig.address == "pubsub.sub.persister"


@pytest_twisted.ensureDeferred
async def test_a_version_on_disk(rig: Rig, answers: Dict[str, Any]) -> None:
    await rig.send(answers)
    event = await rig.events.next("saved", "sst")
    (version,) = rig.versions()
    assert version == event["version"] and version.endswith("-" + sha(answers["dods"])[:12])
    assert version[:16].endswith("Z") and version[8] == "T"
    vdir = rig.data_dir / "datasets" / "sst" / version
    assert sorted(os.listdir(vdir)) == ["manifest.json", "sst.das", "sst.dds", "sst.dods", "sst.nc"]
    assert (vdir / "sst.das").read_bytes() == answers["das"]
    assert (vdir / "sst.dds").read_bytes() == answers["dds"]
    assert (vdir / "sst.dods").read_bytes() == answers["dods"]
    manifest = json.loads((vdir / MANIFEST).read_text())
    assert manifest["dataset"] == "sst" and manifest["url"] == answers["url"]
    assert manifest["fetched"] == 1700000000.0 and isinstance(manifest["saved"], float)
    assert manifest["sequence"] == 1 and manifest["version"] == version
    for file in ("sst.das", "sst.dds", "sst.dods", "sst.nc"):
        data = (vdir / file).read_bytes()
        assert manifest["files"][file] == {"bytes": len(data), "sha256": sha(data)}
    with netCDF4.Dataset(vdir / "sst.nc") as got, netCDF4.Dataset(answers["source"]) as want:
        for var in ("time", "lat", "sst"):
            np.testing.assert_array_equal(got[var][:], want[var][:])
            assert got[var].dimensions == want[var].dimensions
    assert event["topic"] == "event.saved.sst" and event["sha256"] == sha(answers["dods"])
    assert event["versions"] == 1 and event["bytes"] == len(answers["dods"]) and event["netcdf"] is True
    assert event["path"] == f"datasets/sst/{version}"
    assert not [n for n in os.listdir(rig.data_dir / "datasets" / "sst") if n.startswith(".")]
    # the worker queue answers what it saved
    (listed,) = await rig.bus.call("persister", "versions", name="sst")
    assert listed["version"] == version


@pytest_twisted.ensureDeferred
async def test_identical_version_not_written_again(rig: Rig, answers: Dict[str, Any]) -> None:
    await rig.send(answers)
    await rig.events.next("saved", "sst")
    await rig.send(answers)
    await until(lambda: rig.persister.counters["unchanged"] == 1)
    assert len(rig.versions()) == 1 and len(rig.events.of("saved")) == 1
    changed = answers["dods"][:-4] + b"\x41\x41\x00\x00"  # the last lat value, changed
    await rig.send(answers, changed)
    second = await rig.events.next("saved", "sst", skip=1)
    assert second["versions"] == 2 and len(rig.versions()) == 2
    manifests = await rig.bus.call("persister", "versions", name="sst")
    assert [m["sequence"] for m in manifests] == [1, 2]
    assert manifests[1]["files"]["sst.dods"]["sha256"] == sha(changed)
    # a restarted persister knows the last version from the disk
    await rig.persister.stopService()
    rig.persister = Persister("persister", rig.bus, node="t", data_dir=str(rig.data_dir))
    await rig.persister.start()
    await rig.persister.ready
    await rig.send(answers, changed)
    await until(lambda: rig.persister.counters["unchanged"] == 1)
    assert len(rig.versions()) == 2


@pytest_twisted.ensureDeferred
async def test_full_disk(rig: Rig, answers: Dict[str, Any], monkeypatch: Any) -> None:
    """ENOSPC on writes under the data directory (only there: the reactor's own
    pipes keep working): nothing half-written is left, an event says why, and
    the version is not recorded, so the next delivery is saved in full."""
    give_back = _full_disk_under(str(rig.data_dir), monkeypatch)
    await rig.send(answers)
    event = await rig.events.next("failed", "sst")
    assert "ENOSPC" in event["reason"] and event["stage"] == "disk"
    assert event["component"] == "persister"
    assert rig.versions() == []  # no version, no temporary directory
    assert not rig.events.of("saved")
    give_back()
    await rig.send(answers)
    saved = await rig.events.next("saved", "sst")
    assert rig.versions() == [saved["version"]]


class FakeController:
    """get_dataset as the persister uses it: what it was asked, and UnknownDataset for "gone"."""

    def __init__(self) -> None:
        self.asked: list = []

    @magnet.operation
    def get_dataset(self, name: str, to: Any = None) -> Dict[str, Any]:
        self.asked.append((name, to))
        if name == "gone":
            raise UnknownDataset(f"no dataset {name!r} is registered")
        return {"name": name, "to": to}


def _full_disk_under(root: str, monkeypatch: Any) -> Any:
    """ENOSPC for writes under C{root} (only there: the reactor's own pipes keep
    working); returns the function that gives the disk its room back."""
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.startswith(root):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    return lambda: monkeypatch.setattr(os, "write", real_write)


def _asking_again(clock: task.Clock) -> list:
    return [c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_ask_again"]


@pytest_twisted.ensureDeferred
async def test_full_disk_asks_for_the_dataset_again(tmp_path: Path, answers: Dict[str, Any],
                                                    monkeypatch: Any) -> None:
    """The lost version is asked for again, for this persister's address only,
    after retry_after seconds, doubling while the disk stays full; the first
    delivery saved ends the asking."""
    clock = task.Clock()
    r = Rig(tmp_path / "data", clock=clock, retry_after=60, retry_max=200)
    controller = FakeController()
    await r.start()
    r.subs.append(await r.bus.serve("controller", controller))
    try:
        give_back = _full_disk_under(str(r.data_dir), monkeypatch)
        await r.send(answers)
        failed = await r.events.next("failed", "sst")
        assert failed["stage"] == "disk" and failed["retry_in"] == 60
        clock.advance(59)
        await task.deferLater(reactor, 0.2, lambda: None)
        assert controller.asked == []
        clock.advance(1)
        await until(lambda: controller.asked)
        assert controller.asked == [("sst", [r.address])]
        # the delivery asked for is lost as well: the next ask is already on its way, twice as late
        await r.send(answers)
        failed = await r.events.next("failed", "sst", skip=1)
        assert failed["retry_in"] == 120
        assert len(_asking_again(clock)) == 1
        give_back()
        clock.advance(120)
        await until(lambda: len(controller.asked) == 2)
        assert controller.asked[1] == ("sst", [r.address])
        await r.send(answers)
        saved = await r.events.next("saved", "sst")
        assert r.versions() == [saved["version"]]
        assert _asking_again(clock) == []
        stats = await r.bus.call("persister", "stats")
        assert stats["retrying"] == [] and stats["asked_again"] == 2 and stats["failed"] == 2
        clock.advance(10_000)
        await task.deferLater(reactor, 0.2, lambda: None)
        assert len(controller.asked) == 2
    finally:
        await r.stop()


@pytest_twisted.ensureDeferred
async def test_asking_again_stops_for_a_purged_dataset(tmp_path: Path, answers: Dict[str, Any]) -> None:
    """A broken stream is asked for again too; the controller's UnknownDataset
    (purged meanwhile) ends it, and a stopped persister leaves no timer."""
    clock = task.Clock()
    r = Rig(tmp_path / "data", clock=clock, retry_after=5)
    controller = FakeController()
    await r.start()
    r.subs.append(await r.bus.serve("controller", controller))
    try:
        await r.send(answers, name="gone", abort=True)
        failed = await r.events.next("failed", "gone")
        assert failed["stage"] == "stream" and failed["retry_in"] == 5
        clock.advance(5)
        await until(lambda: controller.asked)
        await task.deferLater(reactor, 0.2, lambda: None)
        assert _asking_again(clock) == []
        await r.send(answers, abort=True)
        assert (await r.events.next("failed", "sst"))["retry_in"] == 5
        assert len(_asking_again(clock)) == 1
    finally:
        await r.stop()
    assert _asking_again(clock) == []


@pytest_twisted.ensureDeferred
async def test_broken_stream_leaves_nothing(rig: Rig, answers: Dict[str, Any]) -> None:
    await rig.send(answers, abort=True)
    event = await rig.events.next("failed", "sst")
    assert event["stage"] == "stream" and "upstream broke" in event["reason"]
    assert rig.versions() == []


@pytest_twisted.ensureDeferred
async def test_short_stream_refused(rig: Rig, answers: Dict[str, Any]) -> None:
    await rig.send(answers, length=len(answers["dods"]) + 10)
    event = await rig.events.next("failed", "sst")
    assert "declared" in event["reason"] and rig.versions() == []


@pytest_twisted.ensureDeferred
async def test_malformed(rig: Rig, answers: Dict[str, Any]) -> None:
    """Bad metadata: drained, nothing written, a failed event. A plain message: dead-lettered."""
    cases = [dict(name="../etc"), dict(status=500), dict(das=None), dict(topic="dataset.other"),
             dict(length="many")]
    for n, change in enumerate(cases):
        name = change.pop("name", "sst")
        await rig.send(answers, name=name, **change)
        event = await rig.events.next("failed", timeout=10, skip=n)
        assert event["stage"] == "message"
    assert not (rig.data_dir / "datasets" / "sst").exists() or rig.versions() == []
    assert not (rig.data_dir / "etc").exists()
    assert os.listdir(rig.data_dir / "datasets") in ([], ["sst"])
    dead = await rig.bus.listen(name="magnet.dead-letters", durable=True)
    await rig.bus.send(rig.address, Message.of_json({"hello": 1}))
    message = await dead.get(timeout=5)
    assert message.json() == {"hello": 1}
    # and it still works
    await rig.send(answers)
    await rig.events.next("saved", "sst")


@pytest_twisted.ensureDeferred
async def test_two_subscriptions_each_get_a_copy(tmp_path: Path, answers: Dict[str, Any]) -> None:
    """'send a copy to the west coast repository': another subscription name, another directory."""
    east = Rig(tmp_path / "east")
    await east.start()
    west = Persister("persister", east.bus, node="t", data_dir=str(tmp_path / "west"), subscription="west")
    try:
        await west.start()
        await west.ready
        for address in east.pub_sub.route("dataset.sst"):
            east.address = address
            await east.send(answers)
        await east.events.next("saved", "sst", skip=1)
        assert len(os.listdir(tmp_path / "east" / "datasets" / "sst")) == 1
        assert len(os.listdir(tmp_path / "west" / "datasets" / "sst")) == 1
    finally:
        await west.stopService()
        await east.stop()


@pytest_twisted.ensureDeferred
async def test_waits_for_pub_sub(tmp_path: Path) -> None:
    """pub_sub not there yet: the persister starts anyway and subscribes once it answers."""
    bus = magnet.connect(f"memory://persister-{uuid.uuid4().hex}", reactor, rpc_timeout=0.3, send_timeout=5,
                         shutdown_timeout=2)
    bus.startService()
    persister = Persister("persister", bus, node="t", data_dir=str(tmp_path))
    persister.subscribe_retry = (0.1, 0.2)
    try:
        await persister.start()
        assert not persister.ready.called
        await task.deferLater(reactor, 0.5, lambda: None)
        sub = await bus.serve("pub_sub", FakePubSub(bus))
        address = await persister.ready
        assert address == "pubsub.sub.persister"
        await sub.cancel()
    finally:
        await persister.stopService()
        await bus.stopService()


@pytest_twisted.ensureDeferred
async def test_many_datasets_at_once(rig: Rig, answers: Dict[str, Any]) -> None:
    """Several versions converted at the same time (netCDF-C is not thread-safe:
    ooidx.dissemination.netcdf serializes it; without that this crashed the process)."""
    names = [f"ds{n}" for n in range(8)]
    await defer.gatherResults([rig.send(answers, name=name, topic=f"dataset.{name}") for name in names])
    for n, name in enumerate(names):
        await rig.events.next("saved", name)
    for name in names:
        assert len(rig.versions(name)) == 1
