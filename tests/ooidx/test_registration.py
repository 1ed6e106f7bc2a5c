"""Registration that checks (issue 16, point 1), against real peers: a real
Fetcher and Controller on a memory:// bus, pydap serving real netCDF files on
loopback (tests/ooidx/dap_upstream.py), and a loopback port nothing listens
on. The unreachable host and the 404 are refused with their reason and
nothing is registered; the good DAP URL is accepted."""
from __future__ import annotations

import dataclasses
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet
from magnet import RemoteError

from ooidx import config as config_module
from ooidx.config import FetcherOptions, SecurityConfig
from ooidx.datapath.controller import Controller
from ooidx.datapath.fetcher import Fetcher
from ooidx.node.bootstrap import declare_topology

from tests.fast.datapath.test_controller_contract import FakeStore
from tests.ooidx.dap_upstream import Upstream, make_files


@pytest.fixture(scope="module")
def dap(tmp_path_factory: Any) -> Any:
    directory = Path(tmp_path_factory.mktemp("regdap"))
    make_files(directory)
    with Upstream(directory) as upstream:
        yield upstream


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def node() -> Any:
    security = SecurityConfig(allow_private=True)
    base = config_module.parse("components: {fetcher: {}, controller: {}}\n", "/tmp/dx.yaml", environ={})
    fetcher_config = dataclasses.replace(base.components["fetcher"], options=FetcherOptions(timeout=5.0))
    config = dataclasses.replace(base, components=dict(base.components, fetcher=fetcher_config), security=security)
    bus = magnet.connect(f"memory://registration-{uuid.uuid4().hex}", reactor, rpc_timeout=20, send_timeout=10,
                         shutdown_timeout=2, stream_idle_timeout=30)
    fetcher = Fetcher.from_config("fetcher", bus, config, node="n")
    controller = Controller("controller", bus, node="n", security=security)
    store = FakeStore()

    @defer.inlineCallbacks
    def start() -> Any:
        bus.startService()
        yield bus.when_connected()
        yield declare_topology(bus)
        yield bus.serve("attribute_store", store)
        yield fetcher.start()
        yield controller.start()

    pytest_twisted.blockon(start())
    yield bus, store
    for service in (controller, fetcher, bus):
        pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


async def refusal(bus: Any, **kwargs: Any) -> RemoteError:
    try:
        await bus.call("controller", "register", **kwargs)
    except RemoteError as e:
        return e
    raise AssertionError(f"register {kwargs} was accepted")


@pytest_twisted.ensureDeferred
async def test_unreachable_and_404_refused_with_their_reason_a_dap_url_accepted(node: Any, dap: Any) -> None:
    bus, store = node
    unreachable = f"http://127.0.0.1:{closed_port()}/opendap/sst.nc"
    e = await refusal(bus, name="gone", url=unreachable)
    assert e.remote_type in ("UpstreamError", "UpstreamTimeout"), e
    assert unreachable + ".dds" in e.message and "refused" in e.message.lower(), e.message
    missing = dap.url("nosuch.nc")
    e = await refusal(bus, name="missing", url=missing)
    assert e.remote_type == "UpstreamError", e
    assert "404" in e.message and missing + ".dds" in e.message, e.message
    assert not [k for k in store.values if k.startswith("dataset:")]

    record = await bus.call("controller", "register", name="sst", url=dap.url("sst.nc"))
    assert (record["name"], record["url"], record["status"]) == ("sst", dap.url("sst.nc"), "registered")
    assert store.values["dataset:sst"]["url"] == dap.url("sst.nc")
    # the same name elsewhere needs replace, and says what it replaced
    e = await refusal(bus, name="sst", url=dap.url("series.nc"))
    assert e.remote_type == "ValueError" and "replace" in e.message
    moved = await bus.call("controller", "register", name="sst", url=dap.url("series.nc"), replace=True)
    assert moved["replaced"] == dap.url("sst.nc")
    # --no-check: the unreachable one is taken as it is
    taken = await bus.call("controller", "register", name="gone", url=unreachable, check=False)
    assert taken["status"] == "registered"
