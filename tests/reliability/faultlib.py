"""Helpers of the fault scenarios: daemons as `twistd -n ooidx` processes,
a TCP proxy between a daemon and its broker that a test can drop, stall or
slow down, a producer of worker-queue tasks whose confirmed sends are
counted, and HTTP clients that tell a whole body from a truncated one.

Blocking work (HTTP clients, the TCP proxy) runs in threads of its own, so
it goes on whether or not the test's reactor is turning.
"""
from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from twisted.internet import defer, reactor

import magnet

HERE = Path(__file__).resolve().parent
OOIDX_TESTS = HERE.parent / "ooidx"
if str(OOIDX_TESTS) not in sys.path:
    sys.path.insert(0, str(OOIDX_TESTS))

from twistd_helpers import Daemon, direct_environment, eventually, free_port, write_config  # noqa: E402

__all__ = ["Daemon", "Node", "start_node", "TcpFaultProxy", "DistPartition", "partition_unavailable", "TaskProducer", "HttpLoad", "http_fetch",
           "sleep", "eventually", "free_port", "TOKEN", "metric_value"]

TOKEN = "reliability-token-" + uuid.uuid4().hex


from tests.support import node as support_node  # noqa: E402
from tests.support.node import DaemonNode  # noqa: E402
from tests.support.waiting import sleep  # noqa: E402 - one implementation for the suite


# --------------------------------------------------------------------------- #
# daemons


class Node(DaemonNode):
    """A running `twistd -n ooidx` of a fault scenario: the base's ports, log
    and process, restarted or killed as a crash, asked over its web port."""

    def __init__(self, daemon: Daemon, name: str, config: Path, env: Dict[str, str],
                 web_port: Optional[int], proxy_port: Optional[int]) -> None:
        super().__init__(daemon, web_port, proxy_port, TOKEN)
        self.name = name
        self.config = config
        self.env = env

    def restart(self) -> "Node":
        """Start the same config again (after the process ended)."""
        self.daemon.kill()
        self.daemon = Daemon(self.config, env=self.env, name=f"{self.name}-{int(time.time() * 1000) % 100000}")
        return self

    def kill9(self) -> None:
        """SIGKILL the daemon and its whole session (child processes too), as a crash."""
        try:
            os.killpg(self.daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.daemon.proc.wait(10)

    def health(self, timeout: float = 2.0) -> Optional[dict]:
        """/healthz's JSON when 200, else None (503, refused, timeout)."""
        try:
            status, _, body = http_get(f"{self.web}/healthz", timeout=timeout)
        except OSError:
            return None
        if status != 200:
            return None
        return json.loads(body)

    def metrics(self, timeout: float = 5.0) -> str:
        status, _, body = http_get(f"{self.web}/metrics", timeout=timeout)
        assert status == 200, (status, body[:500])
        return body.decode()

    def api(self, service: str, op: str, timeout: float = 15.0, **kwargs: Any) -> Any:
        request = urllib.request.Request(f"{self.web}/api/call/{service}/{op}", data=json.dumps(kwargs).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"}, method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as r:
            return json.loads(r.read())["result"]

    def status(self, timeout: float = 10.0) -> Any:
        request = urllib.request.Request(f"{self.web}/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as r:
            return json.loads(r.read())


def start_node(tmp: Path, name: str, broker: Union[str, Sequence[str]], components: Dict[str, Any],
               *, web: bool = True, proxy: bool = False, **settings: Any) -> Node:
    """Write a config and start `twistd -n ooidx` on it. The broker URL(s) (with
    their password) travel in OOIDX_BROKER, as in production."""
    components = dict(components)
    web_port = free_port() if web else None
    proxy_port = free_port() if proxy else None
    if web:
        components.setdefault("web", None)
    http: Dict[str, Any] = {}
    if web_port:
        http["web_port"] = web_port
    if proxy_port:
        http["proxy_port"] = proxy_port
    settings.setdefault("http", http)
    timeouts = {"shutdown": 5, "rpc": 5, "send": 5, "connect": 3, "heartbeat": 2}
    timeouts.update(settings.pop("timeouts", {}))
    settings["timeouts"] = timeouts
    settings.setdefault("security", {"token": TOKEN, "allow_private": True, "allow_hosts": ["127.0.0.1"]})
    settings.setdefault("logging", {"format": "text", "level": "info"})
    urls = [broker] if isinstance(broker, str) else list(broker)
    config = write_config(tmp / f"{name}.yaml", node=name, broker="amqp://guest@127.0.0.1:5672/",
                          components=components, **settings)
    env = direct_environment(OOIDX_BROKER=",".join(urls))
    return Node(Daemon(config, env=env, name=name), name, config, env, web_port, proxy_port)


async def wait_started(node: Node, timeout: float = 60.0) -> None:
    await eventually(lambda: node.daemon.has(f"node {node.name} started") or _died(node), timeout,
                     f"node {node.name} started")
    assert node.daemon.proc.poll() is None, node.describe()


def _died(node: Node) -> bool:
    if node.daemon.proc.poll() is not None:
        raise AssertionError(f"node {node.name} exited\n{node.describe()}")
    return False


def metric_value(text: str, metric_name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        if metric != metric_name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == want:
            return float(value)
    return 0.0


# --------------------------------------------------------------------------- #
# HTTP


def http_get(url: str, timeout: float = 10.0) -> tuple:
    return support_node.http_get(url, timeout)


def http_fetch(proxy_port: int, url: str, *, timeout: float = 60.0, pause_after: Optional[int] = None,
               pause: Optional[threading.Event] = None, expect: Optional[bytes] = None) -> Dict[str, Any]:
    """GET C{url} through the forward proxy on C{proxy_port}; never raises.

    Returns {"url", "status", "length" (declared), "bytes", "complete" (the whole
    declared body arrived), "ok" (a 200 that is complete, and equal to C{expect}
    when given), "error", "sent" (the request was handed to the socket whole:
    an error before it means the node never had it), "started", "elapsed"}.
    With C{pause_after}, reading stops after that many body bytes until C{pause}
    is set (a slow client)."""
    out: Dict[str, Any] = {"url": url, "status": None, "length": None, "bytes": 0, "complete": False,
                           "ok": False, "error": None, "started": time.monotonic(), "elapsed": None,
                           "body_ok": None, "sent": False}
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=timeout)
    body = bytearray()
    try:
        conn.request("GET", url)
        out["sent"] = True
        r = conn.getresponse()
        out["status"] = r.status
        declared = r.getheader("Content-Length")
        out["length"] = int(declared) if declared is not None else None
        out["source"] = r.getheader("X-Ooidx-Source")
        while True:
            if pause_after is not None and pause is not None and len(body) >= pause_after and not pause.is_set():
                pause.wait(timeout)
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
            if not chunk:
                break
            body += chunk
        # chunked without its last chunk and short Content-Length both raise in read
        out["complete"] = out["length"] is None or len(body) == out["length"]
    except (http.client.IncompleteRead, http.client.HTTPException, OSError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    finally:
        conn.close()
    out["bytes"] = len(body)
    out["elapsed"] = time.monotonic() - out["started"]
    if out["status"] == 200 and out["complete"] and not out["error"]:
        out["body_ok"] = expect is None or bytes(body) == expect
        out["ok"] = out["body_ok"]
    return out


class HttpLoad:
    """C{clients} threads fetching C{urls} (round robin) through a proxy until stopped."""

    def __init__(self, proxy_port: int, urls: List[str], clients: int = 4, timeout: float = 60.0,
                 expect: Optional[Dict[str, bytes]] = None, pause: float = 0.02, unique_every: int = 0) -> None:
        """C{unique_every}: every so many requests gets a query of its own
        (C{u=N}; the test upstream ignores it), so it misses every cache and
        crosses the bus to a fetcher."""
        self.proxy_port = proxy_port
        self.urls = urls
        self.timeout = timeout
        self.expect = expect or {}
        self.pause = pause
        self.unique_every = unique_every
        self._unique = 0
        self.results: List[Dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> "HttpLoad":
        for t in self._threads:
            t.start()
        return self

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            url = self.urls[n % len(self.urls)]
            n += 1
            asked = url
            if self.unique_every and n % self.unique_every == 0:
                self._unique += 1
                asked = f"{url}{'&' if '?' in url else '?'}u={i}.{self._unique}"
            self.results.append(http_fetch(self.proxy_port, asked, timeout=self.timeout,
                                           expect=self.expect.get(url)))
            time.sleep(self.pause)

    def stop(self, timeout: float = 90.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "an HTTP client hangs"


#: errors of a connection the node's side reset or closed (what a client sees of a socket gone)
_RESET = ("ConnectionReset", "BrokenPipe", "ConnectionAborted")


def classify(results: List[Dict[str, Any]]) -> Dict[str, int]:
    """Counts of outcomes: ok, 5xx (502/503/504), failed transfer (cut short),
    refused (no node listening; or the connection reset before the request was
    even handed to the socket, so the node never had it), wrong (anything
    else: a hang, a bad body, a 4xx, a request sent and then answered by a
    close or a reset with no response)."""
    out = {"ok": 0, "5xx": 0, "cut": 0, "refused": 0, "wrong": 0}
    for r in results:
        error = r["error"] or ""
        if r["status"] is None and "ConnectionRefused" in error:
            out["refused"] += 1  # nothing listens (the node is stopped): the client knows at once
        elif r["status"] is None and r.get("sent") is False and any(e in error for e in _RESET):
            out["refused"] += 1  # reset before the request left the client: never sent, known at once
        elif r["ok"]:
            out["ok"] += 1
        elif r["status"] in (502, 503, 504) and not (r["complete"] and r["error"] is None and r["status"] == 200):
            out["5xx"] += 1
        elif r["status"] == 200 and (r["error"] is not None or not r["complete"]):
            out["cut"] += 1  # a transfer failed visibly: the client knows it is not whole
        else:
            out["wrong"] += 1  # a 200 with a wrong body, a 4xx, or no answer at all
    return out


# --------------------------------------------------------------------------- #
# worker-queue tasks


class TaskProducer:
    """Posts C{controller.record(dataset=NAME)} tasks, one unique NAME each, from a
    test bus; remembers which sends the broker confirmed. The controller counts
    every delivery of a task under its name (get_stats' datasets), so a task is
    done when its name is counted, and counted twice when it was delivered twice."""

    def __init__(self, bus: magnet.Bus, prefix: Optional[str] = None, concurrency: int = 10,
                 rate: float = 100.0) -> None:
        self.bus = bus
        self.prefix = prefix or f"t{uuid.uuid4().hex[:6]}-"
        self.concurrency = concurrency
        self.rate = rate
        self.sent = 0
        self.confirmed: set = set()
        self.failed: List[tuple] = []
        self.confirm_times: List[float] = []
        self._running = False
        self._loops: List[defer.Deferred] = []
        self._n = 0

    def start(self) -> "TaskProducer":
        self._running = True
        self._loops = [defer.ensureDeferred(self._loop()) for _ in range(self.concurrency)]
        return self

    async def _loop(self) -> None:
        interval = self.concurrency / self.rate
        while self._running:
            self._n += 1
            name = f"{self.prefix}{self._n:06d}"
            self.sent += 1
            began = time.monotonic()
            try:
                await self.bus.post("controller", "record", dataset=name, url=None, hit=False, bytes=0,
                                    status=200)
            except Exception as e:  # noqa: BLE001 - every failed send is counted, with its error
                self.failed.append((name, f"{type(e).__name__}: {e}"[:200]))
                await sleep(0.2)
                continue
            self.confirmed.add(name)
            self.confirm_times.append(time.monotonic())
            rest = interval - (time.monotonic() - began)
            await sleep(max(0.0, rest))

    async def stop(self) -> None:
        self._running = False
        for d in self._loops:
            await d

    def confirmed_since(self, t: float) -> int:
        return sum(1 for c in self.confirm_times if c >= t)

    async def counts(self, bus: magnet.Bus) -> Dict[str, int]:
        stats = await bus.call("controller", "get_stats", timeout=15)
        return {name: per.get("misses", 0) for name, per in (stats.get("datasets") or {}).items()
                if name.startswith(self.prefix)}

    async def settle(self, bus: magnet.Bus, timeout: float = 60.0) -> Dict[str, Any]:
        """Wait until every confirmed task is counted (or the timeout); returns the figures."""
        deadline = time.monotonic() + timeout
        counts: Dict[str, int] = {}
        while True:
            try:
                counts = await self.counts(bus)
            except Exception:  # noqa: BLE001 - the controller may still be coming back
                counts = counts
            missing = self.confirmed - set(counts)
            if not missing or time.monotonic() > deadline:
                break
            await sleep(0.5)
        processed = sum(1 for n in counts.values() if n > 0)
        return {"sent": self.sent, "confirmed": len(self.confirmed), "processed": processed,
                "lost": len(self.confirmed - set(counts)),
                "duplicated": sum(n - 1 for n in counts.values() if n > 1),
                "failed_sends": len(self.failed), "missing": sorted(self.confirmed - set(counts))[:10],
                "failed_examples": sorted({e for _, e in self.failed})[:5]}


def make_bus(urls: Union[str, Sequence[str]], **options: Any) -> magnet.Bus:
    options.setdefault("node", "reliability-test")
    options.setdefault("rpc_timeout", 10)
    options.setdefault("send_timeout", 5)
    options.setdefault("shutdown_timeout", 2)
    options.setdefault("heartbeat", 2)
    options.setdefault("backoff", lambda attempt: 0.3)
    bus = magnet.connect(urls if isinstance(urls, str) else list(urls), reactor, **options)
    bus.startService()
    return bus


# --------------------------------------------------------------------------- #
# a TCP proxy with faults


class TcpFaultProxy:
    """Forwards 127.0.0.1:port to a target, in threads. C{drop()} closes every
    connection (a reset link); C{stalled = True} stops forwarding without
    closing anything (a dead network: bytes are held, as TCP would retransmit
    them once it heals); C{silent = True} stops reading as well (the sender's
    socket buffers fill, as behind iptables DROP); C{delay} adds latency to every chunk, each way."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.stalled = False
        #: stop reading too (as iptables DROP: the sender's socket buffers fill, nothing is acknowledged)
        self.silent = False
        self.delay = 0.0
        self.accepted = 0
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, broker_url: str) -> str:
        """C{broker_url} with its host:port replaced by this proxy's."""
        from urllib.parse import urlsplit, urlunsplit
        parts = urlsplit(broker_url)
        netloc = parts.netloc.rsplit("@", 1)
        netloc[-1] = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc="@".join(netloc)))

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        # the reader stamps each chunk; the writer sends it once its latency has passed
        # (latency, not a bandwidth limit: chunks in flight overlap)
        import queue
        pending: "queue.Queue" = queue.Queue()

        def write() -> None:
            try:
                while True:
                    item = pending.get()
                    if item is None:
                        break
                    due, data = item
                    while (self.stalled and not self._closed) or time.monotonic() < due:
                        time.sleep(0.005)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                self._close_pair(src, dst)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            while True:
                while self.silent and not self._closed:  # read nothing: the sender's buffers fill
                    time.sleep(0.005)
                data = src.recv(65536)
                if not data:
                    break
                pending.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            pending.put(None)

    def _close_pair(self, src: socket.socket, dst: socket.socket) -> None:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            for s in (src, dst):
                if s in self._conns:
                    self._conns.remove(s)

    def drop(self) -> int:
        """Close every connection now; returns how many links were cut."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(conns) // 2

    def close(self) -> None:
        self._closed = True
        self.stalled = False
        self._listener.close()
        self.drop()


# --------------------------------------------------------------------------- #
# a network partition between RabbitMQ cluster nodes


def partition_unavailable() -> Optional[str]:
    """Why L{DistPartition} cannot work here (no iptables, not root, no
    netfilter), or None when it can."""
    import shutil
    import subprocess
    if shutil.which("iptables") is None:
        installed = _install_iptables()
        if installed:
            return installed
    try:
        done = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"iptables -S INPUT: {e}"
    if done.returncode != 0:
        return f"iptables -S INPUT exited {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}"
    return None


def _install_iptables() -> Optional[str]:
    """Install Debian's iptables when run as root on Debian (as tests/rabbitmq.py
    installs rabbitmq-server): a clean CI machine has none. None once it is
    there, else why not."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or not os.path.exists("/etc/debian_version") or shutil.which("apt-get") is None:
        return "iptables is not installed (as root on Debian the test installs it: apt-get install iptables)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "iptables"]):
        try:
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"iptables is not installed, and {' '.join(cmd)} failed: {e}"
        if done.returncode != 0 and cmd[1] == "install":
            return (f"iptables is not installed, and {' '.join(cmd)} exited {done.returncode}: "
                    f"{done.stdout.decode(errors='replace')[-500:]}")
    return None if shutil.which("iptables") else "iptables is not installed (apt-get install iptables put none on PATH)"


class DistPartition:
    """Cuts one RabbitMQ node off from the others of its cluster, with
    iptables, on the Erlang distribution links only: AMQP (clients) and
    rabbitmqctl (from 127.0.0.1) still reach every node.

    Every node listens for its cluster links on its own C{dist_port} and
    opens links to the others from its own loopback address C{dist_ip}
    (conftest.form_cluster), so the links of node C with node A are exactly
    the packets from C{C.dist_ip} to C{A.dist_port} and back, and from
    C{A.dist_ip} to C{C.dist_port} and back. The rules DROP them in a chain
    of their own jumped to from INPUT (on loopback every packet passes
    INPUT): silence, as a dead network, not a reset, so the nodes learn of
    it only when C{net_ticktime} runs out. L{heal} deletes the chain."""

    def __init__(self) -> None:
        self.chain = f"ooidx-part-{uuid.uuid4().hex[:8]}"
        self.cut = False
        self.rules: List[List[str]] = []

    def _ipt(self, *args: str, check: bool = True) -> "Any":
        import subprocess
        done = subprocess.run(["iptables", "-w", "10", *args], capture_output=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)} exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-300:]}")
        return done

    def isolate(self, node: Any, others: Sequence[Any], silence_ports: Sequence[int] = (),
                target: Sequence[str] = ("DROP",)) -> None:
        """Drop every packet of C{node}'s cluster links with C{others}, and
        C{target}: DROP (silence, a dead network: the other side learns
        it only when C{net_ticktime} runs out, and every attempt to reach the
        node again waits for C{net_setuptime}) or e.g. REJECT --reject-with
        tcp-reset (a firewall that refuses: the links fail at once). Every
        packet to or from C{silence_ports} is dropped (e.g. C{node.port}: its
        AMQP clients' links go silent too, and new ones are never answered)."""
        self.rules = []
        for port in silence_ports:
            self.rules.append(["-p", "tcp", "--dport", str(port), "-j", "DROP"])
            self.rules.append(["-p", "tcp", "--sport", str(port), "-j", "DROP"])
        for other in others:
            for a, b in ((node, other), (other, node)):
                # a's link to b (a connects from a.dist_ip to b's dist_port) and b's answers
                self.rules.append(["-p", "tcp", "-s", a.dist_ip, "--dport", str(b.dist_port), "-j", *target])
                self.rules.append(["-p", "tcp", "-d", a.dist_ip, "--sport", str(b.dist_port), "-j", *target])
        self._ipt("-N", self.chain)
        for rule in self.rules:
            self._ipt("-A", self.chain, *rule)
        self._ipt("-I", "INPUT", "-j", self.chain)
        self.cut = True

    def dropped(self) -> int:
        """Packets dropped so far (the proof that the cut cut something)."""
        done = self._ipt("-L", self.chain, "-n", "-v", "-x", check=False)
        total = 0
        for line in done.stdout.decode(errors="replace").splitlines()[2:]:
            fields = line.split()
            if fields and fields[0].isdigit():
                total += int(fields[0])
        return total

    def heal(self) -> None:
        """Remove the rules: the links come back (the nodes reconnect)."""
        if not self.cut:
            return
        self._ipt("-D", "INPUT", "-j", self.chain, check=False)
        self._ipt("-F", self.chain, check=False)
        self._ipt("-X", self.chain, check=False)
        self.cut = False
