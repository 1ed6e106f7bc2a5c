"""Write the seed corpora under fuzz/corpus/ from real inputs: frames and
tables built with magnet's own encoders, the messages its RPC and stream code
sends, the config files in etc/, URLs and regexes the tests use.

    .venv/bin/python fuzz/make_seeds.py            # every target
    .venv/bin/python fuzz/make_seeds.py amqpwire   # one

Seeds are small and deterministic (named by content hash), so running this
again changes nothing that is committed.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import os
import struct
import sys
from decimal import Decimal
from io import BytesIO

import _harness

CORPUS = os.path.join(_harness.ROOT, "fuzz", "corpus")


def write(target: str, seeds) -> int:
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    n = 0
    for seed in seeds:
        if isinstance(seed, str):
            seed = seed.encode("utf-8")
        name = "seed-" + hashlib.sha1(seed).hexdigest()[:16]
        with open(os.path.join(folder, name), "wb") as f:
            f.write(seed)
        n += 1
    return n


# --------------------------------------------------------------------------- #
# magnet

TABLES = [
    {},
    {"str": "héllo", "bytes": b"\x00\xff\xfe binary", "empty": b"", "int": 42, "neg": -7,
     "big": 2 ** 40, "float": 2.5, "true": True, "false": False, "none": None},
    {"nested": {"a": 1, "b": {"c": "d"}}, "list": [1, "two", b"3", None, [4.0]],
     "decimal": Decimal("12.34")},
    {"t": datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)},
    {"x-stream": "0123456789abcdef0123456789abcdef", "x-seq": 3},
    {"op": "get_dataset", "x-magnet-attempt": 2},
    {"x-match": "all", "x-dead-letter-exchange": "", "x-queue-type": "quorum"},
]


def _signed_and_unsigned_table() -> bytes:
    """Field types magnet never writes but RabbitMQ may: b B s u i L f D."""
    body = b""
    for key, kind, packed in ((b"b", b"b", struct.pack(">b", -3)), (b"B", b"B", b"\xfe"),
                              (b"s", b"s", struct.pack(">h", -300)), (b"u", b"u", struct.pack(">H", 60000)),
                              (b"i", b"i", struct.pack(">I", 4000000000)),
                              (b"L", b"L", struct.pack(">Q", 2 ** 63 + 5)),
                              (b"f", b"f", struct.pack(">f", 1.5)), (b"D", b"D", b"\x02" + struct.pack(">i", 1234))):
        body += bytes([len(key)]) + key + kind + packed
    return struct.pack(">I", len(body)) + body


def amqpwire_seeds():
    from magnet import rpc
    from magnet.amqp import wire as amqpwire
    from magnet.message import Message

    deep: object = {"k": [1, {"a": "b"}]}
    for _ in range(amqpwire.MAX_TABLE_DEPTH - 2):
        deep = {"k": deep}
    tables = [amqpwire.encode_table(t) for t in TABLES + [deep]] + [_signed_and_unsigned_table()]
    for t in tables:
        yield b"\x00" + t
        yield b"\x03" + t
    messages = [
        Message(),
        Message.of_json({"a": 1}, correlation_id="c1", reply_to="amq.rabbitmq.reply-to", type="call",
                        headers={"op": "ping"}, message_id="m1", timestamp=1700000000, expiration="5000"),
        Message(body=b"\x00\x01", content_type="application/octet-stream", type="stream-data",
                headers={"x-stream": "s1", "x-seq": 1}, persistent=False),
        rpc.request("get", {"name": "x"}, reply_to="r", correlation_id="1"),
    ]
    for m in messages:
        yield b"\x01" + amqpwire.encode_properties(m)
        yield b"\x01" + amqpwire.encode_properties(m, seq=7)
    spec = amqpwire.load_spec()
    args = {
        ("connection", "start"): (0, 9, {"product": "RabbitMQ", "capabilities": {"publisher_confirms": True}},
                                  "AMQPLAIN PLAIN", "en_US"),
        ("connection", "tune"): (2047, 131072, 60),
        ("connection", "close"): (320, "CONNECTION_FORCED - broker forced connection closure", 0, 0),
        ("channel", "close"): (404, "NOT_FOUND - no queue 'q'", 50, 10),
        ("queue", "declare-ok"): ("amq.gen-abc", 3, 1),
        ("basic", "deliver"): ("ctag", 17, True, "ex", "rk"),
        ("basic", "return"): (312, "NO_ROUTE", "ex", "rk"),
        ("basic", "ack"): (5, True),
        ("basic", "nack"): (5, False, True),
        ("basic", "cancel"): ("ctag", False),
        ("basic", "consume-ok"): ("ctag",),
        ("exchange", "declare"): (0, "ex", "topic", False, True, False, False, False, {"alternate-exchange": "ae"}),
    }
    for (cname, mname), values in args.items():
        klass = spec.classes.byname[cname]
        meth = klass.methods.byname[mname]
        buf = BytesIO()
        c = amqpwire._Codec(buf)
        c.encode_short(klass.id)
        c.encode_short(meth.id)
        for field, value in zip(meth.fields, values):
            c.encode(field.type, value)
        c.flush()
        yield b"\x02" + buf.getvalue()


def _wire(message) -> bytes:
    from magnet.amqp import wire as amqpwire

    props = amqpwire.encode_properties(message)
    return b"\x00" + bytes([len(props) & 0xFF, len(props) >> 8]) + props + message.body


def message_seeds():
    from twisted.python.failure import Failure

    from magnet import rpc
    from magnet.errors import BadArguments
    from magnet.message import Message

    requests = [
        rpc.request("echo", {"value": [1, 2.5, "x", None, True, {"a": "é"}]}, reply_to="r", correlation_id="1"),
        rpc.request("get", {"name": "fnoc1", "version": 3}, reply_to="r", correlation_id="2"),
        rpc.request("anything", {}, correlation_id="3"),
        rpc.request("positional", {"a": 1}, correlation_id="4"),
        rpc.request("missing", {"x": 1}),
        rpc.request("anything", {"self": 1}),  # was a TypeError past resolve (see fuzz/README.md)
    ]
    replies = [
        rpc.reply({"status": 200, "headers": [["Content-Type", "text/plain"]]}, "1"),
        rpc.reply(b"\x00binary\xff", "2"),
        rpc.error_reply(Failure(BadArguments("BadArguments", "get: missing a required argument: 'name'")), "3"),
        rpc.error_reply(Failure(KeyError("fnoc1")), "4"),
    ]
    for m in requests + replies + [Message(body=b"\xef\xbb\xbf{}", content_type="application/json")]:
        yield _wire(m)
    yield b"\x01" + b'{"value": {"nested": [[[[1]]]]}}'
    yield b"\x01" + '{"value": "\\ud800 \u00e9"}'.encode("utf-16")
    yield b"\x02" + b'[1e400, -0.0, 12345678901234567890]'
    yield b"\x03" + b'{"type": "UnknownOperation", "message": "svc has no operation"}'
    yield b"\x03" + b'{"type": ["x"], "message": {}}'


def _record(head: int, body: bytes, table: bytes = b"") -> bytes:
    out = bytes([head])
    if not head & 4:
        out += len(table).to_bytes(2, "little") + table
    return out + len(body).to_bytes(2, "little") + body


def stream_seeds():
    """Streams as StreamWriter sends them (start, data, end / error), in the
    records of fuzz_stream.py."""
    import json

    from magnet.amqp import wire as amqpwire

    start = json.dumps({"status": 200, "headers": {"Content-Type": ["text/plain"]}}).encode()
    whole = (_record(4, start) + _record(5, b"hello ") + _record(5, b"world")
             + _record(6, json.dumps({"chunks": 2, "bytes": 11}).encode()))
    yield whole
    yield _record(4, start) + _record(5, b"x" * 100) + _record(7, b'{"type": "OSError", "message": "disk full"}')
    yield _record(4, b"{}") + _record(5 | 0x40, b"late") + _record(6 | 0xC0, b'{"chunks": 1, "bytes": 4}')
    yield _record(4, b"{}") + _record(12, b"{}") + _record(5, b"a") + _record(13, b"b") + _record(6, b'{"bytes": 1}')
    sid = "0123456789abcdef0123456789abcdef"
    yield (_record(0, b"{}", amqpwire.encode_table({"x-stream": sid, "x-seq": 0}))
           + _record(1, b"data", amqpwire.encode_table({"x-stream": sid, "x-seq": 1}))
           + _record(2, b'{"chunks": 1, "bytes": 4}', amqpwire.encode_table({"x-stream": sid, "x-seq": 2})))
    yield _record(1, b"orphan", amqpwire.encode_table({"x-stream": sid, "x-seq": 5}))


def config_seeds():
    """etc/*.yaml, and a few files with the sections they leave out."""
    for path in sorted(glob.glob(os.path.join(_harness.ROOT, "etc", "*.yaml"))):
        with open(path, "rb") as f:
            yield f.read()
    yield ("node: edge-1\nbroker: [amqp://a:5672/, amqps://u:p@b:5671/vh]\nqueue_type: quorum\n"
           "components:\n  fetcher: {process: child, instances: 2, max_redirects: 0}\n"
           "  web: {port: 0, interface: '::1'}\n  proxyng: {port: 8101}\n"
           "  attribute_store: {url: 'postgresql://dx:secret@db.example.org/dx'}\n"
           "security:\n  token: 0123456789abcdef0123\n  allow_hosts: ['*.example.org', '[::1]:8080', 'dap.org:80', "
           "10.0.0.1]\n  allow_private: true\n  read_token: true\nlogging: {format: json, level: debug}\n")
    yield "timeouts:\n  <<: {rpc: 5, send: 5}\n  heartbeat: 0\n"
    yield "http: {proxy_port: 8080, web_port: 8081}\ndata_dir: ~/dx\nprefetch: 1\nretries: {limit: 0}\n"
    yield "components:\n  persister: {subscription: p.1, retry_after: 1.5, retry_max: 1000.0}\n  cache: {max_age: 0}\n"


def amqp_frames_seeds():
    """A delivery on the consumer's channel, confirms and a return on the
    publishing channel, a broker's channel.close and heartbeats, as frames."""
    import struct as st

    from magnet.amqp import wire as amqpwire
    from magnet.message import Message

    def frame(ftype: int, channel: int, payload: bytes) -> bytes:
        return st.pack(">BHI", ftype, channel, len(payload)) + payload + b"\xce"

    def method(channel: int, class_id: int, method_id: int, args: bytes) -> bytes:
        return frame(1, channel, st.pack(">HH", class_id, method_id) + args)

    def short(s: bytes) -> bytes:
        return bytes([len(s)]) + s

    message = Message.of_json({"a": 1}, headers={"op": "x"}, correlation_id="c", reply_to="r")
    props = amqpwire.encode_properties(message)
    deliver = method(1, 60, 60, short(b"ctag") + st.pack(">QB", 1, 0) + short(b"ex") + short(b"rk"))
    header = frame(2, 1, st.pack(">HHQ", 60, 0, len(message.body)) + props)
    body = frame(3, 1, message.body)
    empty_header = frame(2, 1, st.pack(">HHQ", 60, 0, 0) + amqpwire.encode_properties(Message()))
    ack = method(2, 60, 80, st.pack(">QB", 1, 1))
    nack = method(2, 60, 120, st.pack(">QB", 2, 0))
    ret = method(2, 60, 50, st.pack(">H", 312) + short(b"NO_ROUTE") + short(b"ex") + short(b"rk"))
    ret_header = frame(2, 2, st.pack(">HHQ", 60, 0, 2) + amqpwire.encode_properties(Message(body=b"xy"), seq=1))
    ret_body = frame(3, 2, b"xy")
    close = method(3, 20, 40, st.pack(">H", 404) + short(b"NOT_FOUND - no queue 'q'") + st.pack(">HH", 50, 10))
    heartbeat = frame(8, 0, b"")
    cancel = method(1, 60, 30, short(b"ctag") + b"\x00")
    blocked = method(0, 10, 60, short(b"low on memory"))
    unblocked = method(0, 10, 61, b"")
    yield bytes([len(deliver) + 3]) + deliver + header + body + heartbeat
    yield bytes([7]) + deliver + empty_header + deliver + header + body[:5] + body[5:]
    yield bytes([40]) + ack + nack + ret + ret_header + ret_body
    yield bytes([0]) + close + heartbeat + cancel
    yield bytes([len(blocked)]) + blocked + ack + unblocked


def url_seeds():
    """Request targets (a proxy request, a dataset by name), a base URL, allow_hosts entries."""
    base = b"http://dap.example.org/dods/nc/fnoc1.nc"
    targets = [
        b"http://dap.example.org/dods/nc/fnoc1.nc.dds?u[0:1:1][0:1:2][0:1:3]",
        b"http://dap.example.org/dods/nc/fnoc1.nc.dods?u,v&lat>10&time=%222000-01-01%22",
        b"https://dap.example.org:8443/dods/nc/fnoc1.nc.das",
        b"http://127.0.0.1:8100/datasets/fnoc1.ascii?u[0]",
        b"/datasets/fnoc1.csv?u,v",
        b"/datasets/sst.nc.info",
        b"http://[::ffff:127.0.0.1]:80/x.dds",
        b"http://0x7f.1/dods/x.nc.dds",
        b"http://2130706433/x",
        b"http://dap.example.org/dods/nc/../../etc/passwd",
        b"http://dap.example.org/dods/nc/%2e%2e/x.dds#frag",
        b"ftp://dap.example.org/x",
        b"http://user:pw@dap.example.org/x",
    ]
    for t in targets:
        yield t + b"\n" + base
    yield targets[0] + b"\nhttp://dap.example.org/dods/\n*.example.org\n[::1]:8080\n10.0.0.1\ndap.example.org:80"
    yield b"http://localhost:8080/x.dds\nhttp://localhost:8080/x\nlocalhost:8080"


def routing_seeds():
    """Regexes and topics from tests/fast/core/test_routing.py and the dataset events."""
    pairs = [
        (r"^dataset\.", "dataset.sst"), (r"sst$", "event.saved.sst"), (r"^event\.saved\.", "event.saved.sst"),
        ("", "anything"), (r"(a+)+$", "aaaa!"), (r"(a|a)*b", "aaaa"), (r"^(\w+\s?)*$", "word word !"),
        (r"(a)\1", "aa"), (r"foo(?=bar)", "foobar"), (r"(?<=foo)bar", "foobar"), (r"[abc", "a"),
        (r"a{1001}", "a"), (r"((a{100}){100}){100}", "a"), (r"\Z", ""), (r"(\pL{1000}){20}", "é"),
        (r"(?i)^DATASET\.(sst|chl)_[0-9]{4}\b", "dataset.SST_2020 x"), (r"\p{Greek}+|[^\x00-\x7f]", "αβγ"),
        (r"(?s:.)\C*\z", "x\ny"), (r"^$", ""), (r"\Aa|b\z", "ab"), (r"(?P<name>x)+?", "xx"),
        (r"[[:alpha:]]{2,3}", "ab1"), (r"(?m)^x$", "a\nx\nb"), (r"\Qa.b\E", "a.b"),
    ]
    for regex, topic in pairs:
        yield regex.encode("utf-8") + b"\x00" + topic.encode("utf-8")


TARGETS = {"amqpwire": amqpwire_seeds, "message": message_seeds, "stream": stream_seeds, "config": config_seeds,
           "url": url_seeds, "routing": routing_seeds, "amqp_frames": amqp_frames_seeds}


def main(names) -> None:
    for name in names or TARGETS:
        print(f"{name}: {write(name, TARGETS[name]())} seeds in fuzz/corpus/{name}")


if __name__ == "__main__":
    main(sys.argv[1:])
