"""Datasets through the exchange, end to end, with real clients.

A real DAP upstream (pydap's server serving netCDF files the tests make,
tests/ooidx/dap_upstream.py) on loopback; the exchange as `twistd -n ooidx`
processes; clients: ncdump (netCDF-C, with .dodsrc HTTP.PROXY.SERVER and
by name), pydap's client, curl (HEAD, keep-alive, failed transfers),
urllib as a forward-proxy client, and `ooidx get`.

- one node on memory:// with every data-path component (attribute_store,
  controller, fetcher, cache, proxyng, csv, web);
- two nodes on RabbitMQ (a virtual host of the test's own): node A runs
  proxyng, controller, attribute_store and web; node B runs two fetchers,
  cache and csv; requests to A are served by B's fetchers.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import netCDF4
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dap_upstream import Upstream, make_files  # noqa: E402
from twistd_helpers import ROOT, Daemon, direct_environment, environment, free_port, write_config  # noqa: E402

from tests.support.node import api_call, http_get  # noqa: E402

TOKEN = "e2e-token-" + uuid.uuid4().hex
NCDUMP = shutil.which("ncdump") or "/usr/bin/ncdump"
CURL = shutil.which("curl") or "/usr/bin/curl"


# --------------------------------------------------------------------------- #
# helpers


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ooidx.cli", *args], capture_output=True, timeout=timeout,
                          cwd=ROOT, env=direct_environment())


def run(args: List[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, timeout=timeout, env=direct_environment(**env))


def stats(web: str) -> Dict[str, Any]:
    return api_call(web, TOKEN, "controller", "get_stats")


class Exchange:
    """Running nodes and where to reach them."""

    def __init__(self, proxy: str, web: str, daemons: List[Daemon]) -> None:
        self.proxy = proxy
        self.web = web
        self.daemons = daemons

    def describe(self) -> str:
        return "\n".join(d.describe() for d in self.daemons)

    def logs(self) -> str:
        return "".join(d.log() for d in self.daemons)


def start(tmp: Path, name: str, components: Dict[str, Any], broker: str = "memory://",
          **settings: Any) -> Daemon:
    settings.setdefault("timeouts", {"shutdown": 3, "rpc": 10})
    settings.setdefault("security", {"token": TOKEN, "allow_private": True, "allow_hosts": ["127.0.0.1"]})
    env = None
    if broker.startswith("amqp"):
        env = environment(OOIDX_BROKER=broker)
        broker = "amqp://guest@127.0.0.1:5672/"
    config = write_config(tmp / f"{name}.yaml", node=name, broker=broker, components=components, **settings)
    return Daemon(config, env=env)


def register(ex: Exchange, name: str, url: str, *options: str) -> None:
    done = cli("--url", ex.web, "--token", TOKEN, "datasets", "register", name, url, *options)
    assert done.returncode == 0, (done.stdout, done.stderr)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Any:
    directory = tmp_path_factory.mktemp("dap-data")
    files = make_files(directory)
    with Upstream(directory) as up:
        up.files = files
        yield up


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: Any, upstream: Upstream) -> Any:
    tmp = tmp_path_factory.mktemp("exchange")
    proxy_port, web_port = free_port(), free_port()
    d = start(tmp, "dx", {"attribute_store": {"url": "attributes.sqlite3"}, "controller": None,
                          "fetcher": {"instances": 2, "timeout": 10}, "cache": None, "proxyng": None,
                          "csv": None, "web": None},
              http={"proxy_port": proxy_port, "web_port": web_port})
    try:
        d.wait_log("node dx started", 60)
        ex = Exchange(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{web_port}", [d])
        register(ex, "sst", upstream.url("sst.nc"))
        register(ex, "series", upstream.url("series.nc"))
        register(ex, "broken", upstream.url("broken/sst.nc"), "--no-check")  # it breaks off: the check would refuse it
        register(ex, "brokenlong", upstream.url("broken/long.nc"), "--no-check")
        yield ex
    finally:
        d.terminate()
        try:
            d.wait_exit(20)
        finally:
            d.kill()


# --------------------------------------------------------------------------- #
# bytes through the exchange equal bytes from the upstream

PARTS = ["sst.nc.das", "sst.nc.dds", "sst.nc.dods", "sst.nc.dds?time", "sst.nc.dods?time",
         "sst.nc.dods?time[1:1:3]", "sst.nc.dods?lat[0:2:3]", "sst.nc.dods?sst", "series.nc.dods",
         "series.nc.dods?depth", "sst.nc.das?sst", "sst.nc.dods?time,lat"]


@pytest.mark.parametrize("part", PARTS)
def test_forward_proxy_bytes_equal_direct(exchange: Exchange, upstream: Upstream, part: str) -> None:
    direct = http_get(upstream.url(part))
    assert direct[0] == 200, direct
    for _ in range(2):  # a miss, then (for GET 200) a cache hit
        through = http_get(upstream.url(part), proxy=exchange.proxy)
        assert through[0] == 200, (through, exchange.describe())
        assert through[2] == direct[2]


@pytest.mark.parametrize("part", PARTS)
def test_by_name_bytes_equal_direct(exchange: Exchange, upstream: Upstream, part: str) -> None:
    name_part = part.replace(".nc", "", 1)  # sst.nc.das -> sst.das
    direct = http_get(upstream.url(part))
    through = http_get(f"{exchange.proxy}/datasets/{name_part}")
    assert through[0] == 200, through
    assert through[2] == direct[2]
    assert through[1].get("Content-Type") == direct[1].get("Content-Type")


def test_second_request_is_a_cache_hit(exchange: Exchange, upstream: Upstream) -> None:
    url = f"{exchange.proxy}/datasets/sst.dods?time[0:1:2]"
    before = stats(exchange.web)
    first = http_get(url)
    # the cache keeps the body once its own stream has ended, just after the client's
    deadline = time.monotonic() + 10
    while True:
        second = http_get(url)
        if second[1].get("X-Ooidx-Source") == "cache" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    after = stats(exchange.web)
    assert first[2] == second[2] == http_get(upstream.url("sst.nc.dods?time[0:1:2]"))[2]
    assert first[1].get("X-Ooidx-Source") == "fetcher"
    assert second[1].get("X-Ooidx-Source") == "cache"
    assert after["hits"] >= before["hits"] + 1, (before, after)
    assert after["datasets"]["sst"]["hits"] >= before.get("datasets", {}).get("sst", {}).get("hits", 0) + 1


# --------------------------------------------------------------------------- #
# ncdump (netCDF-C)


def dodsrc_home(tmp_path: Path, proxy: str) -> str:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".dodsrc").write_text(f"HTTP.PROXY.SERVER={proxy}\n")
    return str(home)


def test_ncdump_header_and_coordinate_through_dodsrc_proxy(exchange: Exchange, upstream: Upstream,
                                                           tmp_path: Path) -> None:
    home = dodsrc_home(tmp_path, exchange.proxy)
    plain_home = tmp_path / "plain"
    plain_home.mkdir()
    before = stats(exchange.web)["requests"]
    for args in (["-h"], ["-v", "time"], ["-v", "lat"]):
        direct = run([NCDUMP, *args, upstream.url("sst.nc")], HOME=str(plain_home))
        through = run([NCDUMP, *args, upstream.url("sst.nc")], HOME=home)
        assert direct.returncode == 0, direct.stderr
        assert through.returncode == 0, (through.stderr, exchange.describe())
        assert through.stdout == direct.stdout
    assert b"time = 0, 1.5, 3, 4.5, 6 ;" in through.stdout or b"lat = -30, -10, 10, 30 ;" in through.stdout
    assert stats(exchange.web)["requests"] > before, "ncdump did not go through the proxy"


def test_ncdump_by_name(exchange: Exchange, upstream: Upstream, tmp_path: Path) -> None:
    direct = run([NCDUMP, "-v", "time", upstream.url("sst.nc")], HOME=str(tmp_path))
    through = run([NCDUMP, "-v", "time", f"{exchange.proxy}/datasets/sst"], HOME=str(tmp_path))
    assert through.returncode == 0, through.stderr
    # the dataset's name in the first line follows the URL's last path part
    assert through.stdout.split(b"\n", 1)[1] == direct.stdout.split(b"\n", 1)[1]
    with netCDF4.Dataset(upstream.files["sst"]) as ds:
        expected = ", ".join(f"{v:g}" for v in ds["time"][:])
    assert f"time = {expected} ;".encode() in through.stdout


# --------------------------------------------------------------------------- #
# pydap's client


def test_pydap_client_by_name(exchange: Exchange, upstream: Upstream) -> None:
    from pydap.client import open_url
    ds = open_url(f"{exchange.proxy}/datasets/sst", protocol="dap2")
    assert set(ds.keys()) == {"sst", "time", "lat"}
    assert ds["sst"].attributes["units"] == "degC"
    with netCDF4.Dataset(upstream.files["sst"]) as nc:
        assert np.array_equal(np.asarray(ds["time"][:].data), nc["time"][:])
        assert np.array_equal(np.asarray(ds["lat"][1:3].data), nc["lat"][1:3])
        assert np.array_equal(np.asarray(ds["time"][0:4:2].data), nc["time"][0:4:2])


# --------------------------------------------------------------------------- #
# curl: HEAD, keep-alive, failed transfers


def test_curl_head(exchange: Exchange, upstream: Upstream) -> None:
    done = run([CURL, "-sS", "-I", f"{exchange.proxy}/datasets/sst.dods?time"])
    assert done.returncode == 0, done.stderr
    head = done.stdout.decode()
    assert head.startswith("HTTP/1.1 200"), head
    direct = run([CURL, "-sS", "-I", upstream.url("sst.nc.dods?time")]).stdout.decode()
    length = [line for line in direct.splitlines() if line.lower().startswith("content-length")]
    assert length and length[0] in head.splitlines(), (head, direct)
    # HEAD as a forward proxy
    done = run([CURL, "-sS", "-I", "--proxy", exchange.proxy, upstream.url("sst.nc.das")])
    assert done.stdout.startswith(b"HTTP/1.1 200"), done.stdout


def test_curl_keep_alive(exchange: Exchange) -> None:
    done = run([CURL, "-sS", "-v", "-o", "/dev/null", "-o", "/dev/null",
                f"{exchange.proxy}/datasets/sst.dds", f"{exchange.proxy}/datasets/sst.das"])
    assert done.returncode == 0, done.stderr
    assert b"Re-using existing connection" in done.stderr or b"Reusing existing connection" in done.stderr, \
        done.stderr.decode()
    # and as a forward proxy, two upstream URLs over one connection to the proxy
    done = run([CURL, "-sS", "-v", "--proxy", exchange.proxy, "-o", "/dev/null", "-o", "/dev/null",
                "http://127.0.0.1:1/unregistered.dds", "http://127.0.0.1:1/unregistered.das"])
    assert b"Re-using existing connection" in done.stderr or b"Reusing existing connection" in done.stderr


def test_upstream_failing_mid_body_is_a_failed_transfer_and_not_cached(exchange: Exchange) -> None:
    url = f"{exchange.proxy}/datasets/brokenlong.dods"
    before = stats(exchange.web)
    for _ in range(2):
        done = run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url])
        assert done.returncode in (18, 56), (done.returncode, done.stdout, done.stderr)  # partial / recv error
        code, size = done.stdout.split()
        assert code == b"200" and int(size) > 0  # it failed after the first bytes
    # a body that breaks before its first chunk went out is a plain 502
    done = run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{exchange.proxy}/datasets/broken.dds"])
    assert done.returncode == 0 and done.stdout == b"502"
    after = stats(exchange.web)
    for name in ("broken", "brokenlong"):
        assert after.get("datasets", {}).get(name, {}).get("hits", 0) == \
            before.get("datasets", {}).get(name, {}).get("hits", 0), f"a truncated {name} was served from the cache"


def test_errors(exchange: Exchange, upstream: Upstream) -> None:
    code, headers, body = http_get(f"{exchange.proxy}/datasets/nosuch.dds")
    assert code == 404 and headers.get("X-Ooidx-Error") == "UnknownDataset"
    code, headers, body = http_get("http://example.invalid/x.dds", proxy=exchange.proxy)
    assert code == 403, body  # not under a registered base URL
    code, headers, body = http_get(f"{exchange.proxy}/datasets/..%2Fetc.dds")
    assert code == 400
    code, _, _ = http_get(f"{exchange.proxy}/datasets/sst.dds", method="POST")
    assert code == 405


# --------------------------------------------------------------------------- #
# csv


def test_csv_through_the_real_path(exchange: Exchange, upstream: Upstream) -> None:
    code, headers, body = http_get(f"{exchange.proxy}/datasets/sst.csv?time")
    assert code == 200, body
    assert headers.get("Content-Type") == "text/csv; charset=utf-8"
    lines = body.decode().split("\r\n")
    with netCDF4.Dataset(upstream.files["sst"]) as nc:
        assert lines[0] == "time" and [float(x) for x in lines[1:-1]] == list(nc["time"][:])
    code, headers, body = http_get(f"{exchange.proxy}/datasets/sst.csv?sst,time,lat")
    assert code == 200 and body.decode().split("\r\n")[0] == "sst,time,lat"
    assert len(body.decode().split("\r\n")) == 20 + 2


# --------------------------------------------------------------------------- #
# ooidx get


def test_ooidx_get(exchange: Exchange, upstream: Upstream, tmp_path: Path) -> None:
    out = tmp_path / "sst.dods"
    done = cli("get", "--proxy", exchange.proxy, "--progress", upstream.url("sst.nc.dods"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == http_get(upstream.url("sst.nc.dods"))[2]
    assert b"100%" in done.stderr and b"[" in done.stderr  # the bar (Content-Length known)
    out2 = tmp_path / "time.dods"
    done = cli("get", "--proxy", exchange.proxy, "/datasets/sst.dods?time", "-o", str(out2))
    assert done.returncode == 0, done.stderr
    assert b"[" not in done.stderr  # no bar: stderr is not a terminal
    assert out2.read_bytes() == http_get(upstream.url("sst.nc.dods?time"))[2]
    # a failed transfer: non-zero, and no file (nor temporary file) left
    bad = tmp_path / "broken.dods"
    done = cli("get", "--proxy", exchange.proxy, "/datasets/brokenlong.dods", "-o", str(bad))
    assert done.returncode != 0 and b"transfer failed" in done.stderr, done.stderr
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".broken")]
    done = cli("get", "--proxy", exchange.proxy, "/datasets/broken.dds", "-o", str(bad))
    assert done.returncode == 1 and b"UpstreamError" in done.stderr, done.stderr
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".broken")]
    done = cli("get", "--proxy", exchange.proxy, "/datasets/nosuch.dds", "-o", str(bad))
    assert done.returncode == 1 and b"UnknownDataset" in done.stderr and not bad.exists()


# --------------------------------------------------------------------------- #
# two daemons on RabbitMQ


@pytest.mark.rabbitmq
def test_two_nodes_on_rabbitmq(isolated_broker: str, upstream: Upstream, tmp_path: Path) -> None:
    proxy_port, web_port = free_port(), free_port()
    a = start(tmp_path, "node-a", {"proxyng": None, "controller": None,
                                   "attribute_store": {"url": "attributes.sqlite3"}, "web": None},
              broker=isolated_broker, http={"proxy_port": proxy_port, "web_port": web_port})
    b = start(tmp_path, "node-b", {"fetcher": {"instances": 2, "timeout": 10}, "cache": None, "csv": None},
              broker=isolated_broker)
    try:
        a.wait_log("node node-a started", 90)
        b.wait_log("node node-b started", 90)
        ex = Exchange(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{web_port}", [a, b])
        register(ex, "sst", upstream.url("sst.nc"))
        direct = http_get(upstream.url("sst.nc.dods?time"))[2]
        first = http_get(f"{ex.proxy}/datasets/sst.dods?time")
        assert first[0] == 200 and first[2] == direct, ex.describe()
        # The cache keeps its copy once the body has reached it, which may be a
        # moment after the client had its bytes (a request in that moment goes
        # upstream again: one fetch per miss is issue "multicast"'s); within a
        # few seconds the answer comes from the cache.
        deadline = time.monotonic() + 15
        while True:
            second = http_get(f"{ex.proxy}/datasets/sst.dods?time")
            assert second[2] == direct, ex.describe()
            if second[1].get("X-Ooidx-Source") == "cache" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert second[1].get("X-Ooidx-Source") == "cache", ex.describe()
        home = dodsrc_home(tmp_path, ex.proxy)
        plain = run([NCDUMP, "-h", upstream.url("sst.nc")], HOME=str(tmp_path))
        through = run([NCDUMP, "-h", upstream.url("sst.nc")], HOME=home)
        assert through.returncode == 0 and through.stdout == plain.stdout, through.stderr
        done = run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{ex.proxy}/datasets/sst.csv?time"])
        assert done.stdout == b"200", (done.stdout, done.stderr)
        # the work was done on node B: its fetchers fetched
        assert "fetcher" in b.log() and upstream.url("sst.nc") in b.log(), b.describe()
        assert stats(ex.web)["hits"] >= 1
    finally:
        for d in (a, b):
            d.terminate()
        for d in (a, b):
            try:
                d.wait_exit(20)
            except AssertionError:
                pass
            d.kill()


from test_multinode import isolated_broker  # noqa: E402,F401  - the fixture: a vhost of this test's own
