"""Messages and the RPC codec: what crosses the bus and how it is checked."""
from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import magnet
from magnet import Message, operation, rpc


class MessageTests(SynchronousTestCase):
    def test_bodies_must_be_bytes(self) -> None:
        self.assertRaises(TypeError, Message, "text")
        self.assertRaises(TypeError, Message, 5)

    def test_bytearray_and_memoryview_become_bytes(self) -> None:
        self.assertEqual(Message(bytearray(b"ab")).body, b"ab")
        self.assertEqual(type(Message(memoryview(b"cd")).body), bytes)

    def test_of_json_round_trips(self) -> None:
        value = {"ünïcode": [1, None, "x", 1.5, True]}
        m = Message.of_json(value)
        self.assertEqual((m.json(), m.content_type), (value, magnet.JSON))

    def test_json_is_compact(self) -> None:
        self.assertEqual(Message.of_json({"a": [1, 2]}).body, b'{"a":[1,2]}')

    def test_bad_json_is_a_bad_message(self) -> None:
        self.assertRaises(magnet.BadMessage, Message(b"{", content_type=magnet.JSON).json)
        self.assertRaises(magnet.BadMessage, Message(b"\xff\xfe", content_type=magnet.JSON).json)

    def test_json_of_the_wrong_content_type_is_a_bad_message(self) -> None:
        self.assertRaises(magnet.BadMessage, Message(b"{}", content_type="text/plain").json)

    def test_json_without_a_content_type_is_read(self) -> None:
        self.assertEqual(Message(b"[1]").json(), [1])

    def test_json_nested_too_deeply_is_a_bad_message(self) -> None:
        deep = b"[" * 100_000 + b"]" * 100_000
        f = self.assertRaises(magnet.BadMessage, Message(deep).json)
        self.assertIn("deeply", str(f))

    def test_utf16_json_is_read(self) -> None:
        self.assertEqual(Message('{"a": 1}'.encode("utf-16")).json(), {"a": 1})

    def test_a_missing_header_is_named(self) -> None:
        f = self.assertRaises(magnet.BadMessage, Message(b"{}").header, "op")
        self.assertIn("'op'", str(f))

    def test_with_headers_merges_without_changing_the_original(self) -> None:
        m = Message(b"", headers={"a": 1})
        n = m.with_headers(b=2)
        self.assertEqual((dict(m.headers), dict(n.headers)), ({"a": 1}, {"a": 1, "b": 2}))

    def test_evolve_and_immutability(self) -> None:
        m = Message(b"x")
        self.assertEqual(m.evolve(type="t").type, "t")
        with self.assertRaises(Exception):
            m.body = b"y"  # type: ignore[misc]

    def test_messages_are_persistent_by_default(self) -> None:
        self.assertTrue(Message(b"").persistent)


class CodecTests(SynchronousTestCase):
    def test_only_marked_methods_are_operations(self) -> None:
        class Service:
            @operation
            def visible(self) -> None: ...

            def hidden(self) -> None: ...

            @operation
            def _private(self) -> None: ...

        self.assertEqual(sorted(rpc.operations(Service())), ["visible"])

    def test_a_request_names_its_op_and_is_transient(self) -> None:
        m = rpc.request("get", {"key": "a"}, reply_to="r", correlation_id="c")
        self.assertEqual((m.type, m.headers["op"], m.reply_to, m.correlation_id, m.persistent),
                         ("call", "get", "r", "c", False))
        self.assertEqual(rpc.decode_request(m), ("get", {"key": "a"}))

    def test_requests_with_unserializable_arguments_are_refused(self) -> None:
        self.assertRaises(TypeError, rpc.request, "op", {"x": object()})

    def test_an_error_reply_carries_type_and_message(self) -> None:
        reply = rpc.error_reply(Failure(KeyError("k")), "c")
        self.assertEqual((reply.type, reply.json()), ("error", {"type": "KeyError", "message": "'k'"}))

    def test_invoke_fails_with_typed_errors(self) -> None:
        class S:
            @operation
            def f(self, a: int) -> int:
                return a

        ops = rpc.operations(S())
        self.assertEqual(self.successResultOf(rpc.invoke(ops, "s", rpc.request("f", {"a": 1}))), 1)
        self.failureResultOf(rpc.invoke(ops, "s", rpc.request("g", {})), magnet.UnknownOperation)
        self.failureResultOf(rpc.invoke(ops, "s", rpc.request("f", {"b": 1})), magnet.BadArguments)
        self.failureResultOf(rpc.invoke(ops, "s", Message(b"{}")), magnet.BadMessage)

    def test_an_argument_named_like_the_bound_object_is_bad_arguments(self) -> None:
        class TakesAnything:
            @operation
            def anything(self, **kwargs: Any) -> Any:
                return kwargs

            @operation
            def named(self, name: str, **kwargs: Any) -> Any:
                return name

        ops = rpc.operations(TakesAnything())
        for op, kwargs in (("anything", {"self": 1}), ("named", {"name": "x", "self": 1})):
            f = self.assertRaises(magnet.BadArguments, rpc.resolve, ops, "svc", rpc.request(op, kwargs))
            self.assertIn("unexpected keyword argument 'self'", str(f))
            self.failureResultOf(rpc.invoke(ops, "svc", rpc.request(op, kwargs)), magnet.BadArguments)
        self.assertEqual(rpc.resolve(ops, "svc", rpc.request("named", {"name": "x"}))[1], {"name": "x"})

    def test_an_argument_named_like_maybedeferreds_parameters_reaches_the_method(self) -> None:
        class S:
            @operation
            def f(self, f: int, args: int) -> int:
                return f + args

        self.assertEqual(self.successResultOf(rpc.invoke(rpc.operations(S()), "s", rpc.request("f", {"f": 1, "args": 2}))), 3)

    def test_errors_are_all_magnet_errors(self) -> None:
        for cls in (magnet.ConnectionLost, magnet.NotConnected, magnet.Unroutable, magnet.NotConfirmed,
                    magnet.Timeout, magnet.BadMessage, magnet.BadURL, magnet.RemoteError, magnet.StreamError):
            self.assertTrue(issubclass(cls, magnet.MagnetError))
        self.assertTrue(issubclass(magnet.UnknownOperation, magnet.RemoteError))
        self.assertFalse(issubclass(magnet.Refusal, magnet.MagnetError))
