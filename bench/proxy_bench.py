"""Group C{proxy}: the exchange's HTTP proxy against the upstream and a static server.

Set-up (once per run): a pydap upstream serving the test netCDF files
(tests/ooidx/dap_upstream.py), one `twistd -n ooidx` node on memory:// with
the data path (attribute_store, controller, fetcher, cache, proxyng, csv,
web), dataset C{sst} registered, and a twisted.web static server holding the
same C{.dds} bytes and a 1 GiB (sparse) file.

Sides:
  - C{proxy} (subject): through the exchange. The small request is
    C{/datasets/sst.dds} by name, a cache hit after the warm-up; the big one
    is the upstream's 1 GiB file asked as a forward proxy.
  - C{pydap}: the same requests straight to the upstream (pydap's server;
    for the big file the upstream's own generator endpoint).
  - C{static}: the same bytes as files served by twisted.web's C{File}:
    the limit for a Twisted HTTP server on this machine.

Rows:
  1. cached .dds, 10 connections: requests/s (wrk, keep-alive; another process)
  2. cached .dds, 50 connections
  3. 1 GiB stream: MB/s of one download (a client process reading and dropping).
     1 GiB is more than the node's cache (1 GiB with its metadata) can keep, so
     this is the path without the cache's copy (the fetcher's store_limit).
  4. 1 GiB stream, peak RSS: the server process's resident size during that
     download (for C{proxy} the whole node: proxy, fetcher and cache), in MB.
     The harness measures rates, so this row's load counts the running peak
     times elapsed time: its "rate" is the mean of the running peak over the
     measured window, i.e. the peak once it has settled.

Without wrk the request rows use a small Twisted keep-alive load client
(tests by hand only: it is slower than the servers it measures).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred

from bench.harness import BenchError, Benchmark, Group, Load, Settings, log

ROOT = Path(__file__).resolve().parents[1]
BIG = 1 << 30
TOKEN = "bench-token-" + uuid.uuid4().hex

WRK_SCRIPT = """
local n = 0
response = function(status, headers, body)
  if status ~= 200 then io.write("E " .. status .. "\\n"); io.flush() end
  n = n + 1
  if n == 50 then io.write("50\\n"); io.flush(); n = 0 end
end
"""

DOWNLOADER = r"""
import http.client, sys, urllib.parse
url, proxy = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
target = urllib.parse.urlsplit(proxy or url)
while True:
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
    conn.request("GET", url if proxy else urllib.parse.urlsplit(url).path)
    r = conn.getresponse()
    if r.status != 200:
        print("E", r.status, flush=True); sys.exit(1)
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        sys.stdout.write("%d\n" % len(chunk)); sys.stdout.flush()
    conn.close()
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Environment:
    """The upstream, the exchange node and the static server, started once."""

    _instance: Optional["Environment"] = None

    @classmethod
    def get(cls) -> "Environment":
        if cls._instance is None:
            cls._instance = cls()
            atexit.register(cls._instance.stop)
        return cls._instance

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT / "tests" / "ooidx"))
        from dap_upstream import Upstream, make_files
        from twistd_helpers import Daemon, environment, write_config

        self.tmp = Path(tempfile.mkdtemp(prefix="ooidx-proxy-bench-"))
        data = self.tmp / "data"
        make_files(data)
        self.upstream = Upstream(data)
        self.sst = self.upstream.url("sst.nc.dds")
        self.big_direct = self.upstream.url(f"big/{BIG}.bin")
        proxy_port, web_port = _free_port(), _free_port()
        config = write_config(self.tmp / "bench.yaml", node="bench", broker="memory://", components={
            "attribute_store": {"url": "attributes.sqlite3"}, "controller": None, "fetcher": {"instances": 2},
            "cache": None, "proxyng": None, "csv": None, "web": None},
            http={"proxy_port": proxy_port, "web_port": web_port},
            security={"token": TOKEN, "allow_private": True, "allow_hosts": ["127.0.0.1"]},
            logging={"level": "warn"})
        self.node = Daemon(config, env=environment())
        self.proxy = f"http://127.0.0.1:{proxy_port}"
        self.web = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 60
        while not self._healthy():
            if time.monotonic() > deadline or self.node.proc.poll() is not None:
                raise BenchError(f"the exchange did not start:\n{self.node.describe()}")
            time.sleep(0.2)
        self._call("controller", "register", name="sst", url=self.upstream.url("sst.nc"))
        self._call("controller", "register", name="bigfile", url=self.upstream.url(f"big/{BIG}"))
        self.dds = urllib.request.urlopen(self.sst, timeout=30).read()
        for _ in range(3):  # into the cache
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            opener.open(f"{self.proxy}/datasets/sst.dds", timeout=30).read()
        # the static server: the same .dds bytes, and a sparse 1 GiB file
        static = self.tmp / "static"
        static.mkdir()
        (static / "sst.dds").write_bytes(self.dds)
        with open(static / "big.bin", "wb") as f:
            f.truncate(BIG)
        static_port = _free_port()
        self.static_proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from twisted.internet import reactor; from twisted.web import "
             "server, static; site = server.Site(static.File(sys.argv[1])); site.noisy = False; "
             "reactor.listenTCP(int(sys.argv[2]), site, interface='127.0.0.1'); reactor.run()",
             str(static), str(static_port)], start_new_session=True)
        self.static = f"http://127.0.0.1:{static_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.static + "/sst.dds", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("the static server did not start") from None
                time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.web + "/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _call(self, service: str, op: str, **kwargs: Any) -> Any:
        request = urllib.request.Request(f"{self.web}/api/call/{service}/{op}", data=json.dumps(kwargs).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["result"]

    def stop(self) -> None:
        for proc in (getattr(self, "static_proc", None),):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
        node = getattr(self, "node", None)
        if node is not None:
            node.terminate()
            try:
                node.proc.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
        upstream = getattr(self, "upstream", None)
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# loads in other processes


class _LineCounter(protocol.ProcessProtocol):
    def __init__(self, load: "ProcessLoad") -> None:
        self.load = load
        self.buffer = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"E"):
                self.load.failed_with(f"non-200 answer: {line.decode(errors='replace')}")
            elif line.strip().isdigit():  # wrk's own report lines are not counts
                self.load.count(int(line))

    def errReceived(self, data: bytes) -> None:
        self.load.stderr += data[-2000:]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class ProcessLoad(Load):
    """A load tool in another process that prints what it completed, one
    number a line; started on C{start}, stopped (SIGINT) on C{pause}."""

    def __init__(self, reactor: Any, argv: List[str], scale: float = 1.0, drain_timeout: float = 15.0) -> None:
        super().__init__(reactor, drain_timeout)
        self.reactor = reactor
        self.argv = argv
        self.scale = scale
        self.stderr = b""
        self._proto: Optional[_LineCounter] = None
        self.on_close(self._stop)

    def count(self, n: int) -> None:
        self.completed += n * self.scale

    def failed_with(self, text: str) -> None:
        from twisted.python.failure import Failure
        self.failed(Failure(BenchError(text)))

    def _begin(self) -> None:
        self._proto = _LineCounter(self)
        self.reactor.spawnProcess(self._proto, self.argv[0], self.argv, env=dict(os.environ))

    def _stop(self) -> Deferred:
        proto, self._proto = self._proto, None
        if proto is None or proto.ended.called:
            return defer.succeed(None)
        try:
            proto.transport.signalProcess("INT")
        except Exception:  # noqa: BLE001 - already gone
            pass
        return proto.ended

    def _drained(self) -> Deferred:
        return self._stop()


class RssLoad(ProcessLoad):
    """A download (another process) while sampling a server's resident size:
    C{completed} grows by the running peak (MB) times elapsed seconds."""

    def __init__(self, reactor: Any, argv: List[str], pid: int) -> None:
        super().__init__(reactor, argv, scale=0.0)
        self.pid = pid
        self.peak = 0.0
        self._sampler: Any = None
        self._last = 0.0

    def _rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def _sample(self) -> None:
        now = time.perf_counter()
        self.peak = max(self.peak, self._rss_mb())
        self.completed += self.peak * (now - self._last)
        self._last = now

    def _begin(self) -> None:
        from twisted.internet.task import LoopingCall
        super()._begin()
        self.peak = 0.0
        self._last = time.perf_counter()
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self.reactor
        self._sampler.start(0.05, now=True)

    def _stop(self) -> Deferred:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        return super()._stop()


def wrk_load(reactor: Any, url: str, connections: int) -> Load:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed (apt-get install wrk)")
    script = Path(tempfile.mkstemp(prefix="ooidx-wrk-", suffix=".lua")[1])
    script.write_text(WRK_SCRIPT)
    threads = min(4, connections)
    load = ProcessLoad(reactor, [wrk, f"-t{threads}", f"-c{connections}", "-d3600s", "-s", str(script), url])
    load.on_close(lambda: script.unlink())
    return load


def download_argv(url: str, proxy: Optional[str] = None) -> List[str]:
    return [sys.executable, "-c", DOWNLOADER, url] + ([proxy] if proxy else [])


# ---------------------------------------------------------------------------
# sides


class _Side:
    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.env: Optional[Environment] = None

    def open(self) -> None:
        self.env = Environment.get()

    def close(self) -> None:
        pass

    def small(self, connections: int) -> Load:
        return wrk_load(self.reactor, self.small_url(), connections)

    def stream(self) -> Load:
        return ProcessLoad(self.reactor, self.big_argv(), scale=1e-6)

    def rss(self) -> Load:
        return RssLoad(self.reactor, self.big_argv(), self.server_pid())

    def small_url(self) -> str:
        raise NotImplementedError

    def big_argv(self) -> List[str]:
        raise NotImplementedError

    def server_pid(self) -> int:
        raise NotImplementedError


class ProxySide(_Side):
    def small_url(self) -> str:
        return f"{self.env.proxy}/datasets/sst.dds"

    def big_argv(self) -> List[str]:
        return download_argv(self.env.big_direct, self.env.proxy)

    def server_pid(self) -> int:
        return self.env.node.pid


class PydapSide(_Side):
    def small_url(self) -> str:
        return self.env.sst

    def big_argv(self) -> List[str]:
        return download_argv(self.env.big_direct)

    def server_pid(self) -> int:
        return self.env.upstream.proc.pid


class StaticSide(_Side):
    def small_url(self) -> str:
        return f"{self.env.static}/sst.dds"

    def big_argv(self) -> List[str]:
        return download_argv(f"{self.env.static}/big.bin")

    def server_pid(self) -> int:
        return self.env.static_proc.pid


def group() -> Group:
    return Group(
        name="proxy",
        description="the exchange's HTTP proxy (cache hits; a 1 GiB stream) against pydap direct and a "
                    "twisted.web static file",
        subject="proxy",
        baselines=["pydap", "static"],
        sides={"proxy": ProxySide, "pydap": PydapSide, "static": StaticSide},
        benchmarks=[
            Benchmark("cached .dds, 10 connections", "requests/s", lambda side: defer.succeed(side.small(10))),
            Benchmark("cached .dds, 50 connections", "requests/s", lambda side: defer.succeed(side.small(50))),
            Benchmark("1 GiB stream", "MB/s", lambda side: defer.succeed(side.stream())),
            Benchmark("1 GiB stream, peak RSS", "MB", lambda side: defer.succeed(side.rss())),
        ],
    )
