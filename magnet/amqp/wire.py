"""AMQP 0-9-1 on the wire: the spec file, broker URLs, field tables, content
properties and frames.

Kept apart from the protocol (L{magnet.amqp.protocol}) and the transport
(L{magnet.amqp.transport}) because it is pure data handling: no reactor, no
state. txAMQP's own codec writes only strings and 32-bit integers in field
tables and miscounts non-ASCII string lengths, so tables and properties are
encoded here; txAMQP still supplies the spec loader and the frame classes.
Read best whole (about 570 lines): the encoders and decoders of one format
mirror each other, and the fuzzers (fuzz/fuzz_amqpwire.py) drive them together.
"""
from __future__ import annotations

import datetime
import functools
import struct
from decimal import Decimal
from importlib import resources
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from txamqp import spec as txspec
from txamqp.codec import Codec

from magnet.errors import BadFrame, BadURL
from magnet.message import Message

SPEC_RESOURCE = "amqp0-9-1-rabbitmq.xml"

#: A mandatory publish carries its sequence number on the publishing channel,
#: so that a basic.return is matched to its publish exactly, in the content
#: header's C{cluster-id} property (a short string of decimal digits;
#: AMQP 0-9-1 deprecated the property, RabbitMQ passes it through, magnet's
#: L{Message} has no such field, and the consumers on this transport skip it).
#: Not in a header: a field table costs the broker, which decodes the
#: properties of every publish, and both ends far more per message than one
#: short string. Earlier magnets sent it in this header; a consumer still
#: takes it out of the headers of a message from one of them.
PUBLISH_SEQ_HEADER = "x-magnet-publish-seq"

# ---------------------------------------------------------------------------
# spec


@functools.lru_cache(maxsize=None)
def load_spec() -> Any:
    """The AMQP 0-9-1 spec (with RabbitMQ's extensions) shipped with magnet."""
    resource = resources.files("magnet") / "spec" / SPEC_RESOURCE
    with resources.as_file(resource) as path:
        return txspec.load(str(path))


# ---------------------------------------------------------------------------
# URLs


#: Query options of an C{amqps://} URL (the names of RabbitMQ's own URI
#: query parameters); C{cafile} is an alias of C{cacertfile}.
TLS_URL_OPTIONS = ("cacertfile", "cafile", "certfile", "keyfile", "server_name_indication", "verify")


class BrokerURL:
    """One parsed C{amqp://} or C{amqps://} URL; its repr never shows the password.

    For C{amqps://}: C{cafile} (PEM file of the CA certificates to trust
    instead of the system's), C{certfile} / C{keyfile} (a client certificate
    and its key, PEM) and C{server_name} (the name the broker's certificate
    must carry, and the SNI sent; by default C{host}).
    """

    __slots__ = ("scheme", "host", "port", "vhost", "username", "password", "heartbeat", "mechanism",
                 "cafile", "certfile", "keyfile", "server_name")

    def __init__(self, scheme: str, host: str, port: int, vhost: str, username: str, password: str,
                 heartbeat: Optional[float] = None, mechanism: Optional[str] = None,
                 cafile: Optional[str] = None, certfile: Optional[str] = None, keyfile: Optional[str] = None,
                 server_name: Optional[str] = None) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.vhost = vhost
        self.username = username
        self.password = password
        self.heartbeat = heartbeat
        self.mechanism = mechanism
        self.cafile = cafile
        self.certfile = certfile
        self.keyfile = keyfile
        self.server_name = server_name

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    @property
    def tls_name(self) -> str:
        """The name the broker's certificate is checked against."""
        return self.server_name or self.host

    @property
    def has_tls_options(self) -> bool:
        return any((self.cafile, self.certfile, self.keyfile, self.server_name))

    def masked(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{quote(self.username, safe='')}:***@{host}:{self.port}/{quote(self.vhost, safe='')}"

    __str__ = masked

    def __repr__(self) -> str:
        return f"<BrokerURL {self.masked()}>"


def parse_url(url: str) -> BrokerURL:
    """Parse C{amqp://user:pass@host:port/vhost} (or C{amqps://}); L{BadURL} if unusable.

    The vhost is URL-decoded (C{%2F} is C{/}); an empty path means C{/}.
    Query options: C{heartbeat} (seconds) and C{auth_mechanism} (PLAIN or
    AMQPLAIN); for C{amqps://} also C{cacertfile} (or C{cafile}: the CA
    certificates, PEM, to verify the broker's certificate with instead of the
    system's trust store), C{certfile} and C{keyfile} (a client certificate,
    PEM), C{server_name_indication} (the name the broker's certificate must
    carry, when it is not the URL's host) and C{verify=verify_peer} (the
    default and the only choice: the broker's certificate and name are
    always verified). File paths are percent-encoded like any query value.
    """
    if not isinstance(url, str):
        raise BadURL(f"broker URL must be a string, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadURL(f"bad broker URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise BadURL(f"not an AMQP URL (scheme {scheme!r}, expected amqp or amqps)")
    host = parts.hostname or "localhost"
    if port is None:
        port = 5671 if scheme == "amqps" else 5672
    username = unquote(parts.username) if parts.username is not None else "guest"
    password = unquote(parts.password) if parts.password is not None else "guest"
    path = parts.path
    if path in ("", "/"):
        vhost = "/"
    else:
        vhost = unquote(path[1:])
    heartbeat: Optional[float] = None
    mechanism: Optional[str] = None
    tls: Dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "heartbeat":
            try:
                heartbeat = float(value)
            except ValueError:
                raise BadURL(f"heartbeat must be a number of seconds, got {value!r}") from None
        elif key == "auth_mechanism":
            mechanism = value.upper()
            if mechanism not in ("PLAIN", "AMQPLAIN"):
                raise BadURL(f"auth_mechanism must be PLAIN or AMQPLAIN, got {value!r}")
        elif key in TLS_URL_OPTIONS:
            if scheme != "amqps":
                raise BadURL(f"{key} is a TLS option: it needs an amqps:// URL, not {scheme}://")
            if key == "verify":
                if value != "verify_peer":
                    raise BadURL(f"verify={value!r} is not supported: magnet always verifies the broker's "
                                 f"certificate and name (give the CA with cacertfile=PATH)")
                continue
            key = "cacertfile" if key == "cafile" else key
            if not value:
                raise BadURL(f"{key} needs a value")
            if key in tls and tls[key] != value:
                raise BadURL(f"{key} given twice in the broker URL")
            tls[key] = value
        else:
            raise BadURL(f"unknown option {key!r} in broker URL (known: heartbeat, auth_mechanism"
                         f"{', ' + ', '.join(TLS_URL_OPTIONS) if scheme == 'amqps' else ''})")
    if "keyfile" in tls and "certfile" not in tls:
        raise BadURL("keyfile needs certfile (the client certificate)")
    return BrokerURL(scheme, host, port, vhost, username, password, heartbeat, mechanism,
                     cafile=tls.get("cacertfile"), certfile=tls.get("certfile"), keyfile=tls.get("keyfile"),
                     server_name=tls.get("server_name_indication"))


# ---------------------------------------------------------------------------
# field tables (RabbitMQ's field types, which txAMQP's codec mostly lacks)

_S_B = struct.Struct(">B")
_S_b = struct.Struct(">b")
_S_H = struct.Struct(">H")
_S_h = struct.Struct(">h")
_S_I = struct.Struct(">I")
_S_i = struct.Struct(">i")
_S_Q = struct.Struct(">Q")
_S_q = struct.Struct(">q")
_S_f = struct.Struct(">f")
_S_d = struct.Struct(">d")
_S_HH = struct.Struct(">HH")
_FRAME_HEAD = struct.Struct(">BHI")
_FRAME_END = 0xCE
_FRAME_END_B = b"\xce"


def _shortstr(value: Union[str, bytes]) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {data[:40]!r}...")
    return _S_B.pack(len(data)) + data


#: names (exchanges, routing keys, content types) repeat: encode each once
_shortstr_cached = functools.lru_cache(maxsize=2048)(_shortstr)


def _longstr(data: bytes) -> bytes:
    return _S_I.pack(len(data)) + data


def _encode_value(value: Any, out: List[bytes]) -> None:
    if value is None:
        out.append(b"V")
    elif value is True or value is False:
        out.append(b"t\x01" if value else b"t\x00")
    elif isinstance(value, int):
        if -0x80000000 <= value <= 0x7FFFFFFF:
            out.append(b"I" + _S_i.pack(value))
        elif -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
            out.append(b"l" + _S_q.pack(value))
        else:
            raise ValueError(f"integer {value} does not fit an AMQP field (64 bits)")
    elif isinstance(value, float):
        out.append(b"d" + _S_d.pack(value))
    elif isinstance(value, str):
        out.append(b"S" + _longstr(value.encode("utf-8")))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(b"x" + _longstr(bytes(value)))
    elif isinstance(value, Mapping):
        out.append(b"F" + encode_table(value))
    elif isinstance(value, (list, tuple)):
        items: List[bytes] = []
        for item in value:
            _encode_value(item, items)
        data = b"".join(items)
        out.append(b"A" + _longstr(data))
    elif isinstance(value, Decimal):
        sign, digits, exponent = value.as_tuple()
        if not isinstance(exponent, int) or exponent > 0:
            value = value.quantize(Decimal(1))
            sign, digits, exponent = value.as_tuple()
        scale = -exponent  # type: ignore[operator]
        unscaled = int(value.scaleb(scale))
        out.append(b"D" + _S_B.pack(scale) + _S_i.pack(unscaled))
    elif isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        out.append(b"T" + _S_Q.pack(int(value.timestamp())))
    else:
        raise TypeError(f"cannot put a {type(value).__name__} in an AMQP header table")


def encode_table(table: Mapping[str, Any]) -> bytes:
    """A field table, with its 4-byte length prefix."""
    out: List[bytes] = []
    for key, value in table.items():
        out.append(_shortstr(key))
        _encode_value(value, out)
    data = b"".join(out)
    return _S_I.pack(len(data)) + data


def _decode_text(data: bytes) -> Union[str, bytes]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


#: Tables and arrays nested deeper than this are refused (L{BadFrame}), not
#: decoded into a RecursionError; RabbitMQ's own headers nest two levels.
MAX_TABLE_DEPTH = 64

#: Fixed-size field values: type octet -> (struct, size).
_FIXED = {
    0x49: (_S_i, 4),  # I
    0x6C: (_S_q, 8),  # l
    0x64: (_S_d, 8),  # d
    0x66: (_S_f, 4),  # f
    0x54: (_S_Q, 8),  # T
    0x62: (_S_b, 1),  # b
    0x73: (_S_h, 2),  # s
    0x75: (_S_H, 2),  # u
    0x69: (_S_I, 4),  # i
    0x4C: (_S_Q, 8),  # L
}


def _within(pos: int, end: int, what: str) -> None:
    """L{BadFrame} unless what was read ends by the frame's C{end} (else it came from the next frame)."""
    if pos > end:
        raise BadFrame(f"{what} runs {pos - end} byte(s) past the end of its frame")


def _overrun(what: str, pos: int, end: int) -> BadFrame:
    return BadFrame(f"AMQP {what} runs past the end of what holds it (byte {pos}, end {end})")


def _decode_value(buf: bytes, pos: int, end: int, depth: int) -> Tuple[Any, int]:
    """The field value at C{pos} (its type octet) and the position after it; all
    of it must lie before C{end}, which is at most C{len(buf)}."""
    kind = buf[pos]
    pos += 1
    if kind == 0x53 or kind == 0x78:  # S, x: long string, byte array
        if pos + 4 > end:
            raise _overrun("string length", pos, end)
        n = _S_I.unpack_from(buf, pos)[0]
        pos += 4
        stop = pos + n
        if stop > end:
            raise _overrun("string", stop, end)
        data = buf[pos:stop]
        return (_decode_text(data) if kind == 0x53 else data), stop
    fixed = _FIXED.get(kind)
    if fixed is not None:
        stop = pos + fixed[1]
        if stop > end:
            raise _overrun("field value", stop, end)
        return fixed[0].unpack_from(buf, pos)[0], stop
    if kind == 0x74 or kind == 0x42:  # t, B
        if pos >= end:
            raise _overrun("field value", pos + 1, end)
        return (buf[pos] != 0 if kind == 0x74 else buf[pos]), pos + 1
    if kind == 0x46:  # F
        return _table(buf, pos, end, depth + 1)
    if kind == 0x41:  # A
        if depth >= MAX_TABLE_DEPTH:
            raise BadFrame(f"AMQP field tables and arrays nested deeper than {MAX_TABLE_DEPTH}")
        if pos + 4 > end:
            raise _overrun("array length", pos, end)
        n = _S_I.unpack_from(buf, pos)[0]
        pos += 4
        stop = pos + n
        if stop > end:
            raise _overrun("array", stop, end)
        items = []
        while pos < stop:
            item, pos = _decode_value(buf, pos, stop, depth + 1)
            items.append(item)
        return items, stop
    if kind == 0x56:  # V
        return None, pos
    if kind == 0x44:  # D
        if pos + 5 > end:
            raise _overrun("decimal", pos + 5, end)
        scale = buf[pos]
        unscaled = _S_i.unpack_from(buf, pos + 1)[0]
        return Decimal(unscaled).scaleb(-scale), pos + 5
    raise BadFrame(f"unknown AMQP field type {chr(kind)!r}")


def _table(buf: bytes, pos: int, end: int, depth: int) -> Tuple[Dict[str, Any], int]:
    if depth > MAX_TABLE_DEPTH:
        raise BadFrame(f"AMQP field tables and arrays nested deeper than {MAX_TABLE_DEPTH}")
    if pos + 4 > end:
        raise _overrun("table length", pos, end)
    n = _S_I.unpack_from(buf, pos)[0]
    pos += 4
    stop = pos + n
    if stop > end:
        raise _overrun("table", stop, end)
    table: Dict[str, Any] = {}
    while pos < stop:
        klen = buf[pos]
        key_end = pos + 1 + klen
        if key_end >= stop:  # the value's type octet must follow the key
            raise _overrun("table entry", key_end + 1, stop)
        key = buf[pos + 1:key_end].decode("utf-8", "replace")
        value, pos = _decode_value(buf, key_end, stop, depth)
        table[key] = value
    return table, stop


def _decode_table(buf: bytes, pos: int, end: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
    """The field table (4-byte length, then entries) at C{pos} of C{buf}, and the
    position after it; it must end by C{end} (default: the end of C{buf}).
    L{BadFrame} if it does not decode."""
    limit = len(buf) if end is None or end > len(buf) else end
    return _table(buf, pos, limit, 0)


def decode_table(data: bytes) -> Dict[str, Any]:
    """Inverse of L{encode_table} (C{data} includes the length prefix).
    L{BadFrame} (a ValueError) if C{data} is not a field table."""
    return _decode_table(data, 0)[0]


class _Codec(Codec):
    """txAMQP's codec with full field tables and correct UTF-8 string lengths;
    reading past the end of the data raises L{BadFrame} (txAMQP's raises EOF,
    or struct.error when a few bytes are left)."""

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:
            raise BadFrame(f"AMQP method frame ends {n - len(data)} byte(s) short of its arguments")
        self.nread += n
        return data

    def enc_str(self, fmt: str, s: Any) -> None:
        if isinstance(s, str):
            s = s.encode("utf-8")
        self.pack(fmt, len(s))
        self.write(s)

    def encode_table(self, tbl: Mapping[str, Any]) -> None:
        self.write(encode_table(tbl or {}))

    def decode_table(self) -> Dict[str, Any]:
        size = self.decode_long()
        data = self.read(size)
        return _decode_table(_S_I.pack(size) + data, 0)[0]


# ---------------------------------------------------------------------------
# content properties (class basic)

_P_CONTENT_TYPE = 1 << 15
_P_CONTENT_ENCODING = 1 << 14
_P_HEADERS = 1 << 13
_P_DELIVERY_MODE = 1 << 12
_P_PRIORITY = 1 << 11
_P_CORRELATION_ID = 1 << 10
_P_REPLY_TO = 1 << 9
_P_EXPIRATION = 1 << 8
_P_MESSAGE_ID = 1 << 7
_P_TIMESTAMP = 1 << 6
_P_TYPE = 1 << 5
_P_USER_ID = 1 << 4
_P_APP_ID = 1 << 3
_P_CLUSTER_ID = 1 << 2


def encode_properties(message: Message, seq: Optional[int] = None) -> bytes:
    """The property flags and property list of a content header for C{message}."""
    flags = 0
    out: List[bytes] = []
    if message.content_type is not None:
        flags |= _P_CONTENT_TYPE
        out.append(_shortstr_cached(message.content_type))
    headers = message.headers
    if headers:
        flags |= _P_HEADERS
        out.append(encode_table(headers))
    flags |= _P_DELIVERY_MODE
    out.append(b"\x02" if message.persistent else b"\x01")
    if message.correlation_id is not None:
        flags |= _P_CORRELATION_ID
        out.append(_shortstr(message.correlation_id))
    if message.reply_to is not None:
        flags |= _P_REPLY_TO
        # not cached: a listen address (magnet.listen.NODE.UUID) is new for every request,
        # and 2,048 of them in the cache (0.4-0.6 MB) would push out the names that repeat
        out.append(_shortstr(message.reply_to))
    if message.expiration is not None:
        flags |= _P_EXPIRATION
        out.append(_shortstr(str(message.expiration)))
    if message.message_id is not None:
        flags |= _P_MESSAGE_ID
        out.append(_shortstr(message.message_id))
    if message.timestamp is not None:
        flags |= _P_TIMESTAMP
        out.append(_S_Q.pack(int(message.timestamp)))
    if message.type is not None:
        flags |= _P_TYPE
        out.append(_shortstr_cached(message.type))
    if seq is not None:  # the last property: see PUBLISH_SEQ_HEADER
        flags |= _P_CLUSTER_ID
        digits = b"%d" % seq
        out.append(_S_B.pack(len(digits)) + digits)
    return _S_H.pack(flags) + b"".join(out)


#: property flag -> how to skip the property: a short string, or a fixed size in bytes
_SKIP = ((_P_CONTENT_TYPE, 0), (_P_CONTENT_ENCODING, 0), (_P_HEADERS, -1), (_P_DELIVERY_MODE, 1), (_P_PRIORITY, 1),
         (_P_CORRELATION_ID, 0), (_P_REPLY_TO, 0), (_P_EXPIRATION, 0), (_P_MESSAGE_ID, 0), (_P_TIMESTAMP, 8),
         (_P_TYPE, 0), (_P_USER_ID, 0), (_P_APP_ID, 0))


def publish_seq(buf: bytes, pos: int, end: int) -> Optional[int]:
    """The publish sequence number a content header's properties at C{pos} carry
    (see L{PUBLISH_SEQ_HEADER}), or None; L{BadFrame} if they run past C{end}.

    Read from a message the broker returned (C{basic.return}): only the
    properties before the number are skipped, a header table by its length.
    """
    if pos + 2 > end:
        raise _overrun("property flags", pos + 2, end)
    flags = _S_H.unpack_from(buf, pos)[0]
    pos += 2
    headers_at = None
    for flag, size in _SKIP:
        if not flags & flag:
            continue
        if pos >= end:
            raise _overrun("content header's properties", pos + 1, end)
        if size == 0:
            pos += 1 + buf[pos]
        elif size < 0:
            if pos + 4 > end:
                raise _overrun("table length", pos + 4, end)
            headers_at = pos
            pos += 4 + _S_I.unpack_from(buf, pos)[0]
        else:
            pos += size
    if flags & _P_CLUSTER_ID:
        digits, pos = _read_shortstr(buf, pos)
        _within(pos, end, "the cluster-id property")
        return int(digits) if digits.isdigit() else None
    if headers_at is not None:  # an earlier magnet's header
        value = _table(buf, headers_at, end, 0)[0].get(PUBLISH_SEQ_HEADER)
        return value if isinstance(value, int) else None
    return None


def _read_shortstr(buf: bytes, pos: int) -> Tuple[str, int]:
    """The short string at C{pos} and the position after it; L{BadFrame} if
    C{buf} ends before it does."""
    n = buf[pos]
    pos += 1
    stop = pos + n
    if stop > len(buf):
        raise _overrun("short string", stop, len(buf))
    return buf[pos:stop].decode("utf-8", "replace"), stop


def decode_properties(buf: bytes, pos: int, body: bytes, end: Optional[int] = None) -> Tuple[Message, Optional[int]]:
    """A L{Message} from a content header's property flags and list at C{pos}.

    Also returns the publish sequence number of an earlier magnet's header
    (L{PUBLISH_SEQ_HEADER}), if any, removed from the headers; the
    C{cluster-id} property that carries it now is skipped.
    The property list must end by C{end} (default: the end of C{buf}); if it
    does not, or does not decode, L{BadFrame} (a ValueError).
    """
    limit = len(buf) if end is None or end > len(buf) else end
    try:
        return _decode_properties(buf, pos, body, limit)
    except (IndexError, struct.error):
        raise BadFrame(f"AMQP content header ends before its properties (end {limit})") from None


def _decode_properties(buf: bytes, pos: int, body: bytes, limit: int) -> Tuple[Message, Optional[int]]:
    flags = _S_H.unpack_from(buf, pos)[0]
    pos += 2
    extra = flags
    while extra & 1:  # continuation flag words (none in class basic, but be lenient)
        extra = _S_H.unpack_from(buf, pos)[0]
        pos += 2
    content_type = correlation_id = reply_to = expiration = message_id = mtype = None
    headers: Dict[str, Any] = {}
    persistent = False
    timestamp = None
    seq = None
    if flags & _P_CONTENT_TYPE:
        content_type, pos = _read_shortstr(buf, pos)
    if flags & _P_CONTENT_ENCODING:
        _, pos = _read_shortstr(buf, pos)
    if flags & _P_HEADERS:
        headers, pos = _table(buf, pos, limit, 0)
        if PUBLISH_SEQ_HEADER in headers:
            seq = headers.pop(PUBLISH_SEQ_HEADER)
    if flags & _P_DELIVERY_MODE:
        persistent = buf[pos] == 2
        pos += 1
    if flags & _P_PRIORITY:
        pos += 1
    if flags & _P_CORRELATION_ID:
        correlation_id, pos = _read_shortstr(buf, pos)
    if flags & _P_REPLY_TO:
        reply_to, pos = _read_shortstr(buf, pos)
    if flags & _P_EXPIRATION:
        expiration, pos = _read_shortstr(buf, pos)
    if flags & _P_MESSAGE_ID:
        message_id, pos = _read_shortstr(buf, pos)
    if flags & _P_TIMESTAMP:
        timestamp = _S_Q.unpack_from(buf, pos)[0]
        pos += 8
    if flags & _P_TYPE:
        mtype, pos = _read_shortstr(buf, pos)
    if pos > limit:
        raise _overrun("content header's properties", pos, limit)
    if type(body) is not bytes:  # a frame reader hands bytes; anything else gets Message's checks
        message = Message(body=body, headers=headers, content_type=content_type,
                          correlation_id=correlation_id, reply_to=reply_to, message_id=message_id,
                          type=mtype, persistent=persistent, expiration=expiration, timestamp=timestamp)
    else:
        message = Message._trusted(body, headers, content_type, correlation_id, reply_to, message_id, mtype,
                                   persistent, expiration, timestamp)
    return message, seq


# ---------------------------------------------------------------------------
# frames written directly

_ACK = struct.Struct(">BHIHHQBB")  # method frame: basic.ack / basic.nack with one bits octet
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_PUBLISH_PREFIX = struct.pack(">HHH", 60, 40, 0)


def _method_frame(channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(1, channel, len(payload)) + payload + _FRAME_END_B


def _content_frames(channel: int, message: Message, seq: Optional[int], frame_max: int) -> List[bytes]:
    body = message.body
    props = encode_properties(message, seq)
    header = struct.pack(">HHQ", 60, 0, len(body)) + props
    if len(header) > frame_max - 8:
        raise ValueError(f"message properties and headers take {len(header)} bytes; they must fit one "
                         f"frame ({frame_max - 8} bytes)")
    frames = [_FRAME_HEAD.pack(2, channel, len(header)) + header + _FRAME_END_B]
    if body:
        chunk = frame_max - 8
        if len(body) <= chunk:
            frames.append(_FRAME_HEAD.pack(3, channel, len(body)))
            frames.append(body)
            frames.append(_FRAME_END_B)
        else:
            for i in range(0, len(body), chunk):
                part = body[i:i + chunk]
                frames.append(_FRAME_HEAD.pack(3, channel, len(part)))
                frames.append(part)
                frames.append(_FRAME_END_B)
    return frames


