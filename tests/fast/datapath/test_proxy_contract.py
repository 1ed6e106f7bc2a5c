"""The proxy (ooidx.datapath.proxy) through its own site, spoken to in HTTP/1.1
bytes with no socket (tests.fast.web.edge_support's in-memory connection), on
a memory:// bus on a Clock, with a fake controller that streams the answer to
the request's address: forward proxy and by-name requests, the answer relayed,
small cache answers held and answered without the bus (and dropped on a
change), error replies, timeouts, an absent controller, the link going down,
csv. Statuses and the error kind header only: the error body's shape is
another helper's. The RabbitMQ version stays in tests/ooidx/test_proxyng.py."""
from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional

from twisted.internet import defer

import magnet
from magnet import operation, rpc

from ooidx import events
from ooidx.datapath.cache import PURGE_FANOUT
from ooidx.datapath.proxy import Proxy
from ooidx.errors import Forbidden, UnknownDataset, UpstreamError

from tests.fast.core.support import FastCase, bus_down, bus_up, cases, drive, expand, settle
from tests.fast.web.edge_support import Connection, Response, edge_reactor, request_bytes
from tests.support.doubles import FakeStore

UP = "http://data.example.org/opendap/sst.nc"


class FakeController:
    """route: answers at the request's address as the cache or a fetcher would."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.asked: List[Dict[str, Any]] = []
        self.records: List[Dict[str, Any]] = []
        self.mode = "stream"
        self.via = "cache"
        self.body = b"Dataset { Int32 x; } sst;\n"
        self.registry = {"sst": UP}
        self.routes = 0
        self.later: List[Any] = []  # mode "later": (address, request_id), for the test to answer

    def _routed(self, url: str, method: str = "GET", dataset: Optional[str] = None, *, address: str,
                request_id: Optional[str] = None) -> Any:
        self.asked.append({"url": url, "method": method, "dataset": dataset})
        if self.mode == "forbidden":
            raise Forbidden(f"{url} is under no registered dataset")
        if self.mode == "upstream":
            raise UpstreamError("connection refused")
        if self.mode == "stream":
            metadata = {"status": 200, "reason": "OK", "url": url, "source": self.via, "length": len(self.body),
                        "headers": [["Content-Type", "text/plain"], ["Connection", "close"],
                                    ["Set-Cookie", "a=b"]]}
            self.bus.send_stream(address, metadata, [self.body], correlation_id=request_id)
        if self.mode == "later":
            self.later.append((address, request_id))
        return {"via": self.via}  # "silent": no stream ever comes

    def answer_later(self) -> List[Any]:
        """Stream the answers held in mode "later"; returns the sends' failures (an address closed meanwhile)."""
        later, self.later = self.later, []
        failed: List[Any] = []
        for address, request_id in later:
            self.bus.send_stream(address, {"status": 200, "reason": "OK", "source": self.via,
                                           "length": len(self.body), "headers": [["Content-Type", "text/plain"]]},
                                 [self.body], correlation_id=request_id).addErrback(failed.append)
        return failed

    @operation
    def route(self, url: Optional[str] = None, dataset: Optional[str] = None, suffix: str = "",
              query: Optional[str] = None, method: str = "GET", *, address: str,
              request_id: Optional[str] = None) -> Any:
        """route as the controller answers it: a dataset by name resolved from its registry."""
        self.routes += 1
        if dataset is not None:
            if dataset not in self.registry:
                raise UnknownDataset(f"no dataset {dataset!r} is registered")
            url = self.registry[dataset] + suffix + ("?" + query if query is not None else "")
        return self._routed(url, method, dataset, address=address, request_id=request_id)

    @operation
    def record(self, **kwargs: Any) -> None:
        self.records.append(kwargs)


class FakeCsv:
    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.asked: List[Dict[str, Any]] = []

    @operation
    def render(self, **kwargs: Any) -> None:
        self.asked.append(kwargs)
        self.bus.send_stream(kwargs["address"], {"status": 200, "headers": [["Content-Type", "text/csv"]],
                                                 "length": 4}, [b"x,y\n"], correlation_id=kwargs["request_id"])


@expand
class ProxyTests(FastCase):
    def start(self, *, controller: bool = True, **options: Any) -> Proxy:
        self.clock = edge_reactor(self)
        self.bus = magnet.connect(f"memory://proxy-{uuid.uuid4().hex}", self.clock, node="n", rpc_timeout=5)
        self.store = FakeStore()
        self.store.data["dataset:sst"] = {"name": "sst", "url": UP, "status": "registered"}
        self.controller = FakeController(self.bus)
        self.csv = FakeCsv(self.bus)
        options.setdefault("answer_timeout", 20.0)
        options.setdefault("lookup_timeout", 5.0)
        proxy = Proxy("proxyng", self.bus, node="n", clock=self.clock, reactor=self.clock, port=0,
                      interface="127.0.0.1", **options)

        @defer.inlineCallbacks
        def go() -> Any:
            yield bus_up(self.bus)
            yield self.bus.serve("attribute_store", self.store)
            yield self.bus.serve("csv", self.csv)
            if controller:
                yield self.bus.serve("controller", self.controller)
            else:
                yield self.bus.transport.delete_queue("controller")
            yield proxy.start()

        drive(self, self.clock, go())
        self.site = self.clock.tcpServers[-1][1]
        self.proxy = proxy
        self.addCleanup(self.stop)
        return proxy

    def stop(self) -> None:
        drive(self, self.clock, bus_down(self.bus, self.proxy))

    def open(self, target: str, method: str = "GET", peer: str = "127.0.0.1") -> Connection:
        connection = Connection(self.site, peer=peer)
        connection.send(request_bytes(method, target, None, {"Host": "127.0.0.1:8080", "Connection": "close"}))
        return connection

    def get(self, target: str, method: str = "GET", seconds: float = 30.0) -> Response:
        connection = self.open(target, method)
        settle(self.clock)
        waited = 0.0
        while True:
            response = connection.response(method == "HEAD")
            if response is not None and response.complete:
                connection.close()
                return response
            if waited >= seconds:
                self.fail(f"no whole response to {target}: {connection.transport.value()[:300]!r}")
            self.clock.advance(0.05)
            settle(self.clock)
            waited += 0.05

    def stop_now(self) -> List[Any]:
        """Begin the proxy's stop (SIGTERM) without waiting for it; what it fires with is appended."""
        stopped: List[Any] = []
        self.proxy.stopService().addBoth(stopped.append)
        settle(self.clock)
        return stopped

    def test_stop_serves_the_requests_read_and_answers_later_ones_503(self) -> None:
        """SIGTERM: a request already read is served whole; an idle keep-alive
        connection is closed; a request read after the stop began is answered
        503 ShuttingDown, Connection: close, Retry-After, as a DAP 2 error."""
        self.start(shutdown_timeout=5.0)
        idle = Connection(self.site)  # a keep-alive connection, idle after its first answer
        idle.send(request_bytes("GET", UP + ".das", None, {"Host": "127.0.0.1:8080"}))
        settle(self.clock)
        self.assertEqual(idle.response().status, 200)
        answered = idle.transport.value()
        self.controller.mode = "later"
        reading = Connection(self.site)  # keep-alive: the stop must close it after its answer, and say so
        reading.send(request_bytes("GET", UP + ".dds", None, {"Host": "127.0.0.1:8080"}))
        settle(self.clock)
        self.assertEqual(len(self.controller.later), 1)
        stopped = self.stop_now()
        self.assertTrue(idle.transport.disconnecting)
        self.assertEqual(idle.transport.value(), answered)  # closed between requests, nothing more written
        self.assertFalse(reading.transport.disconnecting)
        late = Connection(self.site)  # one the port had accepted (its backlog) before it closed
        late.send(request_bytes("GET", UP + ".das", None, {"Host": "127.0.0.1:8080"}))
        settle(self.clock)
        refused = late.response()
        self.assertEqual((refused.status, refused.header("X-Ooidx-Error")), (503, "ShuttingDown"))
        self.assertEqual(refused.header("Retry-After"), "5")
        self.assertEqual(refused.header("Connection"), "close")
        self.assertEqual(refused.header("Content-Description"), "dods_error")
        self.assertTrue(late.transport.disconnecting)
        self.assertEqual(stopped, [])  # waits for the request in progress
        self.controller.answer_later()
        settle(self.clock)
        served = reading.response()
        self.assertEqual((served.status, served.body), (200, self.controller.body))
        self.assertEqual(served.header("Connection"), "close")
        self.assertTrue(reading.transport.disconnecting)
        for connection in (idle, reading, late):
            connection.close()
        self.clock.advance(0.1)
        settle(self.clock)
        self.assertEqual(stopped, [None])
        self.assertEqual(self.proxy.active, 0)

    def test_stop_bound_answers_what_is_still_waiting_503(self) -> None:
        """A request whose answer has not started within timeouts.shutdown is
        answered 503 then (not closed silently), and its exchange ends."""
        self.start(shutdown_timeout=3.0)
        self.controller.mode = "later"
        waiting = self.open(UP + ".dds")
        settle(self.clock)
        stopped = self.stop_now()
        self.clock.advance(2.9)
        settle(self.clock)
        self.assertEqual((stopped, waiting.transport.value()), ([], b""))
        self.clock.advance(0.2)
        settle(self.clock)
        response = waiting.response()
        self.assertEqual((response.status, response.header("X-Ooidx-Error")), (503, "ShuttingDown"))
        self.assertEqual(response.header("Connection"), "close")
        self.assertTrue(waiting.transport.disconnecting)
        self.assertEqual(stopped, [None])
        self.assertEqual(self.proxy.active, 0)
        failed = self.controller.answer_later()  # too late: its address is closed, nothing more is written
        settle(self.clock)
        self.assertEqual([f.type.__name__ for f in failed], ["Unroutable"])
        self.assertEqual(waiting.response().status, 503)

    def test_forward_proxy(self) -> None:
        self.start()
        r = self.get(UP + ".dds?time[0:1:2]")
        self.assertEqual((r.status, r.body), (200, self.controller.body))
        self.assertEqual(r.header("Content-Type"), "text/plain")
        self.assertIsNone(r.header("Set-Cookie"))
        self.assertEqual(self.controller.asked, [{"url": UP + ".dds?time[0:1:2]", "method": "GET",
                                                  "dataset": None}])
        self.assertEqual(self.proxy.active, 0)

    def test_by_name_and_held(self) -> None:
        proxy = self.start(record_interval=1.0)
        r = self.get("/datasets/sst.dds?x")
        self.assertEqual((r.status, r.body), (200, self.controller.body))
        self.assertEqual(self.controller.asked[0], {"url": UP + ".dds?x", "method": "GET", "dataset": "sst"})
        self.assertEqual(len(proxy.hot), 1)  # the cache served it: held
        again = self.get("/datasets/sst.dds?x")
        self.assertEqual((again.status, again.body), (200, self.controller.body))
        self.assertEqual(len(self.controller.asked), 1)  # answered at the proxy
        self.assertEqual(proxy.hot.hits, 1)
        self.clock.advance(1.0)
        settle(self.clock)
        self.assertEqual([(rec["url"], rec["count"]) for rec in self.controller.records], [(UP + ".dds?x", 1)])
        # a change of the dataset drops what is held (and the remembered base URL)
        drive(self, self.clock, events.emit(self.bus, "fetched", "sst", url=UP))
        settle(self.clock)
        self.assertEqual(len(proxy.hot), 0)
        self.get("/datasets/sst.dds?x")
        self.assertEqual(len(self.controller.asked), 2)
        drive(self, self.clock, self.bus.send(PURGE_FANOUT, rpc.request("purge", {"name": "sst", "base_url": UP})))
        settle(self.clock)
        self.assertEqual(len(proxy.hot), 0)

    def test_by_name_is_one_call_to_the_controller(self) -> None:
        """Issue 15: the proxy names what it wants once (controller.route); it reads
        no dataset record itself (the controller has the registry in memory)."""
        self.start()
        sent: List[Any] = []
        send = self.bus.send
        self.monkeypatch().setattr(self.bus, "send", lambda address, message, **kw: (
            sent.append((address, message.headers.get("op") if hasattr(message, "headers") else None)),
            send(address, message, **kw))[1])
        calls: List[Any] = []
        call = self.bus.call
        self.monkeypatch().setattr(self.bus, "call", lambda *a, **kw: (calls.append(a), call(*a, **kw))[1])
        r = self.get("/datasets/sst.dds?x")
        self.assertEqual((r.status, r.body), (200, self.controller.body))
        self.assertEqual(calls, [])  # no attribute_store.get
        # (the fake controller's reply and stream to the request's address go on the same bus)
        self.assertEqual([a for a, _ in sent if not a.startswith("magnet.listen.")], ["controller"])
        self.assertEqual(self.controller.routes, 1)
        self.assertEqual(self.controller.asked, [{"url": UP + ".dds?x", "method": "GET", "dataset": "sst"}])

    def test_a_fetchers_answer_is_not_held(self) -> None:
        proxy = self.start()
        self.controller.via = "fetcher"
        self.assertEqual(self.get(UP + ".das").status, 200)
        self.assertEqual(len(proxy.hot), 0)

    def test_head(self) -> None:
        self.start()
        r = self.get(UP + ".dds", method="HEAD")
        self.assertEqual((r.status, r.body), (200, b""))
        self.assertEqual(self.controller.asked[0]["method"], "HEAD")

    @cases("target, method, status, kind", [
        (UP + ".dds", "POST", 405, "MethodNotAllowed"),
        ("/nowhere", "GET", 404, "NotFound"),
        ("/datasets/-x.dds", "GET", 400, "InvalidName"),
        ("ftp://data.example.org/x", "GET", 400, "InvalidURL"),
        ("/datasets/nope.dds", "GET", 404, "UnknownDataset"),
    ])
    def test_refused_before_the_bus(self, target: str, method: str, status: int, kind: str) -> None:
        self.start()
        r = self.get(target, method=method)
        self.assertEqual((r.status, r.header("X-Ooidx-Error")), (status, kind))
        self.assertEqual(r.header("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(self.controller.asked, [])

    @cases("mode, status, kind", [("forbidden", 403, "Forbidden"), ("upstream", 502, "UpstreamError")])
    def test_error_replies(self, mode: str, status: int, kind: str) -> None:
        self.start()
        self.controller.mode = mode
        r = self.get(UP + ".dds")
        self.assertEqual((r.status, r.header("X-Ooidx-Error")), (status, kind))
        self.flushLoggedErrors()  # the bus logs an operation's failure

    def test_no_answer_in_time_is_504(self) -> None:
        self.start(answer_timeout=3.0)
        self.controller.mode = "silent"
        r = self.get(UP + ".dds", seconds=10)
        self.assertEqual((r.status, r.header("X-Ooidx-Error")), (504, "GatewayTimeout"))

    def test_no_controller_is_503(self) -> None:
        self.start(controller=False)
        r = self.get(UP + ".dds")
        self.assertEqual(r.status, 503)

    def test_link_down_answers_the_waiting_503(self) -> None:
        proxy = self.start()
        self.controller.mode = "silent"
        connection = self.open(UP + ".dds")
        settle(self.clock)
        self.assertEqual(len(proxy._waiting), 1)
        proxy._link_changed(True)  # up: nothing changes
        proxy._link_changed(False)
        settle(self.clock)
        response = connection.response()
        self.assertEqual((response.status, response.header("X-Ooidx-Error")), (503, "Unavailable"))

    def test_too_many_from_one_client_is_429(self) -> None:
        proxy = self.start(max_per_client=1)
        self.controller.mode = "silent"
        first = self.open(UP + ".dds", peer="192.0.2.7")
        settle(self.clock)
        second = self.open(UP + ".das", peer="192.0.2.7")
        settle(self.clock)
        response = second.response()
        self.assertEqual((response.status, response.header("Retry-After")), (429, "1"))
        self.assertEqual(proxy.refused, 1)
        first.close()  # the client hangs up; its slot is held until the wait for the answer ends
        self.clock.advance(proxy.answer_timeout)
        settle(self.clock)
        self.assertEqual(proxy._per_client, {})

    def test_csv_goes_to_the_csv_component(self) -> None:
        self.start()
        r = self.get("/datasets/sst.csv?x")
        self.assertEqual((r.status, r.body), (200, b"x,y\n"))
        self.assertEqual(self.csv.asked[0]["url"], UP + ".dods?x")
        self.assertEqual(self.controller.asked, [])

    def test_a_request_body_is_refused(self) -> None:
        self.start()
        connection = Connection(self.site)
        connection.send(request_bytes("GET", UP + ".dds", b"x" * (64 * 1024 + 1),
                                      {"Host": "127.0.0.1:8080"}))
        settle(self.clock)
        self.assertIn(b"413 Payload Too Large", connection.transport.value())


class BrokerBlockedTests(FastCase):
    """The broker blocks publishers (a memory or disk alarm, simulated by the
    memory broker's L{magnet.memory.MemoryBroker.block}): a miss is answered
    503 BrokerBlocked at once with a Retry-After naming the alarm, and so is a
    request already waiting for its answer, never at the 75 s answer timeout."""

    def start(self) -> Proxy:
        proxy = ProxyTests.start(self, answer_timeout=75.0, lookup_timeout=30.0)  # type: ignore[arg-type]
        self.broker = self.bus.transport.broker
        self.addCleanup(lambda: self.broker.blocked and self.broker.unblock())
        return proxy

    stop = ProxyTests.stop
    open = ProxyTests.open
    get = ProxyTests.get

    def test_a_miss_while_blocked_is_503_at_once(self) -> None:
        self.start()
        self.broker.block("low on memory")
        began = self.clock.seconds()
        r = self.get(UP + ".dds", seconds=1.0)
        self.assertEqual((r.status, r.header("X-Ooidx-Error"), r.header("Retry-After")), (503, "BrokerBlocked", "10"))
        self.assertIn(b"low on memory", r.body)
        self.assertEqual(self.clock.seconds() - began, 0.0)
        self.assertEqual(self.controller.asked, [])
        # the block lifts: served again
        self.broker.unblock()
        self.assertEqual(self.get(UP + ".dds").status, 200)

    def test_a_request_waiting_for_its_answer_is_503_when_the_block_starts(self) -> None:
        proxy = self.start()
        self.controller.mode = "silent"  # asked, but the answer would be published later
        connection = self.open(UP + ".dds")
        settle(self.clock)
        self.assertEqual(len(self.controller.asked), 1)
        self.assertIsNone(connection.response())
        self.assertEqual(len(proxy._waiting), 1)  # asked; waiting for the answer
        self.broker.block("low on disk")
        settle(self.clock)
        response = connection.response()
        self.assertEqual((response.status, response.header("X-Ooidx-Error"), response.header("Retry-After")),
                         (503, "BrokerBlocked", "10"))
        self.assertIn(b"low on disk", response.body)
        self.assertEqual(proxy.active, 0)
        self.assertEqual(proxy._exchanges, set())

    def test_a_request_still_asking_when_the_block_starts_is_503_at_once(self) -> None:
        proxy = self.start()
        self.broker.block("low on memory")
        # the block began after the request's publish was written: it is held (as the AMQP transport holds it)
        proxy._blocked_changed(None)  # a lifted block changes nothing
        connection = self.open("/datasets/sst.dds")
        settle(self.clock)
        self.assertEqual(connection.response().status, 503)
        self.broker.unblock()
        self.get("/datasets/sst.dds")  # the base URL is remembered now
        self.controller.mode = "silent"
        d = defer.Deferred()
        real_tell = self.bus.tell
        self.bus.tell = lambda *a, **k: d  # type: ignore[method-assign]
        waiting = self.open("/datasets/sst.das")
        settle(self.clock)
        self.assertIsNone(waiting.response())
        self.broker.block("low on memory")
        settle(self.clock)
        self.assertEqual(waiting.response().header("X-Ooidx-Error"), "BrokerBlocked")
        d.errback(magnet.Blocked("too late"))  # what the held publish says later is dropped
        self.bus.tell = real_tell  # type: ignore[method-assign]
        settle(self.clock)
        self.assertEqual(proxy._exchanges, set())

    def test_a_timeout_while_the_broker_blocks_is_503_blocked(self) -> None:
        # a request whose publish went out just before the block: its confirm is held, the lookup times out
        self.start()
        d: defer.Deferred = defer.Deferred()
        self.bus.tell = lambda *a, **k: d  # type: ignore[method-assign]
        connection = self.open(UP + ".dds")
        settle(self.clock)
        self.broker.blocked = "low on memory"  # the broker blocks, but its notice has not come yet
        self.clock.advance(30.0)
        settle(self.clock)
        response = connection.response()
        self.assertEqual((response.status, response.header("X-Ooidx-Error")), (503, "BrokerBlocked"))
        self.broker.blocked = None
