"""One Server-Sent Events response (ooidx.people.sse) on a DummyRequest and a
Clock, and stream tickets' text (ooidx.people.tickets)."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from ooidx.people.sse import SSE, gone
from ooidx.people.tickets import TICKET_MAX, TicketError, make_ticket, parse_ticket, ticket_key, ticket_mac


class Request(DummyRequest):
    """A DummyRequest that takes a push producer as a transport does (DummyRequest's
    own loops on resumeProducing, as for a pull producer)."""

    producer: Any = None
    channel: Any = type("Channel", (), {"transport": object()})()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class SSETests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.request = Request([b"events"])
        self.closed: List[bool] = []
        self.sse = SSE(self.request, self.clock, 15.0, lambda: self.closed.append(True))

    def text(self) -> bytes:
        return b"".join(self.request.written)

    def test_the_head_events_and_keep_alives(self) -> None:
        self.assertEqual(self.request.responseCode, 200)
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/event-stream; charset=utf-8"])
        self.assertTrue(self.text().startswith(b": ooidx event stream\nretry: 3000\n\n"))
        self.sse.send({"a": "é"}, "0001-x")
        self.sse.send([1])
        self.assertIn('id: 0001-x\ndata: {"a":"é"}\n\n'.encode(), self.text())
        self.assertTrue(self.text().endswith(b"data: [1]\n\n"))
        self.clock.advance(15)
        self.assertTrue(self.text().endswith(b": keep-alive\n\n"))

    def test_the_client_pacing_it(self) -> None:
        producer = self.request.producer
        resumed: List[bool] = []
        producer.pauseProducing()
        self.assertTrue(self.sse.paused)
        self.sse.when_resumed(lambda: resumed.append(True))
        producer.resumeProducing()
        self.assertFalse(self.sse.paused)
        self.assertEqual(resumed, [True])
        producer.stopProducing()
        self.assertEqual(self.closed, [True])

    def test_the_client_going_closes_it_once(self) -> None:
        self.request.processingFailed(Failure(ConnectionError("gone")))
        self.assertEqual(self.closed, [True])
        self.sse.close()
        self.assertEqual(self.closed, [True])
        self.clock.advance(60)
        self.assertNotIn(b"keep-alive", self.text())
        self.flushLoggedErrors(ConnectionError)

    def test_finishing_it(self) -> None:
        self.sse.finish()
        self.assertEqual((self.request.finished, self.closed), (1, [True]))
        self.assertIsNone(self.request.producer)
        self.sse.finish()
        self.assertEqual(self.request.finished, 1)

    def test_finishing_one_whose_client_went(self) -> None:
        self.request._disconnected = True
        self.assertTrue(gone(self.request))
        self.sse.finish()
        self.assertEqual((self.request.finished, self.closed), (0, [True]))


class TicketTextTests(SynchronousTestCase):
    def test_made_and_parsed(self) -> None:
        key = ticket_key("operator-token")
        self.assertIs(key, ticket_key("operator-token"))
        ticket = make_ticket(key, "ann", "0123456789ab", "f" * 64, 1_700_000_060, nonce="A" * 16)
        self.assertEqual(parse_ticket(ticket), ("ann", "0123456789ab", 1_700_000_060, "A" * 16, ticket.split(".")[5]))
        self.assertEqual(parse_ticket(ticket.encode()), parse_ticket(ticket))
        self.assertEqual(ticket.split(".")[5], ticket_mac(key, "ann", "0123456789ab", 1_700_000_060, "A" * 16,
                                                          "f" * 64))
        self.assertNotEqual(ticket, make_ticket(key, "ann", "0123456789ab", "f" * 64, 1_700_000_060))
        self.assertNotEqual(ticket_mac(key, "ann", "0123456789ab", 1, "A" * 16, "f" * 64),
                            ticket_mac(key, "ann", "0123456789ab", 1, "A" * 16, "e" * 64))

    def test_what_is_not_a_ticket(self) -> None:
        for raw, words in [(None, "not text"), (5, "not text"), ("", "empty"), ("x" * (TICKET_MAX + 1), "too long"),
                           (b"x" * (TICKET_MAX + 1), "too long"), ("été", "ASCII"), (b"\xff", "ASCII"),
                           ("a.b", "6 parts"), ("v2.a.b.c.d.e", "v1"), ("v1.a.b.c.d.e", "malformed")]:
            with self.assertRaises(TicketError) as caught:
                parse_ticket(raw)
            self.assertIn(words, str(caught.exception))
