"""The conventions of the DAP world, through a real daemon (issue 18).

- the THREDDS catalog (/thredds/catalog.xml on the web port) read by
  Unidata's siphon (TDSCatalog): it lists a registered pydap dataset, and
  its OPENDAP access URL (the proxy's /datasets/NAME) opens with netCDF4
  and ncdump;
- DAP 4 requests (.dmr, .dmr.xml, .dap) pass through the proxy, by name
  and as a forward proxy, byte for byte. pydap's server answers .dmr but
  not .dap (500), so the DAP 4 upstream is a small loopback HTTP server
  (in this process) that answers the DAP 2 parts with pydap's own bytes for
  the same file and fixed DAP 4 bytes: it only has to be an upstream that
  speaks DAP 4; the exchange is what is tested.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Tuple

import netCDF4
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dap_upstream import Upstream, make_files  # noqa: E402
from test_dap_e2e import Exchange, register, start, stats  # noqa: E402
from twistd_helpers import direct_environment, free_port  # noqa: E402

from tests.support.node import http_get  # noqa: E402

siphon_catalog = pytest.importorskip("siphon.catalog")
NCDUMP = shutil.which("ncdump") or "/usr/bin/ncdump"

DAP4_DATA = b"\x00\x01\x02chunked DAP4 data\xff" * 50  # not parsed by anyone: it is passed on as it is


class Dap4Upstream:
    """path -> (content type, body), served on 127.0.0.1 by a thread; 404 otherwise."""

    def __init__(self, answers: Dict[str, Tuple[str, bytes]]) -> None:
        self.answers = answers
        answers_ = answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                found = answers_.get(self.path)
                if found is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", found[0])
                self.send_header("Content-Length", str(len(found[1])))
                self.end_headers()
                self.wfile.write(found[1])

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Any:
    directory = tmp_path_factory.mktemp("dap-data")
    make_files(directory)
    with Upstream(directory) as up:
        yield up


@pytest.fixture(scope="module")
def dap4(upstream: Upstream) -> Any:
    answers: Dict[str, Tuple[str, bytes]] = {}
    for part in ("das", "dds", "dods", "dmr"):
        status, headers, body = http_get(upstream.url(f"sst.nc.{part}"))
        assert status == 200, (part, status, body[:200])
        answers[f"/d/ts.nc.{part}"] = (headers.get("Content-Type", "application/octet-stream"), body)
    answers["/d/ts.nc.dmr.xml"] = ("application/vnd.opendap.dap4.dataset-metadata+xml", answers["/d/ts.nc.dmr"][1])
    answers["/d/ts.nc.dap"] = ("application/vnd.opendap.dap4.data", DAP4_DATA)
    answers["/d/ts.nc.dap?dap4.ce=/time%5B0:1:2%5D"] = ("application/vnd.opendap.dap4.data", DAP4_DATA[:99])
    server = Dap4Upstream(answers)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: Any, upstream: Upstream, dap4: Dap4Upstream) -> Any:
    tmp = tmp_path_factory.mktemp("exchange")
    proxy_port, web_port = free_port(), free_port()
    d = start(tmp, "dx", {"attribute_store": {"url": "attributes.sqlite3"}, "controller": None,
                          "fetcher": {"timeout": 10}, "cache": None, "proxyng": None, "web": None},
              http={"proxy_port": proxy_port, "web_port": web_port})
    try:
        d.wait_log("node dx started", 60)
        ex = Exchange(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{web_port}", [d])
        register(ex, "sst", upstream.url("sst.nc"))
        register(ex, "ts", dap4.url("/d/ts.nc"))
        yield ex
    finally:
        d.terminate()
        try:
            d.wait_exit(20)
        finally:
            d.kill()


@pytest.fixture
def no_proxy_env(monkeypatch: Any) -> None:
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


# --------------------------------------------------------------------------- #
# the THREDDS catalog, read by siphon


def test_siphon_lists_the_datasets_and_their_opendap_urls(exchange: Exchange, no_proxy_env: None) -> None:
    cat = siphon_catalog.TDSCatalog(f"{exchange.web}/thredds/catalog.xml")
    assert {"sst", "ts"} <= set(cat.datasets), (list(cat.datasets), exchange.describe())
    assert cat.datasets["sst"].access_urls["OPENDAP"] == f"{exchange.proxy}/datasets/sst"


def test_the_catalog_s_opendap_url_opens_with_netcdf4_and_ncdump(exchange: Exchange, upstream: Upstream,
                                                                   no_proxy_env: None) -> None:
    cat = siphon_catalog.TDSCatalog(f"{exchange.web}/thredds/catalog.xml")
    url = cat.datasets["sst"].access_urls["OPENDAP"]
    with netCDF4.Dataset(url) as through, netCDF4.Dataset(upstream.url("sst.nc")) as direct:
        assert through.variables["sst"][:].tolist() == direct.variables["sst"][:].tolist()
        assert through.variables["sst"].units == "degC"
    done = subprocess.run([NCDUMP, "-h", url], capture_output=True, timeout=60, env=direct_environment(),
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert b"float sst(time, lat)" in done.stdout


# --------------------------------------------------------------------------- #
# DAP 4 through the proxy

DAP4_PARTS = ["ts.nc.dmr", "ts.nc.dmr.xml", "ts.nc.dap", "ts.nc.dap?dap4.ce=/time%5B0:1:2%5D"]


@pytest.mark.parametrize("part", DAP4_PARTS)
def test_dap4_by_name_bytes_equal_direct(exchange: Exchange, dap4: Dap4Upstream, part: str) -> None:
    direct = http_get(dap4.url("/d/" + part))
    assert direct[0] == 200, direct
    through = http_get(f"{exchange.proxy}/datasets/{part.replace('.nc', '', 1)}")
    assert through[0] == 200, (through, exchange.describe())
    assert through[2] == direct[2]


def requests_of(web: str, name: str) -> int:
    figures = stats(web).get("datasets", {}).get(name, {})
    return int(figures.get("hits", 0)) + int(figures.get("misses", 0))


@pytest.mark.parametrize("part", DAP4_PARTS)
def test_dap4_forward_bytes_equal_direct(exchange: Exchange, dap4: Dap4Upstream, part: str) -> None:
    """The original URL through the forward proxy: the upstream's bytes, and
    the request is the registered dataset's (its counters move: a URL the
    controller did not see under the dataset's base would be refused where
    its host is not in allow_hosts, as in the issue's 403)."""
    direct = http_get(dap4.url("/d/" + part))
    before = requests_of(exchange.web, "ts")
    through = http_get(dap4.url("/d/" + part), proxy=exchange.proxy)
    assert through[0] == 200, (through, exchange.describe())
    assert through[2] == direct[2]
    assert requests_of(exchange.web, "ts") == before + 1


def test_pydap_s_own_dmr_by_name(exchange: Exchange, upstream: Upstream) -> None:
    direct = http_get(upstream.url("sst.nc.dmr"))
    through = http_get(f"{exchange.proxy}/datasets/sst.dmr")
    assert (through[0], through[2]) == (200, direct[2]), through


def test_pydap_dap4_client_reads_the_metadata_by_name(exchange: Exchange, upstream: Upstream,
                                                      no_proxy_env: None) -> None:
    """pydap's client with protocol="dap4" (it reads NAME.dmr; pydap's server
    cannot answer .dap, so the data itself is not read here)."""
    from pydap.client import open_url
    direct = open_url(upstream.url("sst.nc"), protocol="dap4")
    through = open_url(f"{exchange.proxy}/datasets/sst", protocol="dap4")
    assert sorted(through.keys()) == sorted(direct.keys()) == ["lat", "sst", "time"]
    assert through["sst"].shape == direct["sst"].shape == (5, 4)
    assert through["sst"].attributes["units"] == "degC"
