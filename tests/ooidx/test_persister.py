"""The persister against a real DAP upstream: pydap's server (a subprocess on
a loopback port, tests/ooidx/dap_upstream.py) serving netCDF files this test
writes with netCDF4, fetched by the real fetcher, routed by the real pub_sub.

The mirror is the upstream's dataset: every variable and attribute of the
saved version, types included (Float32 valid_range, Int16 flag_values, a
global Int32 version, UInt16, UInt32, Byte), equals the upstream file read
with netCDF4. The rig here (L{Exchange}) is also the one of
tests/ooidx/test_versions.py (the versions API on a real web port)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet

from ooidx import events
from ooidx.attribute_store import AttributeStore
from ooidx.config import parse
from ooidx.datapath.controller import Controller
from ooidx.datapath.fetcher import Fetcher
from ooidx.dissemination.notification import Notification
from ooidx.dissemination.persister import Persister
from ooidx.dissemination.pub_sub import PubSub
from ooidx.node.bootstrap import declare_topology
from ooidx.web.app import Web

from tests.fast.dissemination.pydap_answers import described, make_typed
from tests.ooidx.dap_upstream import Upstream
from tests.ooidx.waiting import eventually

TOKEN = "versions-test-" + "t" * 24


@pytest.fixture
def upstream(tmp_path: Path) -> Any:
    """pydap's server over a directory of this test's own (its files change between refreshes)."""
    directory = tmp_path / "upstream"
    directory.mkdir()
    make_typed(directory / "typed.nc", times=3)
    with Upstream(directory) as up:
        up.directory = directory
        yield up


def publish(upstream: Upstream, **options: Any) -> Path:
    """Write the upstream's typed.nc anew (make_typed's options), replacing the
    file at once so that the server never reads half of it."""
    staging = upstream.directory.parent / f"staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    made = make_typed(staging / "typed.nc", **options)
    os.replace(made, upstream.directory / "typed.nc")
    shutil.rmtree(staging)
    return upstream.directory / "typed.nc"


class Exchange:
    """The real components that register, fetch, route and save a dataset and
    answer for its versions, on one memory:// bus in this process, with the
    web port listening on a loopback port."""

    def __init__(self, tmp: Path, upstream: Upstream, *, read_token: Optional[bool] = None) -> None:
        security = f"security: {{allow_hosts: ['127.0.0.1:{upstream.port}']"
        security += f", read_token: {'true' if read_token else 'false'}}}\n" if read_token is not None else "}\n"
        self.config = parse("node: a\ncomponents: {fetcher: {timeout: 10}, controller: {}}\n" + security,
                            str(tmp / "dx.yaml"))
        self.bus = magnet.connect(f"memory://versions-{uuid.uuid4().hex}", reactor, node="a", rpc_timeout=10,
                                  send_timeout=10, shutdown_timeout=2)
        bus = self.bus
        self.data_dir = tmp / "data"
        self.persister = Persister("persister", bus, node="a", data_dir=str(self.data_dir))
        self.web = Web.from_config("web", bus, self.config, node="a", port=0, interface="127.0.0.1", token=TOKEN)
        self.components = [
            AttributeStore("attribute_store", bus, node="a", url=str(tmp / "attributes.sqlite3"), clock=reactor),
            PubSub("pub_sub", bus, node="a"),
            Notification("notification", bus, node="a"),
            Controller.from_config("controller", bus, self.config, node="a"),
            Fetcher.from_config("fetcher", bus, self.config, node="a"),
            self.persister,
            self.web,
        ]
        self.saved: List[Dict[str, Any]] = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield self.bus.when_connected(10)
        yield declare_topology(self.bus)
        for component in self.components:
            yield component.start()
        yield self.persister.ready
        self.tail = yield events.subscribe(self.bus, r"^event\.saved\.", self.saved.append)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.tail.cancel()
        for component in reversed(self.components):
            yield component.stopService()
        yield self.bus.stopService()

    @defer.inlineCallbacks
    def refresh(self, name: str = "typed") -> Any:
        """Ask for the dataset; fires with its next saved event."""
        count = len(self.saved)
        yield self.bus.call("controller", "get_dataset", name=name)
        yield eventually(lambda: len(self.saved) > count, 30)
        return self.saved[count]

    @defer.inlineCallbacks
    def get(self, path: str, token: Optional[str] = None) -> Any:
        """(status, JSON body) of a GET on the web port."""
        import json

        import treq
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = yield treq.get(self.web.url + path, headers=headers, persistent=False, timeout=20)
        content = yield response.content()
        return response.code, json.loads(content)


async def exchange_for(tmp: Path, upstream: Upstream, **options: Any) -> Exchange:
    ex = Exchange(tmp, upstream, **options)
    await ex.start()
    await ex.bus.call("controller", "register", name="typed", url=upstream.url("typed.nc"))
    return ex


@pytest_twisted.ensureDeferred
async def test_the_saved_version_is_the_upstream_file_types_included(tmp_path: Path, upstream: Upstream) -> None:
    ex = await exchange_for(tmp_path, upstream)
    try:
        source = publish(upstream, times=4, extra=True)
        saved = await ex.refresh()
        assert saved["netcdf"] is True
        got, want = described(ex.data_dir / saved["path"] / "typed.nc"), described(source)
        # what pydap's JSON-less parse of the DAS made of them before (64-bit everything)
        assert got[""]["version"] == ("<i4", [3]) and got[""]["count16"] == ("<u2", [7])
        assert got["temp"]["attributes"]["valid_range"] == ("<f4", [-5.0, 40.0])
        assert got["temp"]["attributes"]["accuracy"] == ("<f4", want["temp"]["attributes"]["accuracy"][1])
        assert got["qc"]["attributes"]["flag_values"] == ("<i2", [0, 1, 4])
        assert got["qc"]["attributes"]["_FillValue"] == ("<i2", [-1])
        assert got["level"]["attributes"]["valid_max"] == ("|u1", [200])
        assert got == want
    finally:
        await ex.stop()
