"""Periodic refresh, driven by an injected Clock: the controller asks for a
dataset with a `refresh` interval on schedule; the real fetcher fetches it
from a twisted.web upstream and routes it with a fake pub_sub to a real
persister. Only a changed dataset makes a new version and a "saved" event;
the record follows the events (status, last_fetch, size, versions)."""
from __future__ import annotations

import struct
import uuid
from typing import Any, Dict

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

import magnet
from magnet.bus import WORKER

from ooidx.attribute_store import AttributeStore
from ooidx.config import parse
from ooidx.datapath.controller import Controller
from ooidx.datapath.fetcher import Fetcher
from ooidx.dissemination.persister import Persister

from tests.ooidx.dissemination_helpers import EventLog, FakePubSub, dataset_site
from tests.support.waiting import eventually as until

DDS = b"Dataset {\n    Float64 x[x = 2];\n} made;\n"


def dods(a: float, b: float) -> bytes:
    return DDS + b"Data:\n" + struct.pack(">II", 2, 2) + struct.pack(">dd", a, b)


@pytest.fixture
def upstream() -> Any:
    site = dataset_site({"made": {"dods": dods(1.0, 2.0), "dds": DDS}, "other": {"dods": dods(0, 0), "dds": DDS}})
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port
    yield {"url": f"http://127.0.0.1:{number}", "port": number, "site": site,
           "dods": site.resource.children[b"made.dods"]}
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


class Exchange:
    """attribute store, controller (on a Clock), fetcher, fake pub_sub, persister: one memory:// bus."""

    def __init__(self, tmp_path: Any, port: int) -> None:
        config = parse("node: n1\ncomponents: {fetcher: {timeout: 5}, controller: {}}\n"
                       f"security: {{allow_hosts: ['127.0.0.1:{port}']}}\n", "dx.yaml")
        self.clock = task.Clock()
        self.bus = magnet.connect(f"memory://refresh-{uuid.uuid4().hex}", reactor, node="n1", rpc_timeout=5,
                                  send_timeout=5, shutdown_timeout=2)
        self.store = AttributeStore("attribute_store", self.bus, node="n1",
                                    url=str(tmp_path / "attributes.sqlite3"), clock=reactor)
        self.controller = Controller.from_config("controller", self.bus, config, node="n1", clock=self.clock)
        self.fetcher = Fetcher.from_config("fetcher", self.bus, config, node="n1")
        self.pub_sub = FakePubSub(self.bus)
        self.persister = Persister("persister", self.bus, node="n1", data_dir=str(tmp_path / "data"))
        self.subs: list = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield self.store.start()
        self.subs.append((yield self.bus.serve("pub_sub", self.pub_sub)))
        self.events = yield EventLog.on(self.bus)
        yield self.fetcher.start()
        yield self.persister.start()
        yield self.persister.ready
        yield self.controller.start()
        yield self.controller.reload()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for component in (self.controller, self.persister, self.fetcher):
            yield component.stopService()
        yield self.events.cancel()
        for s in self.subs:
            yield s.cancel()
        yield self.store.stopService()
        yield self.bus.stopService()

    def call(self, op: str, **kwargs: Any) -> defer.Deferred:
        return self.bus.call("controller", op, **kwargs)


@pytest_twisted.async_yield_fixture
async def dx(tmp_path: Any, upstream: Any) -> Any:
    x = Exchange(tmp_path, upstream["port"])
    await x.start()
    yield x
    await x.stop()


@pytest_twisted.ensureDeferred
async def test_only_a_changed_dataset_makes_a_version(dx: Exchange, upstream: Any) -> None:
    base = upstream["url"] + "/made"
    registered = await dx.call("register", name="made", url=base, refresh=60)
    assert registered["refresh"] == 60.0
    await dx.events.next("registered", "made")
    assert set(dx.controller.refreshers) == {"made"}
    dx.clock.advance(59)
    await task.deferLater(reactor, 0.2, lambda: None)
    assert not dx.events.of("fetched")  # not yet: the schedule, not the reactor, decides
    dx.clock.advance(1)
    saved = await dx.events.next("saved", "made")
    assert saved["versions"] == 1
    await until(lambda: dx.controller.datasets["made"].get("versions") == 1)
    record = await dx.call("get", name="made")
    assert record["status"] == "fetched" and record["versions"] == 1
    assert record["size"] == len(dods(1.0, 2.0)) and record["last_fetch"] is not None

    # unchanged upstream: fetched again, no new version, no saved event
    dx.clock.advance(60)
    await dx.events.next("fetched", "made", skip=1)
    await until(lambda: dx.persister.counters["unchanged"] == 1)
    assert len(dx.events.of("saved")) == 1

    # changed upstream: a new version and an event
    upstream["dods"].body = dods(1.0, 2.5)
    dx.clock.advance(60)
    second = await dx.events.next("saved", "made", skip=1)
    assert second["versions"] == 2
    await until(lambda: dx.controller.datasets["made"].get("versions") == 2)
    assert len(await dx.bus.call("persister", "versions", name="made")) == 2

    # purged: the timer goes, nothing more is fetched
    await dx.call("purge", name="made")
    await dx.events.next("purged", "made")
    assert dx.controller.refreshers == {}
    fetched = len(dx.events.of("fetched"))
    dx.clock.advance(300)
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(dx.events.of("fetched")) == fetched


@pytest_twisted.ensureDeferred
async def test_timers_follow_the_registry(dx: Exchange, upstream: Any) -> None:
    await dx.call("register", name="made", url=upstream["url"] + "/made")
    assert dx.controller.refreshers == {}  # no refresh interval, no timer
    await dx.call("register", name="made", url=upstream["url"] + "/made", refresh=30)
    assert dx.controller.refreshers["made"][0] == 30.0
    await dx.call("register", name="made", url=upstream["url"] + "/made", refresh=10)
    interval, loop = dx.controller.refreshers["made"]
    assert interval == 10.0 and loop.running
    dx.clock.advance(10)
    await dx.events.next("saved", "made")
    # registered through another controller: found at the next reload
    record = dict(await dx.bus.call("attribute_store", "get", key="dataset:made"))
    await dx.bus.call("attribute_store", "set", key="dataset:other",
                      value=dict(record, name="other", url=upstream["url"] + "/other", refresh=20.0))
    await dx.controller.reload()
    assert set(dx.controller.refreshers) == {"made", "other"}


@pytest_twisted.ensureDeferred
async def test_failed_fetch_marks_the_record(dx: Exchange, upstream: Any) -> None:
    await dx.call("register", name="gone", url=upstream["url"] + "/gone", refresh=5, check=False)  # 404: not checked
    dx.clock.advance(5)
    event = await dx.events.next("failed", "gone")
    assert event["stage"] == "das" and event["component"] == "fetcher"
    await until(lambda: dx.controller.datasets["gone"].get("status") == "failed")
