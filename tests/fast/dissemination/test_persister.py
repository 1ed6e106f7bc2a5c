"""The persister on a memory:// bus driven by a Clock (its disk threads run at once), with a fake pub_sub that keeps the
contract's subscribe/route: dataset streams (as the fetcher sends them, with
real pydap answers) become version directories; identical versions are not
written again; a full disk, a broken stream and malformed messages leave
nothing half-written and say why in an event."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List

import netCDF4
import numpy as np
from twisted.internet import defer, task
from twisted.logger import formatEvent

import magnet
from magnet import Message

from ooidx.errors import UnknownDataset
from ooidx.dissemination.persister import MANIFEST, Persister

from tests.fast.core.support import ClockCase, LogEvents, on_clock
from tests.fast.dissemination.pydap_answers import pydap_responses
from tests.ooidx import dissemination_helpers
from tests.ooidx.dissemination_helpers import EventLog, FakePubSub


class Rig:
    """A bus, a fake pub_sub, an event log and a persister writing under a directory."""

    def __init__(self, reactor: Any, data_dir: Path, subscription: str = "persister", **options: Any) -> None:
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


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


class RigCase(ClockCase):
    """A rig of this test's own, and waits on the clock."""

    def setUp(self) -> None:
        # the event log's waits time out on this test's clock, not the global reactor's
        self.patch(dissemination_helpers, "reactor", self.clock)

    def shared_tmp(self) -> Path:
        if "_tmp" not in self.__dict__:
            self.__dict__["_tmp"] = self.tmp_path()
        return self.__dict__["_tmp"]

    async def rig(self) -> "Rig":
        r = Rig(self.clock, self.shared_tmp() / "data")
        await r.start()
        self.addCleanup(lambda: self.wait(r.stop()))
        return r

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.02)):
            if predicate():
                return
            await self.advance(0.02)
        raise AssertionError("condition not met in time")


class PersisterTests(RigCase):
    @on_clock
    async def test_subscribes_through_pub_sub(self) -> None:
        rig = await self.rig()
        assert rig.pub_sub.subscriptions == {
            "persister": {"name": "persister", "regex": r"^dataset\.", "address": "pubsub.sub.persister"}}
        assert rig.address == "pubsub.sub.persister"

    @on_clock
    async def test_a_version_on_disk(self) -> None:
        rig = await self.rig()
        answers = pydap_responses()["sst"]
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

    @on_clock
    async def test_identical_version_not_written_again(self) -> None:
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        await rig.send(answers)
        await rig.events.next("saved", "sst")
        await rig.send(answers)
        await self.until(lambda: rig.persister.counters["unchanged"] == 1)
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
        await self.until(lambda: rig.persister.counters["unchanged"] == 1)
        assert len(rig.versions()) == 2

    @on_clock
    async def test_full_disk(self) -> None:
        """ENOSPC on writes under the data directory (only there: the self.clock's own
        pipes keep working): nothing half-written is left, an event says why, and
        the version is not recorded, so the next delivery is saved in full."""
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        give_back = _full_disk_under(str(rig.data_dir), self.monkeypatch())
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

    @on_clock
    async def test_full_disk_asks_for_the_dataset_again(self) -> None:
        """The lost version is asked for again, for this persister's address only,
        after retry_after seconds, doubling while the disk stays full; the first
        delivery saved ends the asking."""
        tmp_path = self.shared_tmp()
        answers = pydap_responses()["sst"]
        clock = task.Clock()
        r = Rig(self.clock, tmp_path / "data", clock=clock, retry_after=60, retry_max=200)
        controller = FakeController()
        await r.start()
        r.subs.append(await r.bus.serve("controller", controller))
        try:
            give_back = _full_disk_under(str(r.data_dir), self.monkeypatch())
            await r.send(answers)
            failed = await r.events.next("failed", "sst")
            assert failed["stage"] == "disk" and failed["retry_in"] == 60
            clock.advance(59)
            await self.advance(0.2)
            assert controller.asked == []
            clock.advance(1)
            await self.until(lambda: controller.asked)
            assert controller.asked == [("sst", [r.address])]
            # the delivery asked for is lost as well: the next ask is already on its way, twice as late
            await r.send(answers)
            failed = await r.events.next("failed", "sst", skip=1)
            assert failed["retry_in"] == 120
            assert len(_asking_again(clock)) == 1
            give_back()
            clock.advance(120)
            await self.until(lambda: len(controller.asked) == 2)
            assert controller.asked[1] == ("sst", [r.address])
            await r.send(answers)
            saved = await r.events.next("saved", "sst")
            assert r.versions() == [saved["version"]]
            assert _asking_again(clock) == []
            stats = await r.bus.call("persister", "stats")
            assert stats["retrying"] == [] and stats["asked_again"] == 2 and stats["failed"] == 2
            clock.advance(10_000)
            await self.advance(0.2)
            assert len(controller.asked) == 2
        finally:
            await r.stop()

    @on_clock
    async def test_asking_again_stops_for_a_purged_dataset(self) -> None:
        """A broken stream is asked for again too; the controller's UnknownDataset
        (purged meanwhile) ends it, and a stopped persister leaves no timer."""
        tmp_path = self.shared_tmp()
        answers = pydap_responses()["sst"]
        clock = task.Clock()
        r = Rig(self.clock, tmp_path / "data", clock=clock, retry_after=5)
        controller = FakeController()
        await r.start()
        r.subs.append(await r.bus.serve("controller", controller))
        try:
            await r.send(answers, name="gone", abort=True)
            failed = await r.events.next("failed", "gone")
            assert failed["stage"] == "stream" and failed["retry_in"] == 5
            clock.advance(5)
            await self.until(lambda: controller.asked)
            await self.advance(0.2)
            assert _asking_again(clock) == []
            await r.send(answers, abort=True)
            assert (await r.events.next("failed", "sst"))["retry_in"] == 5
            assert len(_asking_again(clock)) == 1
        finally:
            await r.stop()
        assert _asking_again(clock) == []

    @on_clock
    async def test_broken_stream_leaves_nothing(self) -> None:
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        await rig.send(answers, abort=True)
        event = await rig.events.next("failed", "sst")
        assert event["stage"] == "stream" and "upstream broke" in event["reason"]
        assert rig.versions() == []

    @on_clock
    async def test_short_stream_refused(self) -> None:
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        await rig.send(answers, length=len(answers["dods"]) + 10)
        event = await rig.events.next("failed", "sst")
        assert "declared" in event["reason"] and rig.versions() == []

    @on_clock
    async def test_malformed(self) -> None:
        """Bad metadata: drained, nothing written, a failed event. A plain message (a
        publication on a dataset.* topic): nothing to save, dropped, not an error."""
        rig = await self.rig()
        answers = pydap_responses()["sst"]
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
        with self.assertRaises(magnet.Timeout):
            await dead.get(timeout=2)
        # and it still works
        await rig.send(answers)
        await rig.events.next("saved", "sst")

    @on_clock
    async def test_two_subscriptions_each_get_a_copy(self) -> None:
        """'send a copy to the west coast repository': another subscription name, another directory."""
        tmp_path = self.shared_tmp()
        answers = pydap_responses()["sst"]
        east = Rig(self.clock, tmp_path / "east")
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

    @on_clock
    async def test_waits_for_pub_sub(self) -> None:
        """pub_sub not there yet: the persister starts anyway and subscribes once it answers."""
        tmp_path = self.shared_tmp()
        bus = magnet.connect(f"memory://persister-{uuid.uuid4().hex}", self.clock, rpc_timeout=0.3, send_timeout=5,
                             shutdown_timeout=2)
        bus.startService()
        persister = Persister("persister", bus, node="t", data_dir=str(tmp_path))
        persister.subscribe_retry = (0.1, 0.2)
        try:
            await persister.start()
            assert not persister.ready.called
            await self.advance(0.5)
            sub = await bus.serve("pub_sub", FakePubSub(bus))
            address = await persister.ready
            assert address == "pubsub.sub.persister"
            await sub.cancel()
        finally:
            await persister.stopService()
            await bus.stopService()

    @on_clock
    async def test_many_datasets_at_once(self) -> None:
        """Several versions converted at the same time (netCDF-C is not thread-safe:
        ooidx.dissemination.netcdf serializes it; without that this crashed the process)."""
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        names = [f"ds{n}" for n in range(8)]
        await defer.gatherResults([rig.send(answers, name=name, topic=f"dataset.{name}") for name in names])
        for n, name in enumerate(names):
            await rig.events.next("saved", name)
        for name in names:
            assert len(rig.versions(name)) == 1


class PersisterEdgeTests(RigCase):
    """What the moved tests did not reach: the netCDF copy that cannot be
    made, leftovers of earlier runs, pub_sub answering nonsense, a
    controller that fails, bad names and manifests."""

    @on_clock
    async def test_a_dods_that_does_not_decode_is_saved_without_its_netcdf(self) -> None:
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        garbage = b"Dataset {\n  Float64 x[x = 3];\n} d;\nData:\n\x00"
        await rig.send(answers, garbage)
        event = await rig.events.next("saved", "sst")
        assert event["netcdf"] is False
        (version,) = rig.versions()
        vdir = rig.data_dir / "datasets" / "sst" / version
        assert sorted(os.listdir(vdir)) == ["manifest.json", "sst.das", "sst.dds", "sst.dods"]
        manifest = json.loads((vdir / MANIFEST).read_text())
        assert "does not decode" in manifest["netcdf"]["error"]

    @on_clock
    async def test_a_dods_too_large_to_convert_is_saved_without_its_netcdf(self) -> None:
        rig = await self.rig()
        rig.persister.max_netcdf_bytes = 10
        await rig.send(pydap_responses()["sst"])
        event = await rig.events.next("saved", "sst")
        (version,) = rig.versions()
        manifest = json.loads((rig.data_dir / "datasets" / "sst" / version / MANIFEST).read_text())
        assert manifest["netcdf"] == {"error": "the .dods is larger than the persister converts to netCDF"}
        assert event["netcdf"] is False

    @on_clock
    async def test_leftovers_of_processes_gone_are_removed_at_start(self) -> None:
        from ooidx.dissemination.persister import TEMP_PREFIX

        dataset_dir = self.shared_tmp() / "data" / "datasets" / "sst"
        gone = dataset_dir / f"{TEMP_PREFIX}{2 ** 22 + 12345}-abc"
        mine = dataset_dir / f"{TEMP_PREFIX}{os.getpid()}-abc"
        odd = dataset_dir / f"{TEMP_PREFIX}notapid"
        for d in (gone, mine, odd):
            d.mkdir(parents=True)
        (self.shared_tmp() / "data" / "datasets" / "a-file").write_text("not a dataset directory")
        logged = LogEvents(self)
        await self.rig()
        assert sorted(p.name for p in dataset_dir.iterdir()) == [mine.name]
        assert any("removed 2 unfinished version(s)" in formatEvent(e) for e in logged.events)

    @on_clock
    async def test_pub_sub_answering_without_an_address_is_asked_again(self) -> None:
        logged = LogEvents(self)
        bus = magnet.connect(f"memory://persister-{uuid.uuid4().hex}", self.clock, rpc_timeout=1)
        bus.startService()
        answers: List[Any] = [{"nothing": "here"}]

        class Odd(FakePubSub):
            @magnet.operation
            def subscribe(self, regex: str, name: Any = None) -> Any:
                return answers.pop(0) if answers else FakePubSub.subscribe(self, regex, name)

        sub = await bus.serve("pub_sub", Odd(bus))
        persister = Persister("persister", bus, node="t", data_dir=str(self.shared_tmp()), reactor=self.clock)
        persister.subscribe_retry = (0.5, 1.0)
        await persister.start()
        try:
            assert await persister.ready == "pubsub.sub.persister"
            assert any("without an address" in formatEvent(e) for e in logged.events)
        finally:
            await persister.stopService()
            await sub.cancel()
            await bus.stopService()

    @on_clock
    async def test_a_controller_that_fails_is_asked_again_later(self) -> None:
        logged = LogEvents(self)
        clock = task.Clock()
        r = Rig(self.clock, self.shared_tmp() / "data", clock=clock, retry_after=5)
        await r.start()
        self.addCleanup(lambda: self.wait(r.stop()))

        class Broken:
            asked = 0

            @magnet.operation
            def get_dataset(self, name: str, to: Any = None) -> Any:
                Broken.asked += 1
                raise RuntimeError("controller trouble")

        r.subs.append(await r.bus.serve("controller", Broken()))
        await r.send(pydap_responses()["sst"], name="sst", abort=True)
        assert (await r.events.next("failed", "sst"))["retry_in"] == 5
        clock.advance(5)
        await self.until(lambda: Broken.asked == 1)
        await self.advance(0.1)
        assert any("cannot ask controller again for dataset sst" in formatEvent(e) for e in logged.events)
        assert len([c for c in clock.getDelayedCalls() if c.func.__name__ == "_ask_again"]) == 1
        self.flushLoggedErrors(RuntimeError)  # the controller's own failure, logged where it was served

    @on_clock
    async def test_versions_refuses_a_bad_name_and_skips_bad_manifests(self) -> None:
        from magnet import RemoteError

        rig = await self.rig()
        with self.assertRaises(RemoteError) as e:
            await rig.bus.call("persister", "versions", name="../etc")
        assert e.exception.remote_type == "ValueError"
        await rig.send(pydap_responses()["sst"])
        await rig.events.next("saved", "sst")
        broken = rig.data_dir / "datasets" / "sst" / "20000101T000000Z-000000000000"
        broken.mkdir()
        (broken / MANIFEST).write_text("[1, 2]")
        (rig.data_dir / "datasets" / "sst" / "not-even-a-manifest").mkdir()
        listed = await rig.bus.call("persister", "versions", name="sst")
        assert len(listed) == 1 and listed[0]["sequence"] == 1
        assert await rig.bus.call("persister", "versions", name="never") == []
        stats = await rig.bus.call("persister", "stats")
        assert stats["saved"] == 1 and stats["subscription"] == "persister" and stats["node"] == "t"

    def test_a_persister_needs_a_data_directory(self) -> None:
        bus = magnet.connect(f"memory://persister-{uuid.uuid4().hex}", task.Clock())
        with self.assertRaises(ValueError) as e:
            Persister("persister", bus, node="t")
        assert "needs a data directory" in str(e.exception)


def typed_answers(directory: Path, *, times: int, extra: bool = False) -> Dict[str, Any]:
    """pydap's answers for the typed file (tests.fast.dissemination.pydap_answers.make_typed), as Rig.send takes them."""
    from tests.fast.dissemination.pydap_answers import answers_of, make_typed

    directory.mkdir(parents=True, exist_ok=True)
    source = make_typed(directory / "typed.nc", times=times, extra=extra)
    return dict(answers_of(directory, "typed.nc"), url="http://upstream.test/typed.nc", source=source)


class ChangeSummaryTests(RigCase):
    """Each version says what changed since the one before, in its manifest and its
    saved event; any two versions can be compared through the worker queue."""

    @on_clock
    async def test_time_extension_and_an_added_variable(self) -> None:
        from tests.fast.dissemination.pydap_answers import described

        rig = await self.rig()
        tmp = self.shared_tmp()
        first = typed_answers(tmp / "one", times=3)
        second = typed_answers(tmp / "two", times=5, extra=True)
        await rig.send(first, name="typed", topic="dataset.typed")
        one = await rig.events.next("saved", "typed")
        assert one["changes"]["first"] is True and one["changes"]["from"] is None
        assert one["changes"]["coverage"]["time"]["after"]["end"] == "2020-01-01T00:02:00"
        await rig.send(second, name="typed", topic="dataset.typed")
        two = await rig.events.next("saved", "typed", skip=1)
        summary = two["changes"]
        assert summary["from"] == one["version"] and summary["to"] == two["version"]
        assert summary["variables"] == {"added": ["salt"], "removed": [], "more": 0}
        assert summary["coverage"] == {"time": {
            "units": "seconds since 2020-01-01", "calendar": "standard",
            "before": {"count": 3, "first": 0.0, "last": 120.0, "min": 0.0, "max": 120.0,
                       "start": "2020-01-01T00:00:00", "end": "2020-01-01T00:02:00"},
            "after": {"count": 5, "first": 0.0, "last": 240.0, "min": 0.0, "max": 240.0,
                      "start": "2020-01-01T00:00:00", "end": "2020-01-01T00:04:00"}}}
        assert summary["dimensions"] == {"time": {"before": 3, "after": 5}}
        assert [s["variable"] for s in summary["shapes"]] == ["level", "qc", "temp", "time"]
        assert summary["types"] == [] and summary["attributes"]["count"] == 0
        assert summary["text"] == ("time 2020-01-01T00:00:00 → 2020-01-01T00:04:00 (was 2020-01-01T00:00:00 → "
                                   "2020-01-01T00:02:00; 3 → 5 values); variable added: salt; dimension time 3 → 5")
        vdir = rig.data_dir / "datasets" / "typed" / two["version"]
        manifest = json.loads((vdir / MANIFEST).read_text())
        assert manifest["changes"] == summary
        for file, shas in summary["sha256"].items():
            assert shas["after"] == manifest["files"][file]["sha256"]
            assert shas["before"] == one["changes"]["sha256"][file]["after"]
        # the saved netCDF is the upstream file, types included
        assert described(vdir / "typed.nc") == described(second["source"])
        # any two versions, either way round, through the worker queue
        back = await rig.bus.call("persister", "diff", name="typed", before=two["version"], after=one["version"])
        assert back["variables"]["removed"] == ["salt"] and back["dimensions"]["time"] == {"before": 5, "after": 3}
        latest = await rig.bus.call("persister", "version", name="typed", version="latest")
        assert latest["version"] == two["version"]
        (last,) = await rig.bus.call("persister", "versions", name="typed", limit=1)
        assert last["version"] == two["version"]
        for kwargs, kind in [(dict(name="typed", version="20200101T000000Z-000000000000"), "UnknownVersion"),
                             (dict(name="typed", version="../x"), "InvalidVersion"),
                             (dict(name="../x", version="latest"), "ValueError"),
                             (dict(name="none", version="latest"), "UnknownVersion")]:
            with self.assertRaises(magnet.RemoteError) as caught:
                await rig.bus.call("persister", "version", **kwargs)
            assert caught.exception.remote_type == kind

    @on_clock
    async def test_attribute_changes_are_bounded(self) -> None:
        rig = await self.rig()
        answers = pydap_responses()["sst"]
        await rig.send(answers)
        one = await rig.events.next("saved", "sst")
        das = answers["das"].decode().replace("    sst {\n", "    sst {\n" + "".join(
            f'        String note{n:02d} "n{n}";\n' for n in range(30)), 1)
        assert das != answers["das"].decode()
        changed = answers["dods"][:-4] + b"\x41\x41\x00\x00"
        await rig.send(answers, changed, das=das)
        two = await rig.events.next("saved", "sst", skip=1)
        attributes = two["changes"]["attributes"]
        assert attributes["count"] == 30 and attributes["more"] == 10 and len(attributes["added"]) == 20
        assert attributes["added"][0] == {"variable": "sst", "name": "note00", "type": "String", "value": "n0"}
        assert "attributes: 20 added, 10 more" in two["changes"]["text"]
        wide = await rig.bus.call("persister", "diff", name="sst", before=one["version"], after=two["version"],
                                  limit=100)
        assert len(wide["attributes"]["added"]) == 30 and wide["attributes"]["more"] == 0
