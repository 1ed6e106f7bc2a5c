"""magnet.rpc's contract: requests and replies on the wire, which methods a
service exposes, and how a request's arguments are bound to an operation
(or refused with a typed error that names what is wrong).
"""
from __future__ import annotations

import functools
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from magnet.errors import BadArguments, BadMessage, RemoteError, UnknownOperation
from magnet.message import BINARY, JSON, Message
from magnet.rpc import (
    CALL,
    ERROR,
    OP_HEADER,
    REPLY,
    _bound_parameter,
    _fits,
    decode_reply,
    decode_request,
    error_reply,
    invoke,
    operation,
    operations,
    reply,
    request,
    resolve,
)


class Service:
    @operation
    def add(self, a: int, b: int = 2) -> int:
        return a + b

    @operation
    def anything(self, **kwargs: Any) -> dict:
        return kwargs

    @operation
    def only_keywords(self, *, name: str) -> str:
        return name

    @operation
    def later(self, value: Any) -> Deferred:
        return succeed(value)

    @operation
    def fails(self) -> None:
        raise KeyError("nope")

    @operation
    def positional_only(self, x: int = 1, /) -> int:
        return x

    @operation
    def positional_required(self, x: int, /) -> int:
        return x

    @operation
    def function(self, d: Any, callback: Any = None) -> Any:  # names like maybeDeferred's own
        return (d, callback)

    def not_exposed(self) -> None:
        pass

    @operation
    def _private(self) -> None:
        pass

    notcallable = 5


class RequestReplyTests(SynchronousTestCase):
    def test_a_request(self) -> None:
        message = request("add", {"a": 1}, reply_to="me", correlation_id="c1")
        self.assertEqual((message.type, message.headers[OP_HEADER], message.content_type), (CALL, "add", JSON))
        self.assertEqual((message.reply_to, message.correlation_id, message.persistent), ("me", "c1", False))
        self.assertEqual(decode_request(message), ("add", {"a": 1}))
        self.assertTrue(request("x", {}, persistent=True).persistent)

    def test_bad_requests(self) -> None:
        for message, words in [
            (Message.of_json({}, type=CALL), "missing header 'op'"),
            (Message.of_json({}, type=CALL, headers={OP_HEADER: ""}), "non-empty string"),
            (Message.of_json({}, type=CALL, headers={OP_HEADER: 5}), "non-empty string"),
            (Message.of_json([1], type=CALL, headers={OP_HEADER: "op"}), "must be a JSON object, got list"),
            (Message(body=b"{", type=CALL, headers={OP_HEADER: "op"}), "not valid JSON"),
        ]:
            with self.assertRaises(BadMessage) as caught:
                decode_request(message)
            self.assertIn(words, str(caught.exception))

    def test_replies_json_and_bytes(self) -> None:
        self.assertEqual(decode_reply(reply({"v": [1, 2]}, "c")), {"v": [1, 2]})
        for value in (b"\x00\xff", bytearray(b"ab"), memoryview(b"cd")):
            message = reply(value, "c")
            self.assertEqual((message.type, message.content_type, message.correlation_id), (REPLY, BINARY, "c"))
            self.assertEqual(decode_reply(message), bytes(value))
        self.assertFalse(reply(1, None).persistent)

    def test_error_replies_carry_the_remote_type(self) -> None:
        message = error_reply(Failure(KeyError("k")), "c")
        self.assertEqual(message.type, ERROR)
        with self.assertRaises(RemoteError) as caught:
            decode_reply(message)
        self.assertEqual((caught.exception.remote_type, caught.exception.message), ("KeyError", "'k'"))
        # a remote error passed on keeps its original type
        passed_on = error_reply(Failure(RemoteError("IOError", "disk")), None)
        self.assertRaises(RemoteError, decode_reply, passed_on)
        self.assertEqual(passed_on.json(), {"type": "IOError", "message": "disk"})

    def test_typed_errors_come_back_typed(self) -> None:
        for cls in (UnknownOperation, BadArguments):
            message = error_reply(Failure(cls(cls.__name__, "why")), None)
            with self.assertRaises(cls):
                decode_reply(message)

    def test_undecodable_and_unexpected_replies(self) -> None:
        for body in (b"not json", b"[1]", b'{"type": "X"}'):
            with self.assertRaises(RemoteError) as caught:
                decode_reply(Message(body=body, type=ERROR))
            self.assertEqual(caught.exception.remote_type, "BadMessage")
        with self.assertRaises(BadMessage) as caught:
            decode_reply(Message.of_json(1, type=CALL))
        self.assertIn("expected a reply, got a message of type 'call'", str(caught.exception))


class OperationsTests(SynchronousTestCase):
    def test_only_marked_public_methods_are_exposed(self) -> None:
        found = operations(Service())
        self.assertEqual(sorted(found), ["add", "anything", "fails", "function", "later", "only_keywords",
                                         "positional_only", "positional_required"])


class BindingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ops = operations(Service())

    def call(self, op: str, /, **kwargs: Any) -> Deferred:
        return invoke(self.ops, "svc", request(op, kwargs))

    def test_arguments_that_fit(self) -> None:
        self.assertEqual(self.successResultOf(self.call("add", a=1)), 3)
        self.assertEqual(self.successResultOf(self.call("add", a=1, b=5)), 6)
        self.assertEqual(self.successResultOf(self.call("anything", x=1, y=[2])), {"x": 1, "y": [2]})
        self.assertEqual(self.successResultOf(self.call("only_keywords", name="n")), "n")
        self.assertEqual(self.successResultOf(self.call("later", value="v")), "v")
        self.assertEqual(self.successResultOf(self.call("positional_only")), 1)
        self.assertEqual(self.successResultOf(self.call("function", d=1, callback=2)), (1, 2))
        # twice: the second time from the cached shape
        self.assertEqual(self.successResultOf(self.call("add", a=2)), 4)

    def test_arguments_that_do_not_fit_name_what_is_wrong(self) -> None:
        for op, kwargs, words in [
            ("add", {}, "missing a required argument: 'a'"),
            ("add", {"a": 1, "c": 3}, "unexpected keyword argument 'c'"),
            ("only_keywords", {}, "missing a required argument: 'name'"),
            ("positional_only", {"x": 3}, "svc.positional_only"),
            ("positional_required", {}, "missing a required argument: 'x'"),
            ("anything", {"self": 1}, "unexpected keyword argument 'self'"),
        ]:
            failure = self.failureResultOf(self.call(op, **kwargs), BadArguments)
            self.assertIn(words, str(failure.value), op)
            self.assertEqual(failure.value.remote_type, "BadArguments")

    def test_an_unknown_operation_lists_the_known_ones(self) -> None:
        failure = self.failureResultOf(self.call("mul"), UnknownOperation)
        self.assertIn("svc has no operation 'mul' (known: add, anything", str(failure.value))
        failure = self.failureResultOf(invoke({}, "empty", request("x", {})), UnknownOperation)
        self.assertIn("(known: none)", str(failure.value))

    def test_a_bad_request_fails_the_deferred(self) -> None:
        self.failureResultOf(invoke(self.ops, "svc", Message(body=b"x", headers={OP_HEADER: "add"})), BadMessage)

    def test_the_operations_own_error(self) -> None:
        self.failureResultOf(self.call("fails"), KeyError)

    def test_resolve_returns_the_method_and_arguments(self) -> None:
        method, kwargs = resolve(self.ops, "svc", request("add", {"a": 1}))
        self.assertEqual((method(**kwargs), kwargs), (3, {"a": 1}))

    def test_an_operation_without_a_readable_signature_fails_the_deferred_not_the_caller(self) -> None:
        # a builtin has no signature inspect can read: the call itself says what does not fit,
        # through invoke's Deferred (invoke used to raise inspect's ValueError at its caller)
        class Builtins:
            biggest = operation(functools.partial(max))

        ops = operations(Builtins())
        d = invoke(ops, "svc", request("biggest", {"bogus": 1}))
        self.failureResultOf(d, TypeError)

    def test_callables_without_weak_references(self) -> None:
        partial = functools.partial(lambda a, b: a + b, 1)  # partials are not weak-referenceable
        self.assertTrue(_fits(partial, {"b": 2}))
        self.assertFalse(_fits(partial, {"c": 2}))
        ops = {"p": partial}
        self.assertEqual(self.successResultOf(invoke(ops, "svc", request("p", {"b": 2}))), 3)

    def test_bound_parameter(self) -> None:
        self.assertEqual(_bound_parameter(Service().add), "self")
        self.assertIsNone(_bound_parameter(len))
        self.assertIsNone(_bound_parameter(lambda **kw: kw))

        class Odd:
            def method(*args: Any) -> None:  # no first parameter to fill
                pass

        self.assertIsNone(_bound_parameter(Odd().method))
