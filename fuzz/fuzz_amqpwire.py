"""Fuzz magnet.amqp.wire's decoders: what a broker, or a hostile peer posing as
one, puts on the wire.

The first byte of an input picks the decoder, the rest is its bytes:

  0  decode_table(data): a field table with its 4-byte length prefix; a table
     that decodes must survive encode_table and decode to the same value
  1  decode_properties(data, 0, body): a basic content header's property
     flags and list (with end=len(data))
  2  a method frame's payload (class id, method id, arguments) decoded field by
     field with _Codec, as magnet.amqp decodes the methods off its fast path
     (an id the spec lacks is replaced by one it has)
  3  _Codec.decode_table on a stream (a table inside a method's arguments)

Asserts: the only exception is magnet.errors.BadFrame (a ValueError), never
IndexError, struct.error, RecursionError, MemoryError, txAMQP's EOF; every
input finishes within libFuzzer's -timeout (10 s by default here).

    .venv/bin/python fuzz/fuzz_amqpwire.py -max_total_time=60 fuzz/corpus/amqpwire
"""
from __future__ import annotations

import math
from io import BytesIO

import _harness  # noqa: F401  (sys.path)
import atheris

with atheris.instrument_imports(include=["magnet", "txamqp"]):
    from magnet.amqp import wire as amqpwire
    from magnet.errors import BadFrame

SPEC = amqpwire.load_spec()
CLASSES = sorted(SPEC.classes.byid)


def same(a, b) -> bool:
    """Equality, with NaN equal to NaN (a float field may carry one)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def table(data: bytes) -> None:
    decoded = amqpwire.decode_table(data)
    try:
        again = amqpwire.encode_table(decoded)
    except ValueError:  # an unsigned 64-bit 'L' above 2**63-1 has no signed encoding
        return
    redecoded = amqpwire.decode_table(again)
    assert same(redecoded, decoded), (decoded, redecoded)


def properties(data: bytes) -> None:
    message, seq = amqpwire.decode_properties(data, 0, b"body", len(data))
    assert message.body == b"body"
    assert isinstance(message.headers, dict)


def method(data: bytes) -> None:
    c = amqpwire._Codec(BytesIO(data))
    class_id = c.decode_short()
    klass = SPEC.classes.byid.get(class_id) or SPEC.classes.byid[CLASSES[class_id % len(CLASSES)]]
    method_id = c.decode_short()
    methods = sorted(klass.methods.byid)
    meth = klass.methods.byid.get(method_id) or klass.methods.byid[methods[method_id % len(methods)]]
    for f in meth.fields:
        c.decode(f.type)


def codec_table(data: bytes) -> None:
    amqpwire._Codec(BytesIO(data)).decode_table()


MODES = (table, properties, method, codec_table)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    try:
        MODES[data[0] % len(MODES)](data[1:])
    except BadFrame:
        pass


if __name__ == "__main__":
    _harness.run(TestOneInput)
