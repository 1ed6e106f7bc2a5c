"""Dissemination end to end: register a dataset -> get_dataset -> fetcher ->
pub_sub route -> persister writes a netCDF file that netCDF4 opens with the
same values as the upstream file -> the "saved" event reaches an
ooidx.events subscriber, an SSE client of a person's subscription and a
webhook receiver the test runs.

The real components (attribute_store, controller, fetcher, pub_sub,
notification, user_notification, web, persister) against
pydap's real server: on memory:// in one process, and on RabbitMQ (a virtual
host of the test's own) spread over two buses, two nodes in one process:
node A runs attribute_store, controller, pub_sub, notification,
user_notification and web; node B runs fetcher and persister."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Dict, List

import netCDF4
import numpy as np
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web import server

import magnet

from ooidx import events
from ooidx.attribute_store import AttributeStore
from ooidx.node.bootstrap import declare_topology
from ooidx.config import parse
from ooidx.datapath.controller import Controller
from ooidx.datapath.fetcher import Fetcher
from ooidx.dissemination.notification import Notification
from ooidx.dissemination.persister import Persister
from ooidx.dissemination.pub_sub import PubSub
from ooidx.people.user_notification import UserNotification
from ooidx.web.app import Web

from tests.ooidx.dap_upstream import Upstream, make_files
from tests.ooidx.test_multinode import isolated_broker  # noqa: F401 - the fixture: a vhost of the test's own
from tests.ooidx.test_user_subscriptions import SSE, Receiver, eventually

TOKEN = "dissemination-e2e-" + "t" * 20


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Any:
    directory = tmp_path_factory.mktemp("e2e-dap")
    files = make_files(directory)
    with Upstream(directory) as up:
        up.files = files
        yield up


class Exchange:
    """The components on one or two buses, a webhook receiver, and the HTTP client side."""

    def __init__(self, tmp: Path, upstream: Upstream, broker: str, *, two_nodes: bool) -> None:
        self.receiver = Receiver()
        self.receiver_port = reactor.listenTCP(0, server.Site(self.receiver), interface="127.0.0.1")
        hook_port = self.receiver_port.getHost().port
        self.hook = f"http://127.0.0.1:{hook_port}/hook"
        self.config = parse("node: a\ncomponents: {fetcher: {timeout: 10}, controller: {}}\n"
                            f"security: {{allow_hosts: ['127.0.0.1:{upstream.port}', '127.0.0.1:{hook_port}']}}\n",
                            str(tmp / "dx.yaml"))
        options = dict(rpc_timeout=10, send_timeout=10, shutdown_timeout=2)
        self.bus_a = magnet.connect(broker, reactor, node="a", **options)
        self.bus_b = magnet.connect(broker, reactor, node="b", **options) if two_nodes else self.bus_a
        a, b = self.bus_a, self.bus_b
        self.node_a = [
            AttributeStore("attribute_store", a, node="a", url=str(tmp / "attributes.sqlite3"), clock=reactor),
            PubSub("pub_sub", a, node="a"),
            Notification("notification", a, node="a"),
            UserNotification.from_config("user_notification", a, self.config, node="a", webhook_base_delay=0.05),
            Controller.from_config("controller", a, self.config, node="a"),
            Web("web", a, node="a", port=0, interface="127.0.0.1", token=TOKEN),
        ]
        self.node_b = [
            Fetcher.from_config("fetcher", b, self.config, node="b"),
            Persister("persister", b, node="b", data_dir=str(tmp / "data")),
        ]
        self.data_dir = tmp / "data"
        self.web = self.node_a[-1]
        self.persister = self.node_b[-1]
        self.saved: List[Dict[str, Any]] = []
        self.streams: List[SSE] = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        for bus in {id(self.bus_a): self.bus_a, id(self.bus_b): self.bus_b}.values():
            bus.startService()
            yield bus.when_connected(10)
            yield declare_topology(bus)
        for component in self.node_a + self.node_b:
            yield component.start()
        yield self.persister.ready
        self.tail = yield events.subscribe(self.bus_b, r"^event\.saved\.", self.saved.append)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for s in self.streams:
            if s.transport is not None:
                s.close()
        yield self.tail.cancel()
        for component in reversed(self.node_a + self.node_b):
            yield component.stopService()
        for bus in {id(self.bus_a): self.bus_a, id(self.bus_b): self.bus_b}.values():
            yield bus.stopService()
        yield self.receiver_port.stopListening()

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, token: str = TOKEN) -> Any:
        import json
        import treq
        response = yield treq.request(method, self.web.url + path, data=json.dumps(body).encode() if body else None,
                                      headers={"Authorization": f"Bearer {token}"}, persistent=False)
        content = yield response.content()
        return response.code, (json.loads(content) if content else None)

    @defer.inlineCallbacks
    def person_subscribed(self) -> Any:
        """A person with two subscriptions to saved events, one by webhook, one read by SSE; the SSE client."""
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers
        code, person = yield self.request("POST", "/api/people", {"name": "p" + uuid.uuid4().hex[:8]})
        assert code == 201, person
        code, hook = yield self.request("POST", "/api/subscriptions",
                                        {"kind": "events", "regex": r"^event\.saved\.", "webhook": self.hook},
                                        token=person["token"])
        assert code == 201, hook
        code, sub = yield self.request("POST", "/api/subscriptions", {"kind": "events", "regex": r"^event\.saved\."},
                                       token=person["token"])
        assert code == 201, sub
        response = yield Agent(reactor).request(b"GET", (self.web.url + sub["events"]).encode(),
                                                Headers({b"Authorization": [f"Bearer {person['token']}".encode()]}))
        assert response.code == 200
        client = SSE()
        response.deliverBody(client)
        self.streams.append(client)
        yield eventually(lambda: client.comments, 5, "the stream's first comment")
        return client


@defer.inlineCallbacks
def run_through(ex: Exchange, upstream: Upstream) -> Any:
    client = yield ex.person_subscribed()
    bus = ex.bus_a
    record = yield bus.call("controller", "register", name="sst", url=upstream.url("sst.nc"))
    assert record["status"] == "registered"
    answer = yield bus.call("controller", "get_dataset", name="sst")
    assert answer["name"] == "sst"
    yield eventually(lambda: ex.saved, 30, "the saved event")
    (saved,) = ex.saved
    assert saved["topic"] == "event.saved.sst" and saved["versions"] == 1 and saved["netcdf"] is True
    nc = ex.data_dir / saved["path"] / "sst.nc"
    with netCDF4.Dataset(nc) as got, netCDF4.Dataset(upstream.files["sst"]) as want:
        assert got.title == want.title
        for var in ("time", "lat", "sst"):
            assert got[var].dimensions == want[var].dimensions
            np.testing.assert_array_equal(got[var][:], want[var][:])
    assert sorted(os.listdir(ex.data_dir / saved["path"])) == ["manifest.json", "sst.das", "sst.dds", "sst.dods",
                                                              "sst.nc"]
    # a person's SSE stream and webhook get it too
    (event,) = yield client.wait_for(1, 15)
    assert event["data"]["topic"] == "event.saved.sst" and event["data"]["version"] == saved["version"]
    yield eventually(lambda: ex.receiver.requests, 15, "the webhook POST")
    assert ex.receiver.requests[0]["body"]["topic"] == "event.saved.sst"
    # the controller's record follows the events
    yield eventually(lambda: ex.node_a[4].datasets["sst"].get("versions") == 1, 10, "the record's versions")
    record = yield bus.call("controller", "get", name="sst")
    assert record["status"] == "fetched" and record["size"] == saved["bytes"]
    # asked again, unchanged: no second version, no second event
    yield bus.call("controller", "get_dataset", name="sst")
    yield eventually(lambda: ex.persister.counters["unchanged"] == 1, 20, "the unchanged version")
    assert len(ex.saved) == 1 and len(os.listdir(ex.data_dir / "datasets" / "sst")) == 1


@pytest.mark.parametrize("two_nodes", [False, True], ids=["one-bus", "two-buses"])
@pytest_twisted.ensureDeferred
async def test_memory_one_process(tmp_path: Path, upstream: Upstream, two_nodes: bool) -> None:
    broker = f"memory://e2e-{uuid.uuid4().hex}"
    ex = Exchange(tmp_path, upstream, broker, two_nodes=two_nodes)
    await ex.start()
    try:
        await run_through(ex, upstream)
    finally:
        await ex.stop()


@pytest.mark.rabbitmq
@pytest_twisted.ensureDeferred
async def test_rabbitmq_two_nodes(tmp_path: Path, upstream: Upstream, isolated_broker: str) -> None:  # noqa: F811
    ex = Exchange(tmp_path, upstream, isolated_broker, two_nodes=True)
    await ex.start()
    try:
        await run_through(ex, upstream)
    finally:
        await ex.stop()
