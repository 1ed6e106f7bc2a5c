"""The soak (issue 17, scenario 6): a real `twistd -n ooidx` node (every
component) on RabbitMQ (a virtual host of its own), a real pydap upstream
whose files change, and mixed load for --minutes (30 by default), watched
from outside every --every seconds (10): the node's RSS and open
descriptors (/proc), the Deferreds its bus waits on (C{magnet_pending} on
its /metrics), the messages in every queue of its vhost (rabbitmqctl).
Then a verdict (tests/reliability/soakstats.py) and a plot.

The load, all at once for the whole run:

  - DAP clients through the proxy (--clients, 3): hot URLs (hits) and
    constraints nobody asked before (misses: a fetch over the bus);
  - the upstream's files change every --change-every seconds (30) and the
    three changing datasets are refreshed then (new versions saved by the
    persister, events), one of them also on its own refresh schedule;
  - people: one person reads an events stream (SSE) and a datasets stream,
    dropping and resuming them (Last-Event-ID) every minute; another gets
    dataset notices by webhook (a receiver here that answers the challenge);
    a third subscribes and unsubscribes again and again;
  - pub_sub churn: subscribers (pika, acking what they get) come and go, a
    new one every --churn-every seconds (20), at most four at a time, and
    publications every 2 s.

When the load stops, the consumers stay and the queues must drain within
--drain seconds (60). Output in --out DIR: samples.jsonl, soak.png,
verdict.md (the table), summary.json, and the node's files (run/).
Exit status: 0 the verdict passed, 1 it failed, 2 the soak could not run.

    scripts/soak --minutes 30 --out soak-30min
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
#: the checkout (scripts/soak is there)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reliability import soakstats  # noqa: E402
from tests.reliability.soakstats import Sample  # noqa: E402

#: Hits: answers the proxy (or the cache) has after the first ask.
HOT = ["sst.das", "sst.dds", "sst.dods", "series.das", "series.dods", "sst.dods?time[0:1:2]", "long.das",
       "grid.das", "timeseries.dds"]
#: The datasets whose files change (ooidx.demo.sample), refreshed after each change.
CHANGING = ("timeseries", "profile", "grid")


#: With --tracemalloc: the daemon traces its allocations and writes a snapshot on SIGUSR2 (to the path in
#: OOIDX_SOAK_TRACEMALLOC, numbered), at the end of the warm-up and at the end of the load.
TRACEMALLOC_PRELUDE = (
    "import os, signal, tracemalloc, itertools\n"
    "tracemalloc.start(12)\n"
    "_n = itertools.count(1)\n"
    "signal.signal(signal.SIGUSR2, lambda *_: tracemalloc.take_snapshot().dump("
    "os.environ['OOIDX_SOAK_TRACEMALLOC'] + '.' + str(next(_n))))\n")


def tracemalloc_report(first: Path, second: Path, limit: int = 25) -> str:
    """What grew between two snapshots, by traceback (the largest first)."""
    import tracemalloc
    a, b = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(second))
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    a, b = a.filter_traces(keep), b.filter_traces(keep)
    lines = []
    for stat in b.compare_to(a, "traceback")[:limit]:
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks (now {stat.size / 1024:.1f} KiB)")
        lines.extend("    " + line for line in stat.traceback.format(limit=8))
    return "\n".join(lines)


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------- #
# looking from outside


def rss_mb(pid: int) -> float:
    """The resident memory of C{pid} and its children (process: child components), MB."""
    total = 0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024.0


def children(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def fds(pid: int) -> int:
    total = 0
    for p in [pid] + children(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total


def pending(web_port: int) -> Tuple[float, Dict[str, float]]:
    """magnet_pending from the node's /metrics: (sum, by kind); NaN when it does not answer."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return float("nan"), {}
    kinds: Dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("magnet_pending{"):
            key, _, value = line.rpartition(" ")
            kind = key.split('kind="', 1)[1].split('"', 1)[0]
            kinds[kind] = float(value)
    return (sum(kinds.values()) if kinds else float("nan")), kinds


def local_ctl(*args: str) -> Tuple[int, str]:
    """rabbitmqctl of the machine's default node: (exit status, output)."""
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def queues(ctl: Any, vhost: str) -> Dict[str, int]:
    """name -> messages (ready and unacknowledged) of every queue in C{vhost}."""
    status, text = ctl("list_queues", "-p", vhost, "name", "messages", "-q", "--no-table-headers")
    if status != 0:
        raise RuntimeError(f"rabbitmqctl list_queues: {text.strip()[-500:]}")
    out = {}
    for line in text.splitlines():
        parts = line.rsplit("\t", 1)
        if len(parts) == 2 and parts[1].strip().isdigit():
            out[parts[0]] = int(parts[1])
    return out


# --------------------------------------------------------------------------- #
# the load


class Stoppable:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: List[threading.Thread] = []
        self.problems: List[str] = []

    def spawn(self, target: Any, *args: Any) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception:  # noqa: BLE001 - a load thread's failure is reported, not fatal
                self.problems.append(traceback.format_exc(limit=3)[-800:])
        t = threading.Thread(target=guarded, daemon=True)
        t.start()
        self.threads.append(t)

    def halt(self, timeout: float = 30.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


class DapClients(Stoppable):
    """Clients of the proxy, each on a kept-alive connection: hits and fresh misses."""

    def __init__(self, proxy_port: int, clients: int, pause: float, miss_share: float = 0.3) -> None:
        super().__init__()
        self.proxy_port = proxy_port
        self.pause = pause
        self.miss_share = miss_share
        self.fresh = itertools.count(1)
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: List[str] = []
        for i in range(clients):
            self.spawn(self._run, i)

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=90)
        while not self.stop.is_set():
            if rnd.random() < self.miss_share:
                n = next(self.fresh)
                path = f"long.dods?time[{n % 997}:1:{n % 997 + 1 + n // 997}]"
            else:
                path = rnd.choice(HOT)
            try:
                conn.request("GET", "/datasets/" + path)
                r = conn.getresponse()
                body = r.read()
                status = r.status
            except (OSError, http.client.HTTPException) as e:
                status, body = None, f"{type(e).__name__}: {e}".encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=90)
            with self.lock:
                self.requests += 1
                if status != 200:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {path}: {status} {body[:160]!r}")
            self.stop.wait(self.pause)
        conn.close()


class Webhook:
    """A webhook receiver on loopback: answers the challenge, counts what it gets."""

    def __init__(self) -> None:
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                answer = b"{}"
                if isinstance(body, dict) and body.get("type") == "webhook.verification":
                    answer = json.dumps({"challenge": body["challenge"]}).encode()
                else:
                    outer.posts += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class EventStream(Stoppable):
    """A person's subscription read as Server-Sent Events, dropped and resumed
    (Last-Event-ID) every C{every} seconds."""

    def __init__(self, web_port: int, token: str, path: str, every: float) -> None:
        super().__init__()
        self.web_port, self.token, self.path, self.every = web_port, token, path, every
        self.events = 0
        self.reconnects = 0
        self.last_id: Optional[str] = None
        self.conn: Optional[http.client.HTTPConnection] = None
        self.spawn(self._run)

    def halt(self, timeout: float = 30.0) -> None:
        """Stop, dropping the stream now (its reader would wait for the next keep-alive)."""
        self.stop.set()
        conn = self.conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(2)
            except OSError:
                pass
        super().halt(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
            if self.last_id:
                headers["Last-Event-ID"] = self.last_id
            # longer than the stream's keep-alive (15 s): a socket that timed out cannot be read again
            conn = self.conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30)
            until = time.monotonic() + self.every
            try:
                conn.request("GET", self.path, headers=headers)
                r = conn.getresponse()
                if r.status != 200:
                    raise RuntimeError(f"events stream {self.path}: {r.status} {r.read()[:200]!r}")
                while not self.stop.is_set() and time.monotonic() < until:
                    line = r.readline()
                    if not line:
                        break
                    if line.startswith(b"id:"):
                        self.last_id = line[3:].strip().decode()
                        self.events += 1
            except (OSError, http.client.HTTPException):
                self.stop.wait(1)
            finally:
                conn.close()
            self.reconnects += 1


class PubSubChurn(Stoppable):
    """pub_sub subscribers (pika consumers acking what they get) that come and
    go, and publications every 2 s; people's subscriptions that come and go."""

    def __init__(self, node: Any, broker_url: str, every: float, person_token: str) -> None:
        super().__init__()
        self.node, self.url, self.every, self.person_token = node, broker_url, every, person_token
        self.consumed = 0
        self.subscribed = 0
        self.published = 0
        self.people_churn = 0
        self.alive: List[Tuple[str, threading.Event]] = []
        self.consumers: List[threading.Thread] = []
        self.spawn(self._churn)
        self.spawn(self._publish)

    def _consumer(self, address: str, stop: threading.Event) -> None:
        """A subscriber's thread: it stays after L{halt} (the queues must drain), until L{halt_consumers}."""
        def guarded() -> None:
            try:
                self._consume(address, stop)
            except Exception:  # noqa: BLE001 - reported with the verdict
                self.problems.append(traceback.format_exc(limit=3)[-800:])
        t = threading.Thread(target=guarded, daemon=True)
        t.start()
        self.consumers = [c for c in self.consumers if c.is_alive()] + [t]

    def _consume(self, address: str, stop: threading.Event) -> None:
        import pika
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=50)

            def got(channel: Any, method: Any, properties: Any, body: bytes) -> None:
                channel.basic_ack(method.delivery_tag)
                self.consumed += 1

            ch.basic_consume(address, got)
            while not stop.is_set():
                conn.process_data_events(time_limit=0.5)
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def _churn(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"soak-{n}"
            status, answer = self.node.call("pub_sub", "subscribe", regex=r"^(dataset\.|soak\.)", name=name)
            if status == 200:
                self.subscribed += 1
                stop = threading.Event()
                self.alive.append((name, stop))
                self._consumer(answer["result"]["address"], stop)
            else:
                self.problems.append(f"pub_sub.subscribe: {status} {answer}")
            while len(self.alive) > 4:
                old, old_stop = self.alive.pop(0)
                old_stop.set()
                self.node.call("pub_sub", "unsubscribe", name=old)
            # a person's subscription made and removed again
            status, made = self.node.api("POST", "/api/subscriptions", {"kind": "events", "regex": "saved"},
                                         token=self.person_token)
            if status == 201:
                self.node.api("DELETE", f"/api/subscriptions/{made['id']}", token=self.person_token)
                self.people_churn += 1
            else:
                self.problems.append(f"a person's subscription: {status} {made}")
            self.stop.wait(self.every)

    def _publish(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            status, _ = self.node.call("pub_sub", "publish", topic="soak.tick", message={"i": i})
            if status == 200:
                self.published += 1
            self.stop.wait(2.0)

    def halt_consumers(self, timeout: float = 10.0) -> None:
        for _, stop in self.alive:
            stop.set()
        for t in self.consumers:
            t.join(timeout)


class ChangingUpstream(Stoppable):
    """The changing datasets' files written anew (ooidx.demo.sample), then refreshed through the API."""

    def __init__(self, node: Any, directory: Path, every: float) -> None:
        super().__init__()
        self.node, self.directory, self.every = node, directory, every
        self.changes = 0
        self.refreshes = 0
        self.spawn(self._run)

    def _run(self) -> None:
        from ooidx.demo import sample
        step = 0
        while not self.stop.wait(self.every):
            step += 1
            sample.write_all(self.directory, step)
            self.changes += 1
            for name in CHANGING:
                status, answer = self.node.api("POST", f"/api/datasets/{name}/refresh", {})
                if status == 202:
                    self.refreshes += 1
                else:
                    self.problems.append(f"refresh {name}: {status} {answer}")


# --------------------------------------------------------------------------- #
# the run


def run(options: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "ooidx"))
    from dap_upstream import Upstream, make_files
    from ooidx.demo import sample
    from tests.reliability.hostile_node import own_vhost, start_node, stop_node
    from tests.support import vhost as support_vhost

    began = time.monotonic()
    out = Path(options.out).resolve()
    workdir = out / "run"
    if workdir.exists():
        shutil.rmtree(workdir)  # a node of an earlier run left its datasets there
    workdir.mkdir(parents=True)
    seconds = options.minutes * 60.0
    warmup = options.warmup if options.warmup is not None else min(300.0, seconds / 3)
    broker = options.broker
    rabbit = None
    if broker == "private":
        from tests.rabbitmq import PrivateRabbitMQ, ensure_rabbitmq_server
        rabbit = PrivateRabbitMQ(tmpdir=str(out / "rabbitmq"), bindir=ensure_rabbitmq_server(log=log))
        rabbit.start()
        log(f"private RabbitMQ node {rabbit.nodename} at {rabbit.url}")
        vhost_url, delete_vhost, vhost = rabbit.url, (lambda: None), "/"

        def ctl(*args: str) -> Tuple[int, str]:
            done = rabbit.ctl(*args, timeout=60)
            return done.returncode, done.stdout.decode(errors="replace")
    else:
        if not support_vhost.manageable(broker):
            log(f"cannot manage the broker of {broker} with rabbitmqctl here (queue depths need it); "
                f"--broker private starts a node of the soak's own")
            return 2
        vhost_url, delete_vhost = own_vhost(broker, "soak")
        from urllib.parse import unquote
        vhost = unquote(vhost_url.rsplit("/", 1)[1])
        ctl = local_ctl
    updir = workdir / "upstream"
    make_files(updir)
    sample.write_all(updir, 0)
    hook = Webhook()
    up = Upstream(updir)
    node = None
    loads: List[Stoppable] = []
    samples: List[Sample] = []
    try:
        if options.tracemalloc:
            os.environ["OOIDX_SOAK_TRACEMALLOC"] = str(out / "tracemalloc")
        node = start_node(workdir, "soak", broker=vhost_url, upstream_port=up.port,
                          prelude=TRACEMALLOC_PRELUDE if options.tracemalloc else None,
                          extra_security={"allow_hosts": [f"127.0.0.1:{up.port}", f"127.0.0.1:{hook.port}"]},
                          timeouts={"shutdown": 5, "rpc": 10},
                          logging={"format": "text", "level": "info"})
        log(f"node pid {node.pid}, proxy :{node.proxy_port}, web :{node.web_port}, vhost {vhost}, "
            f"upstream :{up.port}")
        for name in ("sst", "series", "long", "profile", "timeseries"):
            status, answer = node.register(name, up.url(f"{name}.nc"))
            if status != 201:
                raise RuntimeError(f"register {name}: {status} {answer}")
        status, answer = node.api("POST", "/api/datasets", {"name": "grid", "url": up.url("grid.nc"),
                                                            "refresh": 60})
        if status != 201:
            raise RuntimeError(f"register grid: {status} {answer}")
        tokens = {}
        for person in ("soak-reader", "soak-hook", "soak-churn"):
            status, answer = node.api("POST", "/api/people", {"name": person})
            if status != 201:
                raise RuntimeError(f"person {person}: {status} {answer}")
            tokens[person] = answer["token"]
        streams = []
        for kind, regex in (("events", "saved|fetched|registered"), ("datasets", "grid|timeseries|profile")):
            status, sub = node.api("POST", "/api/subscriptions", {"kind": kind, "regex": regex},
                                   token=tokens["soak-reader"])
            if status != 201:
                raise RuntimeError(f"subscription {kind}: {status} {sub}")
            streams.append(EventStream(node.web_port, tokens["soak-reader"], sub["events"], options.sse_every))
        status, sub = node.api("POST", "/api/subscriptions", {"kind": "datasets", "regex": "grid|timeseries|profile",
                                                              "webhook": hook.url}, token=tokens["soak-hook"])
        if status != 201:
            raise RuntimeError(f"webhook subscription: {status} {sub}")
        clients = DapClients(node.proxy_port, options.clients, options.pause)
        changer = ChangingUpstream(node, updir, options.change_every)
        churn = PubSubChurn(node, vhost_url, options.churn_every, tokens["soak-churn"])
        loads = [clients, changer, churn] + streams
        producers = [clients, changer, churn]

        started = time.monotonic()

        def look(phase: str) -> Sample:
            depths = queues(ctl, vhost)
            live = {q: n for q, n in depths.items() if not q.endswith(".dead")}
            deepest = max(live.items(), key=lambda kv: kv[1], default=("", 0))
            total, kinds = pending(node.web_port)
            s = Sample(t=round(time.monotonic() - started, 1), rss_mb=round(rss_mb(node.pid), 1),
                       fds=fds(node.pid), pending=total, pending_kinds=kinds, queued=sum(live.values()),
                       deepest=deepest[1], deepest_queue=deepest[0],
                       dead=sum(n for q, n in depths.items() if q.endswith(".dead")),
                       requests=clients.requests, errors=len(clients.errors), phase=phase)
            samples.append(s)
            log(f"{phase} t={s.t:.0f}s rss={s.rss_mb:.1f}MB fds={s.fds} pending={s.pending:.0f} {kinds} "
                f"queued={s.queued} (deepest {s.deepest} {s.deepest_queue}) dead={s.dead} "
                f"requests={s.requests} errors={s.errors} events={sum(st.events for st in streams)} "
                f"webhook={hook.posts} pubsub={churn.consumed}")
            return s

        next_at = started
        snapped = False
        while time.monotonic() - started < seconds:
            if not node.alive():
                raise RuntimeError(f"the node died\n{node.describe()}")
            look("load")
            if options.tracemalloc and not snapped and time.monotonic() - started >= warmup:
                os.kill(node.pid, signal.SIGUSR2)
                snapped = True
            next_at += options.every
            time.sleep(max(0.0, next_at - time.monotonic()))
        if options.tracemalloc:
            os.kill(node.pid, signal.SIGUSR2)
        for load in producers:
            load.halt()
        stopped = time.monotonic()
        log("load stopped; the consumers stay while the queues drain")
        drained_after: Optional[float] = None
        after = 0
        while time.monotonic() - stopped < options.drain:
            s = look("drain")
            if s.queued == 0 and drained_after is None:
                drained_after = time.monotonic() - stopped
            if drained_after is not None:
                after += 1
                if after >= 2:  # the sample that found them empty, and one more for what is still pending
                    break
            time.sleep(min(options.every, 5.0))
        checks = soakstats.verdict(samples, warmup, options.every, drained_after, options.drain)
        if options.tracemalloc:
            first, second = out / "tracemalloc.1", out / "tracemalloc.2"
            for _ in range(120):
                if second.exists() and first.exists():
                    break
                time.sleep(1)
            time.sleep(2)
            report = tracemalloc_report(first, second)
            (out / "tracemalloc.txt").write_text(report + "\n")
            log(f"what grew in the daemon after the warm-up: {out}/tracemalloc.txt")
        problems = [p for load in loads for p in load.problems]
        extra = {"minutes": options.minutes, "every": options.every, "warmup_s": warmup,
                 "requests": clients.requests, "errors_sample": clients.errors[:10],
                 "sse_events": sum(st.events for st in streams), "sse_reconnects": sum(st.reconnects for st in streams),
                 "webhook_posts": hook.posts, "pubsub_subscribed": churn.subscribed,
                 "pubsub_consumed": churn.consumed, "published": churn.published,
                 "people_subscriptions_churned": churn.people_churn, "upstream_changes": changer.changes,
                 "refreshes": changer.refreshes, "load_problems": problems[:10],
                 "tracebacks_in_log": node.tracebacks()[:5]}
        soakstats.write_samples(samples, out / "samples.jsonl")
        table = soakstats.table(checks)
        (out / "verdict.md").write_text(table + "\n")
        (out / "summary.json").write_text(json.dumps(soakstats.summary(checks, extra), indent=2) + "\n")
        soakstats.plot(samples, warmup, out / "soak.png",
                       title=f"ooidx soak: {options.minutes:g} min of mixed load on RabbitMQ, sampled every "
                             f"{options.every:g} s")
        print(table)
        print(json.dumps(extra, indent=2))
        log(f"verdict: {'PASS' if soakstats.passed(checks) else 'FAIL'}; {out}/soak.png, verdict.md, summary.json "
            f"({time.monotonic() - began:.0f} s in all)")
        return 0 if soakstats.passed(checks) else 1
    except Exception:
        traceback.print_exc()
        if samples:
            soakstats.write_samples(samples, out / "samples.jsonl")
        return 2
    finally:
        for load in loads:
            load.halt(10)
        for load in loads:
            if isinstance(load, PubSubChurn):
                load.halt_consumers()
        if node is not None:
            log("stopping the node")
            stop_node(node)
        up.stop()
        hook.close()
        delete_vhost()
        if rabbit is not None:
            rabbit.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (30)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (10)")
    parser.add_argument("--out", default=".soak", help="where the samples, plot and verdict go (.soak)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds left out of the verdict at the start (a third of the run, at most 300)")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds the queues have to drain (60)")
    parser.add_argument("--clients", type=int, default=3, help="DAP clients through the proxy (3)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds a DAP client waits between requests")
    parser.add_argument("--change-every", type=float, default=30.0, help="seconds between upstream changes (30)")
    parser.add_argument("--churn-every", type=float, default=20.0, help="seconds between pub_sub subscribers (20)")
    parser.add_argument("--sse-every", type=float, default=60.0, help="seconds an event stream stays open (60)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the daemon's allocations; write what grew after the warm-up to tracemalloc.txt")
    parser.add_argument("--broker", default=os.environ.get("OOIDX_SOAK_BROKER", "amqp://guest:guest@127.0.0.1:5672/"),
                        help="a RabbitMQ that rabbitmqctl here manages (a vhost of the soak's own is made), "
                             "or 'private': a RabbitMQ node of the soak's own, stopped at the end")
    options = parser.parse_args(argv)
    if options.minutes <= 0 or options.every <= 0:
        parser.error("--minutes and --every must be positive")
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
