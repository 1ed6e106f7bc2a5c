"""An HTTP edge that stops gracefully (ooidx.http.edge, EdgePort.stop with a
drain bound; the proxy's stop on SIGTERM): no request is ever answered by a
silent close. No port, no reactor: connections are StringTransports, time is
a task.Clock, the listening port a fake that behaves as Twisted's (it stops
reading at once and closes its socket a reactor turn later).

  - idle keep-alive connections are closed at once, a request in progress is
    served and its connection closed after it (Connection: close);
  - a request read after the stop began (on a connection that was mid-request,
    or one taken from the port's backlog) is answered 503, Connection: close,
    Retry-After;
  - the port's backlog is accepted just before its socket closes (answered,
    not reset);
  - at the drain bound a request whose answer has not started is answered 503
    and its owner sees its client gone; one whose answer started is cut;
  - with no drain the edge closes everything at once (the web port).
"""
from __future__ import annotations

import inspect
from typing import Any, List

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from ooidx.http import edge
from ooidx.http.edge import EdgePort, TrackingSite, listen_spec

GET = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Held(Resource):
    """Every request is held (NOT_DONE_YET) until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: List[server.Request] = []

    def render(self, request: server.Request) -> Any:
        self.held.append(request)
        return server.NOT_DONE_YET


def answer(request: server.Request, body: bytes = b"whole") -> None:
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.write(body)
    request.finish()


class FakePort:
    """A listening port as Twisted's tcp.Port behaves at stop: stopListening
    stops reading now and calls connectionLost (which closes the socket) a
    reactor turn later; doRead accepts what is queued (the kernel's backlog)."""

    def __init__(self, site: TrackingSite, clock: task.Clock) -> None:
        self.site = site
        self.clock = clock
        self.numberAccepts = 1
        self.backlog: List[bytes] = []  # what each queued client has sent
        self.accepted: List[Any] = []
        self.events: List[str] = []

    def doRead(self) -> None:
        for _ in range(min(self.numberAccepts, len(self.backlog))):
            sent = self.backlog.pop(0)
            channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000 + len(self.accepted)))
            transport = StringTransport()
            channel.makeConnection(transport)
            self.accepted.append((channel, transport, sent))
            self.events.append("accepted")

    def connectionLost(self, reason: Any) -> None:
        self.events.append("socket closed")
        self.reset = len(self.backlog)  # what a real socket's close would reset

    def stopListening(self) -> Deferred:
        self.events.append("stopped reading")
        return task.deferLater(self.clock, 0, self.connectionLost, None)


class StoppingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.resource = Held()
        self.site = TrackingSite(self.resource, reactor=self.clock)
        self.edge = EdgePort(listen_spec(0, None, default_port=0))
        self.edge.site = self.site
        self.port = FakePort(self.site, self.clock)
        self.edge.listening = self.port

    def connect(self, data: bytes = b"") -> tuple:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        if data:
            channel.dataReceived(data)
        return channel, transport

    def stop(self, drain: float = 5.0) -> List[Any]:
        fired: List[Any] = []
        self.edge.stop(drain=drain, clock=self.clock).addBoth(fired.append)
        return fired

    def test_idle_closed_at_once_and_a_request_in_progress_served_then_closed(self) -> None:
        idle, idle_transport = self.connect(GET)
        answer(self.resource.held.pop())  # answered: now an idle keep-alive connection
        written = idle_transport.value()
        busy, busy_transport = self.connect(GET)
        fired = self.stop()
        self.assertTrue(idle_transport.disconnecting)
        self.assertEqual(idle_transport.value(), written)  # closed between requests: nothing more written
        self.assertFalse(busy_transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(fired, [])  # waits for the request in progress
        answer(self.resource.held.pop())
        response = busy_transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
        self.assertIn(b"Connection: close", response)
        self.assertTrue(response.endswith(b"whole"))
        self.assertTrue(busy_transport.disconnecting)
        busy.connectionLost(None)
        idle.connectionLost(None)
        self.clock.advance(edge.DRAIN_TICK)
        self.assertEqual(fired, [0])  # drained: nothing had to be cut

    def test_a_request_read_after_the_stop_began_is_answered_503_close(self) -> None:
        # a keep-alive connection whose next request was half read when the stop began
        channel, transport = self.connect(b"GET /x HTTP/1.1\r\nHost: local")
        self.stop()
        self.assertFalse(transport.disconnecting)  # not idle: its request is on its way
        channel.dataReceived(b"host\r\n\r\n")
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response)
        self.assertIn(b"Connection: close", response)
        self.assertIn(b"Retry-After: %d" % edge.STOPPING_RETRY_AFTER, response)
        self.assertIn(b"ShuttingDown", response)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.held, [])  # never reached the resource
        self.assertEqual(self.site.refused_stopping, 1)

    def test_the_backlog_is_accepted_before_the_socket_closes_and_answered(self) -> None:
        self.port.backlog = [GET, GET, GET]
        fired = self.stop()
        self.assertEqual(self.port.events, ["stopped reading"])
        self.clock.advance(0)  # the reactor turn in which the socket closes
        self.assertEqual(self.port.events, ["stopped reading", "accepted", "accepted", "accepted",
                                            "socket closed"])
        self.assertEqual(self.port.reset, 0)
        for channel, transport, sent in self.port.accepted:
            self.assertFalse(transport.disconnecting)  # given a moment to send its request
            channel.dataReceived(sent)
            response = transport.value()
            self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response)
            self.assertIn(b"Connection: close", response)
            self.assertTrue(transport.disconnecting)
            channel.connectionLost(None)
        self.clock.advance(edge.DRAIN_TICK)
        self.assertEqual(fired, [0])

    def test_a_connection_whose_first_request_is_not_read_yet_is_answered_not_closed(self) -> None:
        """Accepted just before the stop, its request still in the kernel's
        buffers: closing it as idle would reset it unanswered (2 requests of
        the reliability SIGTERM row did so: reset 20 ms after the SIGTERM)."""
        channel, transport = self.connect()
        keep_alive, keep_alive_transport = self.connect(GET)
        answer(self.resource.held.pop())
        self.stop()
        self.assertTrue(keep_alive_transport.disconnecting)  # idle after a request: closed at once
        self.assertFalse(transport.disconnecting)
        self.clock.advance(edge.FRESH_GRACE / 2)
        channel.dataReceived(GET)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response)
        self.assertIn(b"Connection: close", response)
        self.assertTrue(transport.disconnecting)

    def test_a_backlog_connection_that_sends_nothing_is_closed_after_a_grace(self) -> None:
        self.port.backlog = [b""]
        fired = self.stop()
        self.clock.advance(0)
        _, transport, _ = self.port.accepted[0]
        self.assertFalse(transport.disconnecting)
        self.clock.advance(edge.FRESH_GRACE + edge.DRAIN_TICK)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(fired), 1)

    def test_at_the_bound_unstarted_answers_are_503_and_started_ones_cut(self) -> None:
        waiting, waiting_transport = self.connect(GET)
        streaming, streaming_transport = self.connect(GET)
        first, second = self.resource.held
        gone: List[Any] = []
        first.notifyFinish().addErrback(gone.append)
        second.setHeader(b"Content-Length", b"100")
        second.write(b"part")  # its answer started
        fired = self.stop(drain=3.0)
        self.clock.advance(2.9)
        self.assertEqual(fired, [])
        self.clock.advance(0.2)
        self.assertEqual(fired, [2])
        response = waiting_transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), response)
        self.assertIn(b"Connection: close", response)
        self.assertIn(b"Retry-After: ", response)
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertTrue(waiting_transport.disconnecting)
        self.assertEqual(len(gone), 1)  # its owner sees its client gone, and writes nothing more
        self.assertTrue(streaming_transport.disconnected)  # a visibly failed transfer
        self.assertEqual(self.site.cut_at_stop, 2)

    def test_nothing_in_progress_drains_at_once(self) -> None:
        fired = self.stop()
        self.clock.advance(0)
        self.assertEqual(fired, [0])
        self.assertIsNone(self.edge.listening)

    def test_without_a_drain_everything_closes_at_once(self) -> None:
        _, transport = self.connect(GET)
        result = self.edge.stop()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.site.stopping)
        self.clock.advance(0)
        self.assertIsInstance(result, Deferred)

    def test_the_owner_writes_the_503(self) -> None:
        self.site.stopping_answer = lambda request, error: (
            request.setResponseCode(error.status), request.setHeader(b"X-Kind", error.kind.encode()),
            [request.setHeader(k, v) for k, v in error.headers.items()], b"owner's")[-1]
        channel, transport = self.connect(b"GET /x HTTP/1.1\r\n")
        self.stop()
        channel.dataReceived(b"Host: localhost\r\n\r\n")
        response = transport.value()
        self.assertIn(b"X-Kind: ShuttingDown", response)
        self.assertIn(b"Connection: close", response)
        self.assertTrue(response.endswith(b"owner's") or b"owner's" in response)
        self.assertTrue(transport.disconnecting)


class RealPortTests(SynchronousTestCase):
    """_stop_listening_after_backlog on the attributes a real tcp.Port has."""

    def test_the_port_without_doRead_just_stops(self) -> None:
        class Plain:
            stopped = False

            def stopListening(self) -> Deferred:
                self.stopped = True
                return succeed(None)

        plain = Plain()
        done: List[Any] = []
        edge._stop_listening_after_backlog(plain).addCallback(done.append)
        self.assertTrue(plain.stopped)
        self.assertEqual(done, [None])

    def test_twisted_port_has_what_is_used(self) -> None:
        from twisted.internet import tcp
        from twisted.internet.protocol import Factory
        port = tcp.Port(0, Factory())  # not listening: only what it has
        for name in ("doRead", "connectionLost", "stopListening"):
            self.assertTrue(callable(getattr(port, name, None)), name)
        self.assertIn("self.numberAccepts", inspect.getsource(tcp.Port.doRead))
