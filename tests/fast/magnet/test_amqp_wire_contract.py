"""magnet.amqp.wire's contract, without a broker: URLs, field tables, content
properties and frames encode and decode each other, and what cannot be
decoded is refused with L{BadFrame} (never IndexError, struct.error or a
RecursionError), including the fuzzers' seeds.
"""
from __future__ import annotations

import datetime
import math
import struct
from decimal import Decimal
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import wire
from magnet.amqp.wire import (
    MAX_TABLE_DEPTH,
    PUBLISH_SEQ_HEADER,
    BrokerURL,
    _Codec,
    _content_frames,
    _decode_table,
    _method_frame,
    _read_shortstr,
    _shortstr,
    _within,
    decode_properties,
    decode_table,
    encode_properties,
    encode_table,
    load_spec,
    parse_url,
    publish_seq,
)
from magnet.errors import BadFrame, BadURL
from magnet.message import Message

CORPUS = Path(__file__).resolve().parents[3] / "fuzz" / "corpus"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _raw(entries: bytes) -> bytes:
    """A field table of these raw entries, with its length prefix."""
    return struct.pack(">I", len(entries)) + entries


class URLTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        url = parse_url("amqp://")
        self.assertEqual((url.scheme, url.host, url.port, url.vhost, url.username, url.password),
                         ("amqp", "localhost", 5672, "/", "guest", "guest"))
        self.assertFalse(url.tls)
        self.assertIsNone(url.heartbeat)
        self.assertEqual(parse_url("amqps://h").port, 5671)

    def test_everything_given(self) -> None:
        url = parse_url("amqp://us%40er:p%3Ass@example.org:5673/my%2Fvhost?heartbeat=2.5&auth_mechanism=amqplain")
        self.assertEqual((url.username, url.password, url.host, url.port, url.vhost),
                         ("us@er", "p:ss", "example.org", 5673, "my/vhost"))
        self.assertEqual(url.heartbeat, 2.5)
        self.assertEqual(url.mechanism, "AMQPLAIN")

    def test_the_password_never_shows(self) -> None:
        url = parse_url("amqp://bob:secret@[::1]:5672/v")
        self.assertNotIn("secret", repr(url))
        self.assertNotIn("secret", str(url))
        self.assertEqual(url.masked(), "amqp://bob:***@[::1]:5672/v")
        self.assertEqual(repr(url), "<BrokerURL amqp://bob:***@[::1]:5672/v>")

    def test_tls_options(self) -> None:
        url = parse_url("amqps://h/?cacertfile=%2Fca.pem&certfile=/c.pem&keyfile=/k.pem"
                        "&server_name_indication=broker.example&verify=verify_peer")
        self.assertTrue(url.tls)
        self.assertEqual((url.cafile, url.certfile, url.keyfile, url.server_name),
                         ("/ca.pem", "/c.pem", "/k.pem", "broker.example"))
        self.assertEqual(url.tls_name, "broker.example")
        self.assertTrue(url.has_tls_options)
        self.assertEqual(parse_url("amqps://h/?cafile=/x").cafile, "/x")
        self.assertEqual(parse_url("amqps://h/").tls_name, "h")
        self.assertFalse(parse_url("amqps://h/").has_tls_options)
        # the same value twice is fine
        self.assertEqual(parse_url("amqps://h/?cafile=/x&cacertfile=/x").cafile, "/x")

    def test_refusals(self) -> None:
        for bad, words in [
            (b"amqp://", "must be a string"),
            ("http://h/", "not an AMQP URL"),
            ("amqp://h:notaport/", "bad broker URL"),
            ("amqp://h/?heartbeat=soon", "heartbeat must be a number"),
            ("amqp://h/?auth_mechanism=EXTERNAL", "auth_mechanism must be PLAIN or AMQPLAIN"),
            ("amqp://h/?cacertfile=/x", "needs an amqps:// URL"),
            ("amqps://h/?verify=verify_none", "always verifies"),
            ("amqps://h/?certfile=", "certfile needs a value"),
            ("amqps://h/?cafile=/a&cacertfile=/b", "given twice"),
            ("amqps://h/?keyfile=/k", "keyfile needs certfile"),
            ("amqp://h/?frame_max=1", "unknown option 'frame_max'"),
        ]:
            with self.assertRaises(BadURL) as caught:
                parse_url(bad)  # type: ignore[arg-type]
            self.assertIn(words, str(caught.exception), bad)
        with self.assertRaises(BadURL) as caught:
            parse_url("amqps://h/?x=1")
        self.assertIn("cacertfile", str(caught.exception))  # the TLS options are listed for amqps

    def test_brokerurl_is_hashable_for_the_tls_map(self) -> None:
        url = BrokerURL("amqps", "h", 1, "/", "u", "p")
        self.assertEqual({url: 1}[url], 1)


class TableTests(SynchronousTestCase):
    def test_every_encodable_type_round_trips(self) -> None:
        table = {
            "none": None, "yes": True, "no": False, "int": -7, "big": 2 ** 40, "float": 1.5,
            "nan": float("nan"), "text": "h\u00e9llo", "bytes": b"\x00\xff", "nested": {"a": {"b": [1, "x"]}},
            "array": [1, "two", None, [3.0]], "tuple": (1, 2), "decimal": Decimal("12.345"),
            "": "empty key",
        }
        decoded = decode_table(encode_table(table))
        expected = dict(table, tuple=[1, 2], nested={"a": {"b": [1, "x"]}})
        self.assertEqual(decoded.keys(), expected.keys())
        for key in table:
            if key == "decimal":
                self.assertEqual(decoded[key], Decimal("12.345"))
            elif key == "nan":
                self.assertTrue(math.isnan(decoded[key]))
            else:
                self.assertTrue(_same(decoded[key], expected[key]), (key, decoded[key]))

    def test_bytearray_and_memoryview_are_byte_arrays(self) -> None:
        self.assertEqual(decode_table(encode_table({"a": bytearray(b"ab"), "m": memoryview(b"cd")})),
                         {"a": b"ab", "m": b"cd"})

    def test_whole_decimals_and_positive_exponents(self) -> None:
        self.assertEqual(decode_table(encode_table({"d": Decimal("1E+3")}))["d"], Decimal(1000))
        self.assertEqual(decode_table(encode_table({"d": Decimal(7)}))["d"], Decimal(7))

    def test_datetimes_are_timestamps(self) -> None:
        aware = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        naive = datetime.datetime(2020, 1, 2, 3, 4, 5)  # taken as UTC
        decoded = decode_table(encode_table({"a": aware, "n": naive}))
        self.assertEqual(decoded, {"a": int(aware.timestamp()), "n": int(aware.timestamp())})

    def test_invalid_utf8_strings_stay_bytes(self) -> None:
        data = _raw(b"\x01kS" + struct.pack(">I", 2) + b"\xff\xfe")
        self.assertEqual(decode_table(data), {"k": b"\xff\xfe"})

    def test_the_types_only_rabbitmq_writes_decode(self) -> None:
        entries = (b"\x01b" + b"b\xff" + b"\x01B" + b"B\xff" + b"\x01s" + b"s\xff\xfe" + b"\x01u" + b"u\xff\xfe"
                   + b"\x01i" + b"i\xff\xff\xff\xff" + b"\x01L" + b"L" + b"\xff" * 8 + b"\x01f" + b"f"
                   + struct.pack(">f", 0.5) + b"\x01T" + b"T" + struct.pack(">Q", 99) + b"\x01l" + b"l"
                   + struct.pack(">q", -2))
        self.assertEqual(decode_table(_raw(entries)), {
            "b": -1, "B": 255, "s": -2, "u": 65534, "i": 2 ** 32 - 1, "L": 2 ** 64 - 1, "f": 0.5, "T": 99, "l": -2})

    def test_what_does_not_fit_is_refused_on_encoding(self) -> None:
        self.assertRaises(ValueError, encode_table, {"k": 2 ** 64})
        self.assertRaises(TypeError, encode_table, {"k": object()})
        self.assertRaises(ValueError, encode_table, {"k" * 256: 1})
        self.assertRaises(ValueError, _shortstr, b"x" * 256)

    def test_truncations_are_badframe(self) -> None:
        data = encode_table({"text": "hello", "n": 5, "arr": [1, 2], "d": Decimal("1.5"), "t": True,
                             "f": {"x": 1}, "b": b"xy"})
        for cut in range(len(data)):
            with self.assertRaises(BadFrame, msg=f"cut at {cut}"):
                decode_table(data[:cut])

    def test_lengths_past_what_holds_them_are_badframe(self) -> None:
        for entries in [
            b"\x01kS" + struct.pack(">I", 99),  # string longer than the table
            b"\x01kA" + struct.pack(">I", 99),  # array longer than the table
            b"\x01kF" + struct.pack(">I", 99),  # nested table longer than the table
            b"\x01kI\x00",  # a 4-byte integer with one byte
            b"\x01kt",  # a boolean with no byte
            b"\x01kD\x01\x00",  # a decimal cut short
            b"\x05ab",  # a key past the end
            b"\x01k",  # a key with no value
            b"\x01kS\x00\x00",  # a string length cut short
            b"\x01kA\x00",  # an array length cut short
            b"\x01kF\x00",  # a table length cut short
        ]:
            with self.assertRaises(BadFrame, msg=repr(entries)):
                decode_table(_raw(entries))

    def test_an_unknown_field_type_is_badframe(self) -> None:
        with self.assertRaises(BadFrame) as caught:
            decode_table(_raw(b"\x01kZ"))
        self.assertIn("unknown AMQP field type 'Z'", str(caught.exception))

    def test_deep_nesting_is_badframe_not_recursionerror(self) -> None:
        inner = b""
        for _ in range(MAX_TABLE_DEPTH + 2):
            inner = _raw(b"\x01kF" + inner) if inner else _raw(b"")
        self.assertRaises(BadFrame, decode_table, inner)
        arrays = b""
        for _ in range(MAX_TABLE_DEPTH + 2):
            arrays = b"A" + struct.pack(">I", len(arrays)) + arrays if arrays else b"V"
        self.assertRaises(BadFrame, decode_table, _raw(b"\x01k" + arrays))
        # at the limit it still decodes
        ok: Any = 1
        for _ in range(MAX_TABLE_DEPTH - 1):
            ok = {"k": ok}
        self.assertEqual(decode_table(encode_table(ok)), ok)

    def test_a_table_must_end_by_the_given_end(self) -> None:
        data = encode_table({"a": 1})
        self.assertEqual(_decode_table(data + b"junk", 0), ({"a": 1}, len(data)))
        self.assertRaises(BadFrame, _decode_table, data, 0, len(data) - 1)
        self.assertEqual(_decode_table(data, 0, 10 ** 6)[0], {"a": 1})  # an end past the buffer is the buffer's

    def test_within(self) -> None:
        _within(5, 5, "x")
        with self.assertRaises(BadFrame) as caught:
            _within(7, 5, "basic.ack")
        self.assertIn("basic.ack runs 2 byte(s) past the end of its frame", str(caught.exception))

    def test_the_fuzzers_seeds_decode_or_are_refused_with_badframe(self) -> None:
        """As fuzz/fuzz_amqpwire.py reads them: the first byte picks the decoder.
        The only exception allowed is BadFrame; a table that decodes survives
        encoding again (unless it holds an unsigned 64-bit value too big to write)."""
        seeds = [s.read_bytes() for s in sorted((CORPUS / "amqpwire").glob("seed-*"))]
        self.assertGreater(len(seeds), 10)
        decoded = refused = 0
        for data in seeds:
            if not data:
                continue
            try:
                if data[0] == 0:
                    table = decode_table(data[1:])
                    try:
                        again = encode_table(table)
                    except ValueError:
                        pass
                    else:
                        self.assertTrue(_same(decode_table(again), table), data)
                elif data[0] == 1:
                    decode_properties(data[1:], 0, b"body", len(data) - 1)
                else:
                    _Codec(BytesIO(data[1:])).decode_table()
                decoded += 1
            except BadFrame:
                refused += 1
        self.assertGreater(decoded, 0)
        self.assertGreater(refused, 0)


class PropertiesTests(SynchronousTestCase):
    def test_every_property_round_trips(self) -> None:
        message = Message(body=b"b", headers={"h": 1, "s": "x"}, content_type="text/plain", correlation_id="c",
                          reply_to="r", message_id="m", type="t", persistent=True, expiration="1000",
                          timestamp=1234567890)
        decoded, seq = decode_properties(encode_properties(message), 0, b"b")
        self.assertEqual(decoded, message)
        self.assertIsNone(seq)

    def test_a_bare_message(self) -> None:
        message = Message(body=b"", persistent=False)
        decoded, seq = decode_properties(encode_properties(message), 0, b"")
        self.assertEqual(decoded, message)
        self.assertEqual(encode_properties(message), struct.pack(">H", 1 << 12) + b"\x01")

    def test_the_publish_sequence_travels_in_the_cluster_id_property_and_consumers_skip_it(self) -> None:
        message = Message(body=b"x", headers={"a": 1}, content_type="a/b", correlation_id="c", reply_to="r",
                          expiration="5", message_id="m", timestamp=7, type="t")
        props = encode_properties(message, seq=42)
        self.assertEqual(props[-3:], b"\x0242")  # the last property, after everything a Message has
        self.assertEqual(struct.unpack(">H", props[:2])[0] & (1 << 2), 1 << 2)
        self.assertEqual(publish_seq(props, 0, len(props)), 42)
        decoded, seq = decode_properties(props, 0, b"x")
        self.assertEqual(decoded, message)  # no trace of it
        self.assertIsNone(seq)
        self.assertIsNone(publish_seq(encode_properties(message), 0, len(encode_properties(message))))

    def test_the_publish_sequence_is_found_past_every_other_property(self) -> None:
        # content-encoding, priority, user-id and app-id come before cluster-id too
        flags = (1 << 15) | (1 << 14) | (1 << 13) | (1 << 12) | (1 << 11) | (1 << 4) | (1 << 3) | (1 << 2)
        props = (struct.pack(">H", flags) + b"\x01a" + b"\x04gzip" + encode_table({"k": "v"}) + b"\x02\x05"
                 + b"\x04user" + b"\x03app" + b"\x017")
        self.assertEqual(publish_seq(props, 0, len(props)), 7)
        with self.assertRaises(BadFrame):
            publish_seq(props, 0, len(props) - 1)
        self.assertIsNone(publish_seq(props[:-2] + b"\x01x", 0, len(props)))  # not a number: matches nothing

    def test_an_earlier_magnets_sequence_header_is_still_read_and_taken_out(self) -> None:
        props = encode_properties(Message(body=b"x", headers={"a": 1, PUBLISH_SEQ_HEADER: 42}))
        self.assertEqual(publish_seq(props, 0, len(props)), 42)
        decoded, seq = decode_properties(props, 0, b"x")
        self.assertEqual(seq, 42)
        self.assertEqual(decoded.headers, {"a": 1})

    def test_properties_magnet_does_not_keep_are_skipped(self) -> None:
        # content-encoding (bit 14), priority (bit 11), user-id/app-id/cluster-id are ignored
        props = (struct.pack(">H", (1 << 14) | (1 << 12) | (1 << 11)) + b"\x04gzip" + b"\x02" + b"\x05")
        decoded, _ = decode_properties(props, 0, b"z")
        self.assertEqual(decoded, Message(body=b"z", persistent=True))

    def test_a_continuation_flag_word_is_tolerated(self) -> None:
        props = struct.pack(">HH", (1 << 12) | 1, 0) + b"\x01"
        decoded, _ = decode_properties(props, 0, b"")
        self.assertFalse(decoded.persistent)

    def test_truncated_properties_are_badframe(self) -> None:
        full = encode_properties(Message(body=b"", headers={"k": "v"}, content_type="a/b", correlation_id="c",
                                         reply_to="r", expiration="5", message_id="m", timestamp=1, type="t"))
        for cut in range(len(full)):
            with self.assertRaises(BadFrame, msg=f"cut at {cut}"):
                decode_properties(full[:cut], 0, b"")
            with self.assertRaises(BadFrame, msg=f"end at {cut}"):
                decode_properties(full, 0, b"", end=cut)

    def test_a_reply_address_is_not_kept_in_the_names_cache(self) -> None:
        # a listen address is new for every proxied request: cached, 2,048 of them (about
        # 0.4-0.6 MB) pushed out the names that repeat (the soak, docs/reliability.md#soak)
        before = wire._shortstr_cached.cache_info().currsize
        for i in range(20):
            message = Message(body=b"", reply_to=f"magnet.listen.n.{i:032x}", type="call", content_type="a/b")
            decoded, _ = decode_properties(encode_properties(message), 0, b"")
            self.assertEqual(decoded.reply_to, message.reply_to)
        self.assertLessEqual(wire._shortstr_cached.cache_info().currsize, before + 2)  # the type, the content type

    def test_read_shortstr(self) -> None:
        self.assertEqual(_read_shortstr(b"\x02ab!", 0), ("ab", 3))
        self.assertRaises(BadFrame, _read_shortstr, b"\x05ab", 0)


class FrameTests(SynchronousTestCase):
    def test_a_method_frame(self) -> None:
        self.assertEqual(_method_frame(3, b"xy"), b"\x01\x00\x03\x00\x00\x00\x02xy\xce")

    def test_content_frames_split_the_body_by_frame_max(self) -> None:
        message = Message(body=b"a" * 45)
        frames = b"".join(_content_frames(1, message, None, 28))
        pos, bodies, header = 0, [], None
        while pos < len(frames):
            ftype, channel, size = struct.unpack_from(">BHI", frames, pos)
            payload = frames[pos + 7:pos + 7 + size]
            self.assertEqual(frames[pos + 7 + size], 0xCE)
            self.assertEqual(channel, 1)
            if ftype == 2:
                header = payload
            else:
                self.assertEqual(ftype, 3)
                self.assertLessEqual(size, 20)
                bodies.append(payload)
            pos += 8 + size
        assert header is not None
        self.assertEqual(struct.unpack_from(">HHQ", header), (60, 0, 45))
        self.assertEqual(b"".join(bodies), b"a" * 45)
        self.assertEqual(len(bodies), 3)

    def test_content_frames_of_one_small_body_and_of_none(self) -> None:
        self.assertEqual(len(_content_frames(1, Message(body=b"abc"), 7, 4096)), 4)  # header + 3 pieces
        self.assertEqual(len(_content_frames(1, Message(body=b""), None, 4096)), 1)

    def test_headers_larger_than_a_frame_are_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            _content_frames(1, Message(body=b"", headers={"k": "v" * 5000}), None, 4096)
        self.assertIn("must fit one frame", str(caught.exception))

    def test_every_method_of_the_spec_round_trips_through_the_codec(self) -> None:
        spec = load_spec()
        samples = {"octet": 7, "short": 300, "long": 70000, "longlong": 2 ** 40, "bit": True,
                   "shortstr": "s\u00e9", "longstr": b"long", "table": {"k": [1, "v"]}, "timestamp": 5}
        count = 0
        for klass in spec.classes:
            for method in klass.methods:
                args = [samples[f.type] for f in method.fields]
                buf = BytesIO()
                codec = _Codec(buf)
                for field, arg in zip(method.fields, args):
                    codec.encode(field.type, arg)
                codec.flush()
                decoder = _Codec(BytesIO(buf.getvalue()))
                decoded = [decoder.decode(f.type) for f in method.fields]
                for field, sent, got in zip(method.fields, args, decoded):
                    if field.type in ("shortstr", "longstr"):
                        sent = sent.decode("utf-8") if isinstance(sent, bytes) else sent
                        got = got.decode("utf-8") if isinstance(got, bytes) else got
                    if field.type == "bit":
                        got = bool(got)
                    self.assertEqual(got, sent, f"{klass.name}.{method.name} {field.name}")
                count += 1
        self.assertGreater(count, 40)

    def test_a_method_cut_short_is_badframe(self) -> None:
        codec = _Codec(BytesIO(b"\x00\x01"))
        self.assertRaises(BadFrame, codec.decode_long)

    def test_the_spec_is_loaded_once(self) -> None:
        self.assertIs(load_spec(), load_spec())
        self.assertIs(wire.load_spec(), load_spec())
