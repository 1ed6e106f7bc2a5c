"""Fuzz the receiving end of magnet streams: the messages of a stream as they
reach a listen address (magnet.bus.Listener._on_stream_message, which makes
and feeds magnet.stream.Stream objects).

An input is a run of records, each one message:

  one octet: bits 0-1 the type (stream-start, -data, -end, -error); bit 2 set:
             headers made up as a sender would ({x-stream: id, x-seq: next}),
             bit 3 picking one of two stream ids; bit 2 clear: a field table
             follows (two-byte length, then the table, decoded with
             magnet.amqp.wire.decode_table); bits 6-7: seconds the clock moves
             on before the message (the idle timeout is 5 s)
  two octets (little-endian): the body's length, then the body

Every stream that starts gets a sink at once (the on_stream hook, as the
proxy's is). Asserts:
  - _on_stream_message raises nothing but BadMessage
  - a stream's Deferred (deliver) fails with nothing but StreamError or Timeout,
    and when it succeeds its byte count is the bytes the sink took
  - nothing raises out of the clock (an idle timeout's callback)
  - in the end (the clock moved past every idle timeout), every Deferred that
    _on_stream_message returned has fired: each message is acknowledged, none
    holds the consumer's prefetch for ever
and that each input finishes within libFuzzer's -timeout.

    .venv/bin/python fuzz/fuzz_stream.py -max_total_time=60 fuzz/corpus-run/stream fuzz/corpus/stream
"""
from __future__ import annotations

from typing import Any, List

import _harness  # noqa: F401  (sys.path)
import atheris

with atheris.instrument_imports(include=["magnet"]):
    from twisted.internet import task
    from twisted.internet.defer import Deferred
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    from magnet import stream
    from magnet.amqp.wire import decode_table
    from magnet.bus import Listener
    from magnet.errors import BadFrame, BadMessage, StreamError, Timeout
    from magnet.message import BINARY, JSON, Message

KINDS = (stream.START, stream.DATA, stream.END, stream.ABORT)
IDS = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
IDLE = 5.0


class FakeBus:
    log = Logger()

    def __init__(self) -> None:
        self.clock = task.Clock()


def TestOneInput(data: bytes) -> None:
    bus = FakeBus()
    problems: List[str] = []
    settles: List[Deferred] = []
    seqs = {sid: 0 for sid in IDS}

    def on_stream(s: stream.Stream) -> None:
        taken = [0]

        def sink(chunk: bytes) -> None:
            taken[0] += len(chunk)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                if not result.check(StreamError, Timeout):
                    problems.append(f"stream failed with {result.type.__name__}: {result.getErrorMessage()}")
            elif result != taken[0]:
                problems.append(f"stream ended with {result!r}, sink took {taken[0]}")

        s.deliver(sink).addBoth(done)

    listener = Listener(bus, "magnet.listen.fuzz", None, IDLE, on_stream)
    pos = 0
    while pos < len(data):
        head = data[pos]
        pos += 1
        bus.clock.advance(head >> 6)
        kind = KINDS[head & 3]
        if head & 4:
            sid = IDS[(head >> 3) & 1]
            if kind == stream.START:
                seqs[sid] = 0
            headers: Any = {stream.STREAM_HEADER: sid, stream.SEQ_HEADER: seqs[sid]}
            seqs[sid] += 1
        else:
            n = int.from_bytes(data[pos:pos + 2], "little")
            raw = data[pos + 2:pos + 2 + n]
            pos += 2 + n
            try:
                headers = decode_table(raw)
            except BadFrame:
                headers = {}
        n = int.from_bytes(data[pos:pos + 2], "little")
        body = data[pos + 2:pos + 2 + n]
        pos += 2 + n
        message = Message(body=body, headers=headers, type=kind, persistent=False,
                          content_type=BINARY if kind == stream.DATA else JSON)
        try:
            settled = listener._on_stream_message(message)
        except BadMessage:
            continue
        settles.append(settled)
    for _ in range(3):
        bus.clock.advance(IDLE * 2)
    unfired = sum(1 for d in settles if not d.called)
    if unfired:
        problems.append(f"{unfired} of {len(settles)} messages never settled (never acknowledged)")
    if problems:
        raise AssertionError("; ".join(problems))


if __name__ == "__main__":
    _harness.run(TestOneInput)
