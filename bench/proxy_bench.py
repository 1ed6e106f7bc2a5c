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

  5. 128 MiB miss, stored: MB/s of downloads of a 128 MiB body under the
     cache's limit, each one a new URL (C{/pattern/SIZE.bin?k=RANDOM}): for
     C{proxy} every download is a miss that the fetcher streams to the client
     and, as a second stream, to the cache, which writes it to its disk store.
  6. 128 MiB miss, stored, peak RSS: the node's resident size during row 5.
  7. 128 MiB miss, not stored: the same downloads through a second node whose
     cache is too small for the body (no second stream: the path of row 3 at
     the size of row 5); compare its C{proxy} value with row 5's.
  8. 128 MiB hit from disk: MB/s of downloads of one stored 128 MiB body,
     every one a hit the cache reads from its disk store (the page cache, in
     practice, as for the static file) and streams over the bus.
  9. 128 MiB hit from disk, peak RSS: the node's resident size during row 8.

  10. small .dds miss, latency p50 / 11. p99 (ms; lower is better): one client
     asking, one request at a time on a keep-alive connection, for a small .dds
     as a new URL every time (C{?k=RANDOM}). For C{proxy}: by name
     (C{/datasets/sdds.dds?k=...}), dataset C{sdds} registered at the static
     server, so every request is a miss fetched from a static file; C{static}:
     the same file fetched directly (the baseline of the ratio); C{pydap}: the
     same .dds from pydap directly. The figure is the percentile of the last
     200 requests, averaged over the measured window; the harness keeps the
     largest of the rounds (the worst), on every side alike.

Rows 5-9 are checked, not just timed: every download's status, length and
bytes (byte i of the body is i % 251, compared chunk by chunk) and, through
the proxy, its C{X-Ooidx-Source} (C{fetcher} for a miss, C{cache} for a
hit). Before a side is measured, one download is checked against the
upstream's SHA-256 (and, for C{proxy}, the cache is seen to keep it and
serve it back whole). After each measured run of row 5 the cache's C{stats}
must show a store for every download completed, and its C{lookup} the last
one stored at full size; row 7's must show none.

Without wrk the request rows use a small Twisted keep-alive load client
(tests by hand only: it is slower than the servers it measures).
"""
from __future__ import annotations

import atexit
import hashlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred

from bench.harness import BenchError, Benchmark, Group, Load, Settings, log

ROOT = Path(__file__).resolve().parents[1]
BIG = 1 << 30
#: the large body the cache keeps (rows 5-9): under the node's cache (1 GiB), over the second node's
LARGE = 128 << 20
LARGE_NAME = f"{LARGE >> 20} MiB"
#: the second node's cache: too small for LARGE, so its fetcher sends no second stream
NOSTORE_CACHE_BYTES = 32 << 20
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

#: argv: URL PROXY-or-"" SIZE SOURCE-or-"-" fresh|same. Downloads URL again and
#: again (with "fresh", each time as URL?k=RANDOM: a new URL, a cache miss),
#: checks each answer (200, Content-Length, X-Ooidx-Source, every byte: byte i
#: is i % 251) and prints its size chunk by chunk, then "U URL" once it is whole.
LARGE_DOWNLOADER = r"""
import http.client, sys, urllib.parse, uuid
url, proxy, size, source, fresh = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "fresh"
pattern = bytes(range(251)) * ((1 << 20) // 251 + 2)
target = urllib.parse.urlsplit(proxy or url)
def fail(why):
    print("E", why, flush=True); sys.exit(1)
while True:
    asked = url + ("?k=" + uuid.uuid4().hex if fresh else "")
    parts = urllib.parse.urlsplit(asked)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
    conn.request("GET", asked if proxy else parts.path + ("?" + parts.query if parts.query else ""))
    r = conn.getresponse()
    if r.status != 200:
        fail(r.status)
    if source != "-" and r.getheader("X-Ooidx-Source") != source:
        fail("source %r, not %r" % (r.getheader("X-Ooidx-Source"), source))
    if r.getheader("Content-Length") != str(size):
        fail("Content-Length %r, not %d" % (r.getheader("Content-Length"), size))
    offset = 0
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        start = offset % 251
        if pattern[start:start + len(chunk)] != chunk:
            fail("body differs from the upstream's within bytes %d-%d" % (offset, offset + len(chunk)))
        offset += len(chunk)
        sys.stdout.write("%d\n" % len(chunk)); sys.stdout.flush()
    if offset != size:
        fail("%d bytes, not %d" % (offset, size))
    print("U", asked, flush=True)
    conn.close()
"""


#: argv: URL. GETs URL?k=RANDOM (a new URL each time) one after another on one
#: keep-alive connection and prints each one's latency, "L MS".
LATENCY_CLIENT = r"""
import http.client, sys, time, urllib.parse, uuid
url = sys.argv[1]
target = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
while True:
    path = target.path + "?k=" + uuid.uuid4().hex
    started = time.perf_counter()
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    elapsed = (time.perf_counter() - started) * 1000.0
    if r.status != 200 or not body:
        print("E", r.status, flush=True); sys.exit(1)
    print("L %.3f" % elapsed, flush=True)
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Large:
    """The large body of rows 5-9 (L{Environment.large})."""

    url: str  # the upstream's, without a query
    sha256: str
    static: str  # the same bytes as a static file
    hit_url: str  # the URL of it that row 8 asks for (stored once, then hits)
    nostore_node: Any
    nostore_proxy: str
    nostore_web: str


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
        self._nodes: List[Any] = []
        self._large: Optional[Large] = None
        data = self.tmp / "data"
        make_files(data)
        self.upstream = Upstream(data)
        self.sst = self.upstream.url("sst.nc.dds")
        self.big_direct = self.upstream.url(f"big/{BIG}.bin")
        self._write_config, self._daemon, self._environment = write_config, Daemon, environment
        self.node, self.proxy, self.web = self._start_node("bench", None)
        self._call("controller", "register", name="sst", url=self.upstream.url("sst.nc"))
        self._call("controller", "register", name="bigfile", url=self.upstream.url(f"big/{BIG}"), check=False)
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

    def _start_node(self, name: str, cache: Optional[Dict[str, Any]]) -> Any:
        """A `twistd -n ooidx` node on memory:// with the data path: (daemon, proxy URL, web URL)."""
        proxy_port, web_port = _free_port(), _free_port()
        config = self._write_config(self.tmp / f"{name}.yaml", node=name, broker="memory://", components={
            "attribute_store": {"url": "attributes.sqlite3"}, "controller": None, "fetcher": {"instances": 2},
            "cache": cache, "proxyng": None, "csv": None, "web": None},
            http={"proxy_port": proxy_port, "web_port": web_port},
            security={"token": TOKEN, "allow_private": True, "allow_hosts": ["127.0.0.1"]},
            logging={"level": "warn"})
        node = self._daemon(config, env=self._environment())
        self._nodes.append(node)
        web = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 60
        while not self._healthy(web):
            if time.monotonic() > deadline or node.proc.poll() is not None:
                raise BenchError(f"the exchange did not start:\n{node.describe()}")
            time.sleep(0.2)
        return node, f"http://127.0.0.1:{proxy_port}", web

    def large(self) -> "Large":
        """The large body (rows 5-9), made on first use: the upstream's URL for it, its
        SHA-256, the same bytes as a static file, and the second node (whose cache
        cannot keep it)."""
        if self._large is None:
            from dap_upstream import pattern_bytes
            digest = hashlib.sha256()
            with open(self.tmp / "static" / "large.bin", "wb") as f:
                for offset in range(0, LARGE, 1 << 20):
                    piece = pattern_bytes(min(1 << 20, LARGE - offset), offset)
                    digest.update(piece)
                    f.write(piece)
            node, proxy, web = self._start_node("nostore", {"max_bytes": NOSTORE_CACHE_BYTES})
            base = self.upstream.url(f"pattern/{LARGE}")
            self._call("controller", "register", name="large", url=base, check=False)
            self._call("controller", "register", name="large", url=base, web=web, check=False)
            limit = self._call("cache", "lookup", url=base + ".bin", web=web)["max_entry_bytes"]
            if limit >= LARGE:
                raise BenchError(f"the second node's cache would keep {LARGE} bytes (limit {limit})")
            self._large = Large(url=base + ".bin", sha256=digest.hexdigest(), static=f"{self.static}/large.bin",
                                hit_url=f"{base}.bin?k=hit-{uuid.uuid4().hex}", nostore_node=node,
                                nostore_proxy=proxy, nostore_web=web)
        return self._large

    def static_dataset(self) -> None:
        """Dataset C{sdds} at the static server (rows 10-11: a static-file upstream)."""
        if not getattr(self, "_sdds", False):
            self._call("controller", "register", name="sdds", url=f"{self.static}/sst", check=False)
            self._sdds = True

    @staticmethod
    def _healthy(web: str) -> bool:
        try:
            with urllib.request.urlopen(web + "/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _call(self, service: str, op: str, web: Optional[str] = None, **kwargs: Any) -> Any:
        request = urllib.request.Request(f"{web or self.web}/api/call/{service}/{op}", data=json.dumps(kwargs).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["result"]

    def stop(self) -> None:
        for proc in (getattr(self, "static_proc", None),):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
        for node in getattr(self, "_nodes", ()):
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
            elif line.startswith(b"L "):  # one request's latency in ms (LATENCY_CLIENT)
                self.load.latency(float(line[2:]))
            elif line.startswith(b"U "):  # a whole, checked download (LARGE_DOWNLOADER)
                self.load.downloaded(line[2:].decode(errors="replace").strip())

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

    def downloaded(self, url: str) -> None:
        pass

    def latency(self, ms: float) -> None:
        pass

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


class LatencyLoad(ProcessLoad):
    """Requests one after another (another process) printing their latencies:
    C{completed} grows by the C{quantile} of the last L{WINDOW} latencies (ms)
    times elapsed seconds, so the harness's rate is that percentile."""

    WINDOW = 200

    def __init__(self, reactor: Any, url: str, quantile: float) -> None:
        super().__init__(reactor, [sys.executable, "-c", LATENCY_CLIENT, url], scale=0.0)
        self.quantile = quantile
        self.recent: List[float] = []
        self._sampler: Any = None

    def latency(self, ms: float) -> None:
        self.recent.append(ms)
        if len(self.recent) > self.WINDOW:
            del self.recent[0]

    def _value(self) -> float:
        ordered = sorted(self.recent)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]

    def _sample(self) -> None:
        now = time.perf_counter()
        self.completed += self._value() * (now - self._last)
        self._last = now

    def _begin(self) -> None:
        from twisted.internet.task import LoopingCall
        super()._begin()
        self._last = time.perf_counter()
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self.reactor
        self._sampler.start(0.05, now=True)

    def _stop(self) -> Deferred:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        return super()._stop()


class StoreCheckedLoad(ProcessLoad):
    """Downloads of new URLs through a node (another process); after each run, the
    node's cache must have stored every one completed (C{expect_stored}), or none."""

    def __init__(self, reactor: Any, argv: List[str], env: "Environment", web: str, expect_stored: bool,
                 drain_timeout: float = 15.0) -> None:
        super().__init__(reactor, argv, scale=1e-6, drain_timeout=drain_timeout)
        self.env = env
        self.web = web
        self.expect_stored = expect_stored
        self.urls: List[str] = []
        self.stats = env._call("cache", "stats", web=web)

    def downloaded(self, url: str) -> None:
        self.urls.append(url)

    def _drained(self) -> Deferred:
        from twisted.internet.threads import deferToThread
        d = self._stop()
        d.addCallback(lambda _: deferToThread(self._check))
        return d

    def _check(self) -> None:
        urls, self.urls = self.urls, []
        before = self.stats
        deadline = time.monotonic() + 10
        while True:
            after = self.env._call("cache", "stats", web=self.web)
            stored = after["stores"] - before["stores"]
            if not self.expect_stored or stored >= len(urls) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.stats = after
        if not self.expect_stored:
            if stored or after["store_failures"] != before["store_failures"]:
                raise BenchError(f"the cache got a store stream ({stored} stored, "
                                 f"{after['store_failures'] - before['store_failures']} dropped): not the path "
                                 f"without the cache's copy")
            return
        if stored < len(urls):
            raise BenchError(f"{len(urls)} downloads completed but the cache stored {stored}")
        if urls:
            found = self.env._call("cache", "lookup", url=urls[-1], web=self.web)
            if found.get("state") != "fresh" or found.get("size") != LARGE:
                raise BenchError(f"the last download is not in the cache whole: {found}")
        log(f"  checked: {len(urls)} downloads, {stored} stores, last one in the cache "
            f"({after['entries']} entries, {after['evictions']} evictions so far)")


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


def large_argv(url: str, proxy: Optional[str], source: Optional[str], fresh: bool) -> List[str]:
    return [sys.executable, "-c", LARGE_DOWNLOADER, url, proxy or "", str(LARGE), source or "-",
            "fresh" if fresh else "same"]


def fetch_checked(url: str, proxy: Optional[str] = None) -> Dict[str, Any]:
    """One blocking GET (through C{proxy} if given): status, size, SHA-256 and X-Ooidx-Source."""
    handlers = {"http": proxy} if proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(handlers))
    digest, size = hashlib.sha256(), 0
    with opener.open(url, timeout=60) as r:
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
        return {"status": r.status, "size": size, "sha256": digest.hexdigest(),
                "source": r.headers.get("X-Ooidx-Source")}


def check_body(got: Dict[str, Any], large: Large, what: str, source: Optional[str] = None) -> None:
    if got["status"] != 200 or got["size"] != LARGE or got["sha256"] != large.sha256:
        raise BenchError(f"{what}: {got['status']}, {got['size']} bytes, sha256 {got['sha256'][:16]}..., not "
                         f"200, {LARGE} bytes, {large.sha256[:16]}...")
    if source is not None and got["source"] != source:
        raise BenchError(f"{what}: X-Ooidx-Source {got['source']!r}, not {source!r}")


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

    def large(self, kind: str, rss: bool = False) -> Deferred:
        """Rows 5-9. C{kind}: "miss" (stored, by the proxy), "nostore" (the proxy of the
        node that cannot keep it) or "hit". Checks one download first (in a thread)."""
        from twisted.internet.threads import deferToThread
        large = self.env.large()  # made once, before any timing (the first time starts the second node)
        d = deferToThread(self.large_check, large, kind)

        def made(_: Any) -> Load:
            argv = self.large_argv(large, kind)
            if rss:
                return RssLoad(self.reactor, argv, self.server_pid())
            return self.large_load(large, kind, argv)

        return d.addCallback(made)

    def miss_latency(self, quantile: float) -> Load:
        return LatencyLoad(self.reactor, self.miss_url(), quantile)

    def miss_url(self) -> str:
        raise NotImplementedError

    def large_check(self, large: Large, kind: str) -> None:
        raise NotImplementedError

    def large_argv(self, large: Large, kind: str) -> List[str]:
        raise NotImplementedError

    def large_load(self, large: Large, kind: str, argv: List[str]) -> Load:
        return ProcessLoad(self.reactor, argv, scale=1e-6)

    def small_url(self) -> str:
        raise NotImplementedError

    def big_argv(self) -> List[str]:
        raise NotImplementedError

    def server_pid(self) -> int:
        raise NotImplementedError


class ProxySide(_Side):
    def miss_url(self) -> str:
        self.env.static_dataset()
        return f"{self.env.proxy}/datasets/sdds.dds"

    def small_url(self) -> str:
        return f"{self.env.proxy}/datasets/sst.dds"

    def big_argv(self) -> List[str]:
        return download_argv(self.env.big_direct, self.env.proxy)

    def server_pid(self) -> int:
        return self.env.node.pid

    def large_check(self, large: Large, kind: str) -> None:
        if kind == "nostore":
            url = f"{large.url}?k=check-{uuid.uuid4().hex}"
            check_body(fetch_checked(url, large.nostore_proxy), large, "not stored (second node)", "fetcher")
            return
        # a miss, seen to be stored whole and served back from the store
        url = f"{large.url}?k=check-{uuid.uuid4().hex}" if kind == "miss" else large.hit_url
        check_body(fetch_checked(url, self.env.proxy), large, "first download", "fetcher" if kind == "miss" else None)
        deadline = time.monotonic() + 20
        while True:
            found = self.env._call("cache", "lookup", url=url)
            if found.get("state") == "fresh" and found.get("size") == LARGE:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{url} not stored: lookup says {found}")
            time.sleep(0.1)
        check_body(fetch_checked(url, self.env.proxy), large, "the stored copy", "cache")

    def large_argv(self, large: Large, kind: str) -> List[str]:
        if kind == "hit":
            return large_argv(large.hit_url, self.env.proxy, "cache", fresh=False)
        proxy = large.nostore_proxy if kind == "nostore" else self.env.proxy
        return large_argv(large.url, proxy, "fetcher", fresh=True)

    def large_load(self, large: Large, kind: str, argv: List[str]) -> Load:
        if kind == "hit":
            return super().large_load(large, kind, argv)
        web = large.nostore_web if kind == "nostore" else self.env.web
        return StoreCheckedLoad(self.reactor, argv, self.env, web, expect_stored=kind == "miss")


class PydapSide(_Side):
    def miss_url(self) -> str:
        return self.env.sst

    def small_url(self) -> str:
        return self.env.sst

    def big_argv(self) -> List[str]:
        return download_argv(self.env.big_direct)

    def server_pid(self) -> int:
        return self.env.upstream.proc.pid

    def large_check(self, large: Large, kind: str) -> None:
        check_body(fetch_checked(f"{large.url}?k=check-{uuid.uuid4().hex}"), large, "the upstream")

    def large_argv(self, large: Large, kind: str) -> List[str]:
        if kind == "hit":
            return large_argv(large.hit_url, None, None, fresh=False)
        return large_argv(large.url, None, None, fresh=True)


class StaticSide(_Side):
    def miss_url(self) -> str:
        return f"{self.env.static}/sst.dds"

    def small_url(self) -> str:
        return f"{self.env.static}/sst.dds"

    def big_argv(self) -> List[str]:
        return download_argv(f"{self.env.static}/big.bin")

    def server_pid(self) -> int:
        return self.env.static_proc.pid

    def large_check(self, large: Large, kind: str) -> None:
        check_body(fetch_checked(large.static), large, "the static file")

    def large_argv(self, large: Large, kind: str) -> List[str]:
        return large_argv(large.static, None, None, fresh=False)


def group() -> Group:
    return Group(
        name="proxy",
        description=f"the exchange's HTTP proxy (cache hits; a 1 GiB stream; a {LARGE_NAME} body stored, "
                    "then served from the cache's disk) against pydap direct and a twisted.web static file",
        subject="proxy",
        baselines=["pydap", "static"],
        sides={"proxy": ProxySide, "pydap": PydapSide, "static": StaticSide},
        benchmarks=[
            Benchmark("cached .dds, 10 connections", "requests/s", lambda side: defer.succeed(side.small(10))),
            Benchmark("cached .dds, 50 connections", "requests/s", lambda side: defer.succeed(side.small(50))),
            Benchmark("1 GiB stream", "MB/s", lambda side: defer.succeed(side.stream())),
            Benchmark("1 GiB stream, peak RSS", "MB", lambda side: defer.succeed(side.rss())),
            Benchmark(f"{LARGE_NAME} miss, stored", "MB/s", lambda side: side.large("miss")),
            Benchmark(f"{LARGE_NAME} miss, stored, peak RSS", "MB", lambda side: side.large("miss", rss=True)),
            Benchmark(f"{LARGE_NAME} miss, not stored", "MB/s", lambda side: side.large("nostore")),
            Benchmark(f"{LARGE_NAME} hit from disk", "MB/s", lambda side: side.large("hit")),
            Benchmark(f"{LARGE_NAME} hit from disk, peak RSS", "MB", lambda side: side.large("hit", rss=True)),
            Benchmark("small .dds miss, latency p50", "ms",
                      lambda side: defer.maybeDeferred(side.miss_latency, 0.5)),
            Benchmark("small .dds miss, latency p99", "ms",
                      lambda side: defer.maybeDeferred(side.miss_latency, 0.99)),
        ],
    )
