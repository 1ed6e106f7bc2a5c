"""Fuzz decoding a delivered message: magnet.message.Message.json and
magnet.rpc's decode_request, resolve and decode_reply, on what the AMQP
transport hands the bus.

The first byte of an input picks how the message is made:

  0  from the wire: two bytes (little-endian) give the length of a content
     header's property list (flags, headers table, ...), decoded with
     magnet.amqp.wire.decode_properties; the rest is the body
  1  a JSON request (type call, content type application/json, op "echo"):
     the rest is the body
  2  a reply (type reply): the rest is the body
  3  an error reply (type error): the rest is the body

Asserts, for every message:
  - Message.json(): a value, or BadMessage
  - rpc.decode_request(): (op, dict), or BadMessage
  - rpc.resolve() against a small service: (method, kwargs), or BadMessage,
    UnknownOperation or BadArguments; and when it resolves, calling the
    method with those kwargs binds (no TypeError)
  - rpc.decode_reply(): a value, or a MagnetError (RemoteError, BadMessage):
    Bus._on_reply catches only MagnetError, anything else would leave the
    caller's call waiting forever
and that each input finishes within libFuzzer's -timeout. fuzz/message.dict
(JSON's tokens, the service's parameter names) is used by default.

    .venv/bin/python fuzz/fuzz_message.py -max_total_time=60 fuzz/corpus-run/message fuzz/corpus/message
"""
from __future__ import annotations


import os

import _harness
import atheris

with atheris.instrument_imports(include=["magnet"]):
    from magnet import rpc
    from magnet.amqp.wire import decode_properties
    from magnet.errors import BadArguments, BadFrame, BadMessage, MagnetError, UnknownOperation
    from magnet.message import JSON, Message


class Service:
    @rpc.operation
    def echo(self, value=None):
        return value

    @rpc.operation
    def get(self, name, *, version=0):
        return (name, version)

    @rpc.operation
    def anything(self, **kwargs):
        return kwargs

    @rpc.operation
    def positional(self, a, /, b=1):  # positional-only without default: only bind() can tell
        return (a, b)


OPS = rpc.operations(Service())


def check(message: Message) -> None:
    try:
        message.json()
    except BadMessage:
        pass
    try:
        op, kwargs = rpc.decode_request(message)
        assert isinstance(op, str) and op and isinstance(kwargs, dict)
    except BadMessage:
        pass
    try:
        method, kwargs = rpc.resolve(OPS, "svc", message)
    except (BadMessage, UnknownOperation, BadArguments):
        pass
    else:
        method(**kwargs)  # resolve said it binds
    try:
        rpc.decode_reply(message)
    except MagnetError:
        pass


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        if len(rest) < 2:
            return
        n = rest[0] | rest[1] << 8
        try:
            message, _ = decode_properties(rest[2:2 + n], 0, rest[2 + n:])
        except BadFrame:
            return
    elif mode == 1:
        message = Message(body=rest, content_type=JSON, type=rpc.CALL, headers={rpc.OP_HEADER: "echo"})
    elif mode == 2:
        message = Message(body=rest, content_type=JSON, type=rpc.REPLY)
    else:
        message = Message(body=rest, content_type=JSON, type=rpc.ERROR)
    check(message)


if __name__ == "__main__":
    _harness.run(TestOneInput, extra=("-dict=" + os.path.join(_harness.ROOT, "fuzz", "message.dict"),))
