"""Webhook delivery (ooidx.people.webhooks) on a Clock: a fake poster answers
each POST, retries back off on the clock, a delivery gives up after its
attempts and says so in a failure event that reaches its own person only;
http_poster speaks real HTTP/1.1 to an in-memory connection. The loopback
version (a real receiver) stays in tests/ooidx/test_user_subscriptions.py."""
from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport

import magnet
from magnet import Message, Timeout

from ooidx.errors import Forbidden
from ooidx.people.webhooks import WebhookDelivery, _reason, http_poster

from tests.fast.core.support import FastCase, LogEvents, drive
from tests.fast.people.people_support import TOKEN, People


class Settled:
    def __init__(self) -> None:
        self.acked = 0
        self.nacked = 0

    def ack(self) -> None:
        self.acked += 1

    def nack(self, requeue: bool = True) -> None:
        self.nacked += 1


RECORD = {"id": "abcdef012345", "person": "p", "queue": "user.p.abcdef012345", "webhook": "https://h.example/x"}


class BackoffTests(FastCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.bus = magnet.connect(f"memory://hooks-{uuid.uuid4().hex}", self.clock)
        self.answers: List[Any] = []
        self.posts: List[float] = []
        self.headers: List[Dict[str, str]] = []
        self.sent: List[Dict[str, Any]] = []

    def post(self, url: str, body: bytes, headers: Dict[str, str]) -> Any:
        self.posts.append(self.clock.seconds())
        self.headers.append(headers)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        if answer == "hang":
            return defer.Deferred()
        return defer.succeed(answer)

    def delivery(self, **options: Any) -> WebhookDelivery:
        options.setdefault("report", lambda record, event: self.sent.append(event.json()))
        return WebhookDelivery(self.bus, RECORD, self.post, self.clock, **options)

    def test_backoff_doubles_up_to_its_most(self) -> None:
        self.answers[:] = [500, 503, ConnectionRefusedError("refused"), 204]
        d = self.delivery(attempts=5, base_delay=1.0, max_delay=3.0)
        settled = Settled()
        message = Message.of_json({"topic": "event.saved.x"}, headers={"ooidx-id": "x"})
        d._on_message(message, settled)
        self.assertEqual((self.posts, settled.acked), ([0.0], 0))
        self.clock.advance(0.99)
        self.assertEqual(len(self.posts), 1)
        self.clock.advance(0.01)
        self.assertEqual(self.posts, [0.0, 1.0])
        self.clock.advance(1.99)
        self.assertEqual(len(self.posts), 2)
        self.clock.advance(0.01)
        self.assertEqual(self.posts, [0.0, 1.0, 3.0])
        self.clock.advance(3.0)  # 4 s would be next, but max_delay is 3
        self.assertEqual(self.posts, [0.0, 1.0, 3.0, 6.0])
        self.assertEqual((settled.acked, d.delivered), (1, 1))
        self.assertEqual([e["attempt"] for e in self.sent], [1, 2, 3])
        self.assertFalse(any(e["given_up"] for e in self.sent))
        self.assertIn("HTTP 500", self.sent[0]["reason"])
        self.assertIn("ConnectionRefusedError", self.sent[2]["reason"])
        self.assertEqual([h["X-Ooidx-Attempt"] for h in self.headers], ["1", "2", "3", "4"])
        self.assertEqual(self.headers[0]["X-Ooidx-Subscription"], RECORD["id"])
        self.assertEqual(self.headers[0]["Content-Type"], "application/json")

    def test_given_up_after_its_attempts_and_acked(self) -> None:
        self.answers[:] = [500, "not a status"]
        d = self.delivery(attempts=2, base_delay=1.0)
        settled = Settled()
        d._on_message(Message.of_json({"topic": "t"}), settled)
        self.clock.advance(1.0)
        self.assertEqual((settled.acked, d.given_up), (1, 1))
        self.assertEqual([e["given_up"] for e in self.sent], [False, True])
        self.assertIn("HTTP not a status", self.sent[1]["reason"])

    def test_stopping_mid_backoff_gives_the_message_back(self) -> None:
        self.answers[:] = [500, 200]
        d = self.delivery(attempts=5)
        settled = Settled()
        d._on_message(Message.of_json({"topic": "t"}), settled)
        drive(self, self.clock, d.stop())
        self.clock.advance(100)
        self.assertEqual((settled.nacked, settled.acked, self.answers), (1, 0, [200]))
        later = Settled()
        d._on_message(Message.of_json({"topic": "t"}), later)  # stopped: straight back
        self.assertEqual(later.nacked, 1)

    def test_stopping_mid_request_cancels_it_without_a_failure_event(self) -> None:
        self.answers[:] = ["hang"]
        d = self.delivery()
        settled = Settled()
        d._on_message(Message.of_json({"topic": "t"}), settled)
        drive(self, self.clock, d.stop())
        self.assertEqual(self.sent, [])
        self.assertEqual(settled.acked, 0)

    def test_a_report_that_fails_is_logged_and_delivery_goes_on(self) -> None:
        self.answers[:] = [500, 200]
        log = LogEvents(self)
        d = self.delivery(report=lambda record, event: defer.fail(RuntimeError("no store")))
        settled = Settled()
        d._on_message(Message.of_json({"topic": "t"}), settled)
        self.clock.advance(1.0)
        self.assertEqual(settled.acked, 1)
        self.assertTrue(any("not reported: no store" in t for t in log.texts()))

    def test_reasons_say_what_happened_in_time_words(self) -> None:
        from twisted.python.failure import Failure

        self.assertEqual(_reason(Failure(Timeout("x"))), "the webhook did not answer in time")
        self.assertEqual(_reason(Failure(defer.CancelledError())), "the webhook did not answer in time")
        self.assertEqual(_reason(Failure(ValueError())), "ValueError: ValueError")

    def test_one_at_a_time_and_stopping_gives_back_the_one_in_flight(self) -> None:
        self.answers[:] = ["hang"]
        self.bus.startService()
        drive(self, self.clock, self.bus.transport.declare_queue(RECORD["queue"], durable=True))
        d = self.delivery()
        drive(self, self.clock, d.start())
        for n in range(2):
            drive(self, self.clock, self.bus.send(RECORD["queue"], Message.of_json({"n": n})))
        self.clock.advance(0.1)
        self.assertEqual(len(self.posts), 1)  # prefetch 1: the second waits
        drive(self, self.clock, d.stop())
        queue = self.bus.transport.broker.queues[RECORD["queue"]]
        self.clock.advance(0.1)
        self.assertEqual(len(queue.ready), 2)  # both back: the waiting one, and the one whose POST was cut short
        drive(self, self.clock, self.bus.stopService())

    def test_stopped_before_it_started(self) -> None:
        cancelled: List[bool] = []
        consuming: defer.Deferred = defer.Deferred()
        self.patch(self.bus, "consume_deliveries", lambda *a, **k: consuming)
        d = self.delivery()
        started = d.start()
        drive(self, self.clock, d.stop())
        consuming.callback(type("Sub", (), {"cancel": lambda self: cancelled.append(True)})())
        self.assertTrue(started.called)
        self.assertEqual(cancelled, [True])


class HttpPosterTests(FastCase):
    """http_poster over an in-memory connection: the bytes it sends, the status it reads."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def connect(self) -> StringTransport:
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("93.184.216.34", 8080))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.protocol.makeConnection(transport)
        return transport

    def post(self, url: str = "http://hooks.example:8080/hook?sig=1", **options: Any) -> Any:
        options.setdefault("resolver", lambda host, port: defer.succeed(["93.184.216.34"]))
        poster = http_poster(self.reactor, timeout=5.0, **options)
        results: List[Any] = []
        poster(url, b'{"a": 1}', {"Content-Type": "application/json", "X-Ooidx-Attempt": "1"}).addBoth(results.append)
        return results

    def test_a_post_and_its_status(self) -> None:
        results = self.post()
        transport = self.connect()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"POST /hook?sig=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"Content-Type: application/json", sent)
        self.assertIn(b"X-Ooidx-Attempt: 1", sent)
        self.assertTrue(sent.endswith(b'\r\n\r\n{"a": 1}'), sent)
        self.protocol.dataReceived(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(results, [202])

    def test_a_big_answer_is_not_read_to_its_end(self) -> None:
        results = self.post()
        transport = self.connect()
        self.protocol.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 200000\r\n\r\n" + b"x" * 70_000)
        self.assertEqual(results, [])
        self.assertTrue(transport.disconnecting or transport.producerState == "stopped")

    def test_no_answer_in_time_is_a_timeout(self) -> None:
        results = self.post()
        self.connect()
        self.reactor.advance(5.0)
        self.assertEqual(len(results), 1)
        self.assertTrue(results[0].check(Timeout), results[0])
        self.assertIn("no answer within 5 s", results[0].getErrorMessage())

    def test_a_forbidden_address_is_never_connected(self) -> None:
        results = self.post("http://inside.example/hook",
                            resolver=lambda host, port: defer.succeed(["10.0.0.7"]))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(results[0].check(Forbidden), results[0])


# --------------------------------------------------------------------------- #
# through the components: a person's webhook on a memory:// bus


class ComponentWebhookTests(FastCase):
    def test_webhook_delivery_and_its_failures(self) -> None:
        s = People(self, attempts=3, base_delay=1.0)
        token = s.person()
        failures = s.watch_failures(token)
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.", webhook="https://hooks.example/h/SECRET")
        self.assertIsNone(sub["events"])
        s.emit("saved", "ok1")
        s.edge.until(lambda: s.poster.posts)
        post = s.poster.posts[0]
        self.assertEqual(post["url"], "https://hooks.example/h/SECRET")
        self.assertEqual(post["body"]["topic"], "event.saved.ok1")
        self.assertEqual(post["headers"]["X-Ooidx-Subscription"], sub["id"])
        self.assertTrue(post["headers"]["X-Ooidx-Event-Id"])

        s.poster.default = 500
        s.emit("saved", "bad1")
        s.edge.until(lambda: any(e["data"].get("given_up") for e in failures.events), seconds=10)
        mine = [e["data"] for e in failures.events if e["data"].get("webhook_subscription") == sub["id"]]
        self.assertEqual([f["attempt"] for f in mine], [1, 2, 3])
        self.assertEqual(mine[0]["topic"], "event.failed.-")
        self.assertIn("HTTP 500", mine[0]["reason"])
        self.assertEqual(mine[0]["host"], "hooks.example")
        self.assertNotIn("SECRET", json.dumps(mine))
        self.assertEqual(len(s.poster.posts), 4)
        queue = s.bus.transport.broker.queues[sub["queue"]]
        s.edge.until(lambda: not queue.ready and not any(c.unacked for c in queue.consumers))

        s.poster.default = 200
        s.emit("saved", "ok2")
        s.edge.until(lambda: s.poster.posts[-1]["body"]["dataset"] == "ok2")
        # failures of a webhook never went to a webhook subscription, nor to the notification fanout
        self.assertFalse([p for p in s.poster.posts if p["body"]["topic"].startswith("event.failed")])
        self.assertEqual(s.failures, [])

    def test_a_failing_webhook_tells_its_person_only(self) -> None:
        s = People(self, attempts=1)
        victim, attacker = s.person(), s.person()
        victim_failures = s.watch_failures(victim)
        attacker_failures = s.watch_failures(attacker)
        s.poster.default = ConnectionRefusedError("refused")
        s.subscribe(victim, kind="events", regex=r"^event\.saved\.", webhook="https://hooks.example/h?sig=SECRET")
        s.emit("saved", "x")
        got = victim_failures.wait_for(1)
        self.assertTrue(got[0]["data"]["given_up"])
        self.assertIn("ConnectionRefusedError", got[0]["data"]["reason"])
        s.settle()
        self.assertEqual(attacker_failures.events, [])
        self.assertEqual(s.failures, [])
        r = s.request("GET", "/api/events", token=TOKEN)
        self.assertNotIn("SECRET", r.body.decode())

    def test_a_removed_subscription_stops_its_webhook(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="datasets", regex=r"^dataset\.", webhook="https://hooks.example/h")
        self.assertIn(sub["queue"], s.user_pub_sub.webhooks)
        s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token)
        s.edge.until(lambda: sub["queue"] not in s.user_pub_sub.webhooks)
        self.assertNotIn(sub["queue"], s.user_notification.webhooks)
