"""magnet.message's contract: a L{Message} is immutable bytes with
properties; JSON bodies encode compactly and decode (UTF-8, or what
json.loads detects) or fail with L{BadMessage}, never another error.
"""
from __future__ import annotations

import dataclasses
import json

from twisted.trial.unittest import SynchronousTestCase

from magnet.errors import BadMessage
from magnet.message import BINARY, JSON, Message


class MessageTests(SynchronousTestCase):
    def test_json_round_trip_compact(self) -> None:
        message = Message.of_json({"a": [1, "\u00e9"]}, correlation_id="c")
        self.assertEqual(message.body, b'{"a":[1,"\\u00e9"]}')  # ASCII, no spaces
        self.assertEqual((message.content_type, message.correlation_id), (JSON, "c"))
        self.assertEqual(message.json(), {"a": [1, "\u00e9"]})
        self.assertEqual(Message(body=b"[1]").json(), [1])  # no content type: JSON is assumed

    def test_bodies_are_bytes(self) -> None:
        self.assertEqual(Message(body=bytearray(b"ab")).body, b"ab")
        self.assertIs(type(Message(body=memoryview(b"cd")).body), bytes)
        with self.assertRaises(TypeError) as caught:
            Message(body="text")  # type: ignore[arg-type]
        self.assertIn("must be bytes, not str", str(caught.exception))

    def test_it_is_immutable(self) -> None:
        message = Message(body=b"x")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, message, "body", b"y")

    def test_json_of_another_content_type_is_refused(self) -> None:
        with self.assertRaises(BadMessage) as caught:
            Message(body=b"{}", content_type=BINARY).json()
        self.assertIn("expected content type application/json", str(caught.exception))

    def test_bodies_that_are_not_json(self) -> None:
        for body in (b"{", b"\xff\xfe\x00", b"", b"nan?"):
            with self.assertRaises(BadMessage) as caught:
                Message(body=body, content_type=JSON).json()
            self.assertIn("body is not valid JSON", str(caught.exception))

    def test_other_unicode_encodings_json_can_detect(self) -> None:
        self.assertEqual(Message(body='{"k": "v"}'.encode("utf-16")).json(), {"k": "v"})
        self.assertEqual(Message(body=b"\xef\xbb\xbf[2]").json(), [2])  # a UTF-8 BOM

    def test_nesting_too_deep_is_badmessage_not_recursionerror(self) -> None:
        deep = b"[" * 100000 + b"]" * 100000
        with self.assertRaises(BadMessage) as caught:
            Message(body=deep).json()
        self.assertIn("nested too deeply", str(caught.exception))
        deep16 = ("[" * 100000 + "]" * 100000).encode("utf-16")
        with self.assertRaises(BadMessage):
            Message(body=deep16).json()

    def test_header(self) -> None:
        message = Message(headers={"h": 0})
        self.assertEqual(message.header("h"), 0)
        with self.assertRaises(BadMessage) as caught:
            message.header("missing")
        self.assertIn("missing header 'missing'", str(caught.exception))

    def test_evolve_and_with_headers_copy(self) -> None:
        message = Message(body=b"x", headers={"a": 1})
        changed = message.evolve(body=b"y", type="t")
        self.assertEqual((changed.body, changed.type, changed.headers), (b"y", "t", {"a": 1}))
        merged = message.with_headers(b=2)
        self.assertEqual(merged.headers, {"a": 1, "b": 2})
        self.assertEqual(message.headers, {"a": 1})

    def test_a_trusted_message_equals_a_checked_one(self) -> None:
        fields = dict(body=b"b", headers={"h": 1}, content_type=JSON, correlation_id="c", reply_to="r",
                      message_id="m", type="t", persistent=False, expiration="5", timestamp=7)
        self.assertEqual(Message._trusted(**fields), Message(**fields))  # type: ignore[arg-type]

    def test_json_encoding_refuses_what_json_cannot_say(self) -> None:
        self.assertRaises(TypeError, Message.of_json, {"k": object()})
        self.assertEqual(json.loads(Message.of_json(None).body), None)
