"""csv against a real pydap upstream (tests/ooidx/dap_upstream.py), through
proxyng, with a stand-in controller that fetches with treq and streams the
answer as docs/data-path.md says; checked against netCDF4 reading the file.

pydap 3.5.9's server answers constrained reads of coordinate variables and
unconstrained reads of 1-D and 2-D variables correctly: those are what is
asked for here."""
from __future__ import annotations

import csv
import io
import sys
import uuid
from pathlib import Path
from typing import Any, List, Optional

import netCDF4
import numpy as np
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool

import magnet
from magnet import operation

from ooidx.node.bootstrap import declare_topology
from ooidx.datapath.csv import CSV, decode_dods, to_rows
from ooidx.errors import UnknownDataset
from ooidx.datapath.proxy import Proxy

sys.path.insert(0, str(Path(__file__).parent))
from dap_upstream import Upstream, make_files  # noqa: E402

from tests.support.doubles import FakeStore  # noqa: E402


class StandInController:
    """route (by URL, as csv asks): fetch with treq, stream the answer to the address."""

    def __init__(self, bus: magnet.Bus) -> None:
        self.bus = bus
        self.urls: List[str] = []

    @operation
    def route(self, url: Optional[str] = None, dataset: Optional[str] = None, suffix: str = "",
              query: Optional[str] = None, method: str = "GET", *, address: str,
              request_id: Optional[str] = None) -> Any:
        assert url is not None and dataset is None, "csv routes by URL"
        self.urls.append(url)
        if "nosuch" in url:
            raise UnknownDataset("no dataset nosuch")
        self._fetch(url, method, address, request_id)
        return {"via": "fetcher"}

    @defer.inlineCallbacks
    def _fetch(self, url: str, method: str, address: str, request_id: str) -> Any:
        response = yield treq.request(method, url.encode("ascii"), unbuffered=True)
        headers = [[k.decode(), v.decode()] for k, vs in response.headers.getAllRawHeaders() for v in vs
                   if k.lower() not in (b"transfer-encoding", b"connection")]
        writer = self.bus.open_stream(address, {"status": response.code, "reason": response.phrase.decode(),
                                                "headers": headers, "url": url, "source": "fetcher",
                                                "length": response.length if isinstance(response.length, int)
                                                else None}, correlation_id=request_id)
        try:
            yield treq.collect(response, writer.write)
        except Exception as e:
            writer.abort(e)
            return
        yield writer.finish()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Any:
    directory = tmp_path_factory.mktemp("dap")
    files = make_files(directory)
    with Upstream(directory) as up:
        up.files = files
        yield up


class Stack:
    def __init__(self, upstream: Upstream) -> None:
        self.bus = magnet.connect(f"memory://csv-{uuid.uuid4().hex}", reactor, rpc_timeout=10)
        self.controller = StandInController(self.bus)
        self.store = FakeStore()
        self.store.data.update({f"dataset:{name}": {"name": name, "url": upstream.url(f"{name}.nc"),
                                                    "status": "registered"} for name in ("sst", "series")})
        self.store.data["dataset:broken"] = {"name": "broken", "url": upstream.url("broken/sst.nc"),
                                                "status": "registered"}
        self.csv = CSV("csv", self.bus, node="n", answer_timeout=10)
        self.proxy = Proxy("proxyng", self.bus, node="n", port=0, interface="127.0.0.1", answer_timeout=10)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.bus.serve("controller", self.controller)
        yield self.bus.serve("attribute_store", self.store)
        yield self.csv.start()
        yield self.proxy.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.proxy.stopService()
        yield self.csv.stopService()
        yield self.bus.stopService()

    @defer.inlineCallbacks
    def get(self, path: str, method: str = "GET") -> Any:
        response = yield treq.request(method, f"http://127.0.0.1:{self.proxy.port}{path}".encode(), pool=self.pool)
        body = yield response.content()
        return response.code, response.headers, body


@pytest_twisted.async_yield_fixture
async def stack(upstream: Upstream) -> Any:
    s = Stack(upstream)
    await s.start()
    yield s
    await s.stop()


def parse(body: bytes) -> List[List[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"))))


@pytest_twisted.ensureDeferred
async def test_coordinate_variable_constrained(stack: Stack, upstream: Upstream) -> None:
    code, headers, body = await stack.get("/datasets/sst.csv?time[1:1:3]")
    assert code == 200, body
    assert headers.getRawHeaders("Content-Type") == ["text/csv; charset=utf-8"]
    rows = parse(body)
    assert rows[0] == ["time"]
    with netCDF4.Dataset(upstream.files["sst"]) as ds:
        expected = ds["time"][1:4]
    assert [float(r[0]) for r in rows[1:]] == list(expected)
    assert stack.controller.urls[-1] == upstream.url("sst.nc.dods?time%5B1:1:3%5D")  # as treq sent it


@pytest_twisted.ensureDeferred
async def test_two_dimensional_variable_with_its_coordinates(stack: Stack, upstream: Upstream) -> None:
    code, _, body = await stack.get("/datasets/sst.csv?sst,time,lat")
    assert code == 200, body
    rows = parse(body)
    assert rows[0] == ["sst", "time", "lat"]
    with netCDF4.Dataset(upstream.files["sst"]) as ds:
        sst, time, lat = ds["sst"][:], ds["time"][:], ds["lat"][:]
    expected = [(np.float32(sst[i, j]), time[i], np.float32(lat[j]))
                for i in range(len(time)) for j in range(len(lat))]
    got = [(np.float32(r[0]), float(r[1]), np.float32(r[2])) for r in rows[1:]]
    assert got == expected


@pytest_twisted.ensureDeferred
async def test_whole_dataset_of_1d_variables(stack: Stack, upstream: Upstream) -> None:
    code, _, body = await stack.get("/datasets/series.csv")
    assert code == 200, body
    rows = parse(body)
    assert sorted(rows[0]) == ["depth", "time"]  # in the upstream's DDS order
    t, d = rows[0].index("time"), rows[0].index("depth")
    with netCDF4.Dataset(upstream.files["series"]) as ds:
        assert [int(r[d]) for r in rows[1:]] == list(ds["depth"][:])
        assert [float(r[t]) for r in rows[1:]] == list(ds["time"][:])


@pytest_twisted.ensureDeferred
async def test_variables_without_shared_dimensions_are_400(stack: Stack) -> None:
    code, headers, body = await stack.get("/datasets/sst.csv?time,lat")
    assert code == 400, body
    assert headers.getRawHeaders("X-Ooidx-Error") == ["InvalidURL"]


@pytest_twisted.ensureDeferred
async def test_errors_reach_the_client(stack: Stack) -> None:
    code, headers, body = await stack.get("/datasets/nosuch.csv")
    assert code == 404  # unknown to the attribute store
    stack.store.data["dataset:nosuch"] = {"name": "nosuch", "url": "http://127.0.0.1:1/nosuch",
                                             "status": "registered"}
    code, headers, body = await stack.get("/datasets/nosuch.csv")
    assert code == 404 and headers.getRawHeaders("X-Ooidx-Error") == ["UnknownDataset"]
    code, headers, body = await stack.get("/datasets/sst.csv?nonexistent")
    assert code == 502, body  # the upstream refuses the constraint
    code, headers, body = await stack.get("/datasets/broken.csv")
    assert code == 502, body  # the .dods broke mid-body: no CSV of half a dataset


def test_decoder_matches_netcdf4(upstream: Upstream) -> None:
    import urllib.request
    with urllib.request.urlopen(upstream.url("sst.nc.dods?sst"), timeout=10) as r:
        dods = io.BytesIO(r.read())
    dataset, data = decode_dods(dods)
    header, blocks, total = to_rows(dataset, data)
    assert header == ["sst"] and total == 20
    with netCDF4.Dataset(upstream.files["sst"]) as ds:
        assert np.array_equal(np.asarray(data[0]), ds["sst"][:])


@pytest_twisted.ensureDeferred
async def test_formula_cells_are_escaped_through_the_csv_component(stack: Stack) -> None:
    """An upstream whose text cells start with = + - @ (tests/fast/datapath/dods_bytes.py):
    through proxyng and the csv component, each goes out with a ' in front, negative
    numbers stay bare; formula_escape off (components.csv.formula_escape: false) sends them raw."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    from tests.fast.datapath.dods_bytes import ALL_CELLS, HOSTILE_CELLS, PLAIN_CELLS, SPLIT_CELLS, VALUES, dods, \
        formula_fields

    root = Resource()
    root.putChild(b"cells.nc.dods", Data(dods(), "application/octet-stream"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        stack.store.data["dataset:cells"] = {"name": "cells", "url": f"http://127.0.0.1:{port.getHost().port}/cells.nc",
                                                "status": "registered"}
        assert stack.csv.formula_escape is True  # the default
        code, _, body = await stack.get("/datasets/cells.csv")
        assert code == 200, body
        rows = parse(body)
        assert rows[0] == ["label", "value"]
        assert [r[0] for r in rows[1:]] == ["'" + c for c in HOSTILE_CELLS] + list(SPLIT_CELLS) + list(PLAIN_CELLS)
        assert [float(r[1]) for r in rows[1:]] == list(VALUES)
        assert formula_fields(body.decode("utf-8")) == []
        stack.csv.formula_escape = False
        code, _, body = await stack.get("/datasets/cells.csv")
        assert code == 200, body
        assert [r[0] for r in parse(body)[1:]] == list(ALL_CELLS)
    finally:
        await port.stopListening()
