"""Fuzz the frame reader of magnet.amqp (_AMQPProtocol.dataReceived): the
bytes of a broker connection, frames and all, on a protocol with a consumer
on channel 1 and the publishing channel on channel 2 (the fast paths) and
txAMQP's slow path for everything else.

An input: the first byte says where to cut the rest in two (two
dataReceived calls, so frames split across reads are exercised too); the
rest is what the broker sends after the protocol header.

Asserts: dataReceived raises nothing (bad data drops the connection:
abortConnection), a delivery reaching the consumer carries a Message with a
bytes body, and each input finishes within libFuzzer's -timeout.

With FUZZ_FRAME_MAX=1 in the environment it also asserts that the protocol
never buffers more than one frame of the negotiated frame_max (plus its
8 bytes of framing) while waiting for the rest of a frame (it buffered up
to 4 GiB before the fix; see fuzz/README.md).

    .venv/bin/python fuzz/fuzz_amqp_frames.py -max_total_time=60 fuzz/corpus-run/amqp_frames fuzz/corpus/amqp_frames
"""
from __future__ import annotations

import os

import _harness  # noqa: F401  (sys.path)
import atheris

with atheris.instrument_imports(include=["magnet", "txamqp"]):
    from twisted.internet import task
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogBeginner

    from magnet import amqp
    from magnet.amqp.wire import load_spec, parse_url
    from magnet.message import Message

SPEC = load_spec()
URL = parse_url("amqp://guest:guest@127.0.0.1:5672/")
STRICT_FRAME_MAX = os.environ.get("FUZZ_FRAME_MAX") == "1"


class Owner:
    """What the protocol calls on its AMQPTransport."""

    def _broker_cancelled(self, state, tag):
        pass

    def _channel_closed(self, protocol, channel_id, fast, code, text):
        pass

    def _nacked(self, channel, nacked):
        pass

    def _connection_lost(self, protocol, reason):
        pass

    def _connection_blocked(self, protocol, reason):
        assert isinstance(reason, str) and protocol.blocked == reason

    def _connection_unblocked(self, protocol):
        assert protocol.blocked is None


class Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True


class Consumer:
    queue = "q"
    prefetch = 10
    no_ack = False

    def __init__(self):
        self.deliveries = []

    def on_delivery(self, delivery):
        assert isinstance(delivery.message, Message) and isinstance(delivery.message.body, bytes)
        self.deliveries.append(delivery)
        delivery.ack()


def _quiet(event):
    pass


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    cut, rest = data[0], data[1:]
    protocol = amqp._AMQPProtocol(Owner(), URL, SPEC, task.Clock(), 0)
    transport = Transport()
    protocol.makeConnection(transport)
    consumer = Consumer()
    protocol.fast[1] = amqp._ConsumerChannel(protocol, 1, consumer, "ctag")
    protocol.fast[2] = amqp._PublishChannel(protocol, 2)
    for part in (rest[:cut], rest[cut:]):
        if transport.aborted or protocol.lost:
            break
        protocol.dataReceived(part)
        if STRICT_FRAME_MAX and not transport.aborted:
            assert len(protocol._rbuf) <= protocol.frame_max + 8, (
                f"buffering {len(protocol._rbuf)} bytes of a frame; frame_max is {protocol.frame_max}")


if __name__ == "__main__":
    # the protocol logs every bad frame it drops: not to stderr, a line per input
    globalLogBeginner.beginLoggingTo([_quiet], redirectStandardIO=False, discardBuffer=True)
    _harness.run(TestOneInput)
