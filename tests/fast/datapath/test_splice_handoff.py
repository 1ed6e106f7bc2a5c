"""How a client's end and a fetch meet for a spliced body (ooidx.datapath.splice;
no broker, no port, time on a task.Clock): which requests are offered, that
an end is taken once, that a splice nobody attaches gives up and closes the
upstream, and that the proxy's giving up on a request cancels its splice.
The bytes' own path (real sockets) is tests/ooidx/test_splice.py."""
from __future__ import annotations

from typing import Any, List

from twisted.internet import task, tcp
from twisted.trial.unittest import SynchronousTestCase

from ooidx.datapath import splice
from ooidx.errors import UpstreamError


class FakeUpstream:
    """What a splice touches of Twisted's upstream connection before it starts."""

    def __init__(self) -> None:
        self.disconnected = False
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1
        self.disconnected = True


class FakeStore:
    def __init__(self) -> None:
        self.writes: List[bytes] = []
        self.aborted: List[BaseException] = []
        self.failure = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def abort(self, exc: BaseException) -> Any:
        from twisted.internet.defer import succeed
        self.aborted.append(exc)
        return succeed(None)


class Request:
    def __init__(self, method: bytes, transport: Any) -> None:
        self.method = method
        self.channel = type("Channel", (), {})()
        self.channel.transport = transport
        if transport is not None:
            transport.producer = self.channel


class PlainTCP(tcp.Connection):
    """A tcp.Connection that never touched a socket (isinstance is what is checked)."""

    def __init__(self) -> None:  # noqa: D107 - no socket, no reactor
        self.producer = None
        self.disconnected = False


class HandoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.patch(splice, "available", lambda: True)
        self.patch(splice, "HANDOFFS", splice.Handoffs())

    def test_only_a_get_on_plain_tcp_is_offered(self) -> None:
        self.assertIsInstance(splice.client_end("r1", Request(b"GET", PlainTCP())), splice.ClientEnd)
        self.assertIsNone(splice.client_end("r2", Request(b"HEAD", PlainTCP())))
        tls = type("TLSMemoryBIOProtocol", (), {"producer": None})()
        self.assertIsNone(splice.client_end("r3", Request(b"GET", tls)))  # TLS: a protocol, not a socket
        request = Request(b"GET", PlainTCP())
        request.channel.transport.producer = object()  # something else writes to it
        self.assertIsNone(splice.client_end("r4", request))
        self.patch(splice, "available", lambda: False)
        self.assertIsNone(splice.client_end("r5", Request(b"GET", PlainTCP())))

    def test_an_end_is_taken_once_and_forgotten_only_by_itself(self) -> None:
        handoffs = splice.HANDOFFS
        end = splice.client_end("r1", Request(b"GET", PlainTCP()))
        handoffs.expect(end)
        self.assertIsNone(handoffs.take(None))
        self.assertIsNone(handoffs.take("other"))
        self.assertIs(handoffs.take("r1"), end)
        self.assertIsNone(handoffs.take("r1"))  # a second fetch for the request (a redelivery) streams
        newer = splice.client_end("r1", Request(b"GET", PlainTCP()))
        handoffs.expect(newer)
        handoffs.forget("r1", end)  # an older end does not remove a newer one
        self.assertEqual(len(handoffs), 1)
        newer.close()
        self.assertEqual(len(handoffs), 0)
        closed = splice.client_end("r2", Request(b"GET", PlainTCP()))
        handoffs.expect(closed)
        closed.closed = True
        self.assertIsNone(handoffs.take("r2"))

    def test_a_splice_nobody_attaches_gives_up_and_closes_the_upstream(self) -> None:
        upstream, store = FakeUpstream(), FakeStore()
        job = splice.Splice(self.clock, upstream, 10 * 1024 * 1024, store=store, attach_timeout=30.0)
        job.feed(b"x" * 1000)  # what Twisted's client had read: the store gets it at once
        job.upstream_ready()
        outcome = job.outcome()
        self.clock.advance(29.9)
        self.assertNoResult(outcome)
        self.clock.advance(0.2)
        self.failureResultOf(outcome, splice.ClientGone)
        self.assertEqual((upstream.aborted, store.writes, len(store.aborted)), (1, [b"x" * 1000], 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_proxy_giving_up_cancels_a_splice_not_attached(self) -> None:
        end = splice.client_end("r1", Request(b"GET", PlainTCP()))
        splice.HANDOFFS.expect(end)
        taken = splice.HANDOFFS.take("r1")
        upstream = FakeUpstream()
        taken.splice = job = splice.Splice(self.clock, upstream, 10 * 1024 * 1024)
        outcome = job.outcome()
        end.close()  # the proxy answered otherwise (a bad head, the client left)
        self.failureResultOf(outcome, splice.ClientGone)
        self.assertEqual(upstream.aborted, 1)
        self.failureResultOf(job.outcome(), splice.ClientGone)  # a late observer learns it too

    def test_an_upstream_sending_more_than_it_declared_fails_the_splice(self) -> None:
        upstream = FakeUpstream()
        job = splice.Splice(self.clock, upstream, 100)
        outcome = job.outcome()
        job.feed(b"y" * 101)
        self.failureResultOf(outcome, UpstreamError)
        self.assertEqual(upstream.aborted, 1)
