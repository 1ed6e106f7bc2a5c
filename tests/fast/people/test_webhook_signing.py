"""Webhooks by the Standard Webhooks convention, without a network: secrets, signatures checked by the
standardwebhooks package, the challenge's answers, the delivery's headers and log (time from a Clock)."""
from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace
from typing import Any, Dict, List

from standardwebhooks import Webhook, WebhookVerificationError
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet import Message

from ooidx.people.records import ID_HEADER
from ooidx.people.webhooks import (AnswerTooLarge, InvalidSecret, WebhookDelivery, WebhookNotVerified, check_secret,
                                   disabled_event, new_secret, signature_headers, signing_keys, verify_callback)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class Settled:
    def __init__(self) -> None:
        self.acked = self.nacked = 0

    def ack(self) -> None:
        self.acked += 1

    def nack(self, requeue: bool = True) -> None:
        self.nacked += 1


class SecretTests(SynchronousTestCase):
    def test_new_secrets_are_read_by_standardwebhooks(self) -> None:
        secret = new_secret()
        self.assertTrue(secret.startswith("whsec_"))
        self.assertEqual(check_secret(secret), secret)
        self.assertNotEqual(secret, new_secret())
        Webhook(secret)  # does not raise

    def test_malformed_secrets(self) -> None:
        for bad in ("", "whsec_", "whsec_abc", SECRET[6:], SECRET.upper(), SECRET + "\n", SECRET + "!", 42, None,
                    "whsec_" + base64.b64encode(b"k" * 16).decode(), "whsec_" + base64.b64encode(b"k" * 65).decode(),
                    "whsec_" + "A" * 43 + "=="):
            with self.assertRaises(InvalidSecret) as caught:
                check_secret(bad)
            if isinstance(bad, str) and len(bad) > 8:
                self.assertNotIn(bad, str(caught.exception))


class SignatureTests(SynchronousTestCase):
    def test_a_receiver_verifies_with_standardwebhooks(self) -> None:
        body = b'{"topic": "event.saved.sst"}'
        now = time.time()  # standardwebhooks checks the timestamp against the real clock
        headers = signature_headers([SECRET], "msg_1", now, body)
        self.assertEqual(set(headers), {"webhook-id", "webhook-timestamp", "webhook-signature"})
        self.assertEqual(Webhook(SECRET).verify(body, headers), {"topic": "event.saved.sst"})
        with self.assertRaises(WebhookVerificationError):
            Webhook(SECRET).verify(body + b" ", headers)
        with self.assertRaises(WebhookVerificationError):
            Webhook(new_secret()).verify(body, headers)
        with self.assertRaises(WebhookVerificationError):
            Webhook(SECRET).verify(body, signature_headers([SECRET], "msg_1", now - 3600, body))

    def test_the_old_secret_signs_too_until_its_grace_ends(self) -> None:
        other = new_secret()
        record = {"secret": other, "previous_secret": {"secret": SECRET, "until": 100.0}}
        self.assertEqual(signing_keys(record, 99.0), [other, SECRET])
        self.assertEqual(signing_keys(record, 100.0), [other])
        headers = signature_headers(signing_keys(record, 99.0), "m", time.time(), b"{}")
        self.assertEqual(len(headers["webhook-signature"].split(" ")), 2)
        Webhook(SECRET).verify(b"{}", headers)
        Webhook(other).verify(b"{}", headers)
        self.assertEqual(signing_keys({"webhook": "x"}, 0), [])


class ChallengeTests(SynchronousTestCase):
    def run_challenge(self, answer: Any) -> Any:
        sent: List[Dict[str, Any]] = []

        def exchange(url: str, body: bytes, headers: Dict[str, str]) -> Any:
            sent.append({"body": body, "headers": headers})
            return answer(json.loads(body)) if callable(answer) else answer

        d = verify_callback(exchange, "https://hooks.example/h?k=SECRETQ", SECRET, now=time.time(), lifetime=5.0)
        self.assertEqual(len(sent), 1)
        request = sent[0]
        self.assertEqual(Webhook(SECRET).verify(request["body"], request["headers"])["type"], "webhook.verification")
        self.assertEqual(request["headers"]["webhook-challenge"], json.loads(request["body"])["challenge"])
        return d

    def refused(self, answer: Any, words: str) -> str:
        failure = self.failureResultOf(self.run_challenge(answer), WebhookNotVerified)
        message = failure.getErrorMessage()
        self.assertIn(words, message)
        self.assertNotIn("SECRETQ", message)
        return message

    def test_an_echo_or_the_standard_header_verifies(self) -> None:
        echo = lambda body: defer.succeed((200, {}, json.dumps({"challenge": body["challenge"]}).encode()))
        self.assertIsNone(self.successResultOf(self.run_challenge(echo)))
        header = lambda body: defer.succeed((204, {"webhook-challenge-response":
                                                   Webhook(SECRET).endpoint_verification_response(body["challenge"])},
                                             b""))
        self.assertIsNone(self.successResultOf(self.run_challenge(header)))

    def test_wrong_answers_are_refused(self) -> None:
        self.refused(lambda body: defer.succeed((200, {}, b'{"challenge": "nope"}')), "another challenge")
        self.refused(defer.succeed((200, {}, b"ok")), "did not echo")
        self.refused(defer.succeed((200, {}, b"[1]")), "another challenge")
        self.refused(defer.succeed((200, {"webhook-challenge-response": "v1,AAAA"}, b"")), "does not match")
        self.refused(defer.succeed((500, {}, b"")), "HTTP 500")
        self.refused(defer.succeed((302, {"location": "http://169.254.169.254/x"}, b"")), "forbidden address")
        self.refused(defer.succeed((301, {"location": "https://other.example/x"}, b"")), "redirect")
        self.refused(defer.fail(AnswerTooLarge("the answer is larger than 4096 bytes")), "too large")
        self.refused(defer.fail(CancelledError()), "within 5 s")
        self.refused(defer.fail(ConnectionRefusedError("https://hooks.example/h?k=SECRETQ refused")),
                     "could not be verified")


class DeliveryTests(SynchronousTestCase):
    def test_signed_posts_the_same_id_on_retries_and_a_log_from_the_clock(self) -> None:
        clock = Clock()
        clock.advance(time.time())  # signatures are checked against the real time by the receiver
        posts: List[Dict[str, Any]] = []
        answers: List[Any] = []
        logged: List[Dict[str, Any]] = []

        def post(url: str, body: bytes, headers: Dict[str, str]) -> Any:
            posts.append(dict(headers, body=body))
            d: defer.Deferred = defer.Deferred()
            answers.append(d)
            return d

        record = {"id": "0123456789ab", "person": "ann", "queue": "user.ann.0123456789ab",
                  "webhook": "https://h.example/hook", "secret": SECRET}
        bus = SimpleNamespace(node="n")
        delivery = WebhookDelivery(bus, record, post, clock, attempts=3, base_delay=1.0,
                                   logged=lambda r, entry: logged.append(entry))
        message = Message.of_json({"topic": "event.saved.sst"}, headers={ID_HEADER: "00000001-abc"})
        settled = Settled()
        delivery._on_message(message, settled)
        clock.advance(0.25)
        answers[0].callback(503)
        clock.advance(1.0)
        self.assertEqual(len(posts), 2)
        clock.advance(0.5)
        answers[1].callback(200)
        self.assertEqual(settled.acked, 1)
        ids = {p["webhook-id"] for p in posts}
        self.assertEqual(ids, {"msg_00000001-abc"})
        for p in posts:
            body = p.pop("body")
            Webhook(SECRET).verify(body, p)
        self.assertEqual([(e["status"], e["attempt"], e["ok"], e["latency"]) for e in logged],
                         [(503, 1, False, 0.25), (200, 2, True, 0.5)])
        self.assertIn("HTTP 503", logged[0]["error"])

    def test_unsigned_without_a_secret(self) -> None:
        posts: List[Dict[str, str]] = []
        record = {"id": "0123456789ab", "person": "ann", "queue": "q", "webhook": "https://h.example/"}
        delivery = WebhookDelivery(SimpleNamespace(node="n"), record,
                                   lambda u, b, h: posts.append(h) or defer.succeed(200), Clock())
        delivery._on_message(Message.of_json({}), Settled())
        self.assertNotIn("webhook-signature", posts[0])

    def test_the_disabled_event(self) -> None:
        record = {"id": "0123456789ab", "webhook": "https://h.example/hook/SECRETP"}
        body = disabled_event(SimpleNamespace(node="n"), record, failures=20, reason="HTTP 500 at /hook/SECRETP",
                              now=1.0).json()
        self.assertEqual((body["topic"], body["disabled"], body["consecutive_failures"]), ("event.failed.-", True, 20))
        self.assertEqual(body["enable"], "POST /api/subscriptions/0123456789ab/verify")
        self.assertNotIn("SECRETP", json.dumps(body))
