"""The unit that crosses the bus: AMQP properties, headers and a body of bytes.

Structured bodies are JSON; binary payloads stay binary. A L{Message} is
immutable so that the in-process transport can hand the very same object to
every consumer without copying it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from magnet.errors import BadMessage

JSON = "application/json"
BINARY = "application/octet-stream"

#: one encoder for every message: json.dumps with options builds a new
#: JSONEncoder on each call, which costs more than encoding a small value
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


@dataclass(frozen=True)
class Message:
    body: bytes = b""
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: Optional[str] = None
    correlation_id: Optional[str] = None
    reply_to: Optional[str] = None
    message_id: Optional[str] = None
    type: Optional[str] = None
    persistent: bool = True
    expiration: Optional[str] = None
    timestamp: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.body, bytes):
            if isinstance(self.body, (bytearray, memoryview)):
                object.__setattr__(self, "body", bytes(self.body))
            else:
                raise TypeError(
                    f"message body must be bytes, not {type(self.body).__name__}"
                )

    @classmethod
    def of_json(cls, value: Any, **properties: Any) -> "Message":
        """A message whose body is C{value} encoded as JSON."""
        body = _encode_json(value).encode("utf-8")
        return cls(body=body, content_type=JSON, **properties)

    def json(self) -> Any:
        """The body decoded as JSON; L{BadMessage} if it is not JSON."""
        if self.content_type not in (JSON, None):
            raise BadMessage(
                f"expected content type {JSON}, got {self.content_type!r}"
            )
        try:
            # the common case (UTF-8 text) without json.loads' encoding detection
            return _decode_json(self.body.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError too: let json.loads decide (BOMs, UTF-16/32)
            pass
        except RecursionError:
            raise BadMessage("body is not valid JSON: nested too deeply") from None
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadMessage(f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadMessage("body is not valid JSON: nested too deeply") from None

    @classmethod
    def _trusted(cls, body: bytes, headers: Mapping[str, Any], content_type: Optional[str],
                 correlation_id: Optional[str], reply_to: Optional[str], message_id: Optional[str],
                 type: Optional[str], persistent: bool, expiration: Optional[str],
                 timestamp: Optional[int]) -> "Message":
        """A message from a decoder that already checked every field (C{body} is
        bytes): the frozen dataclass's C{__init__} sets each field through
        C{object.__setattr__}, which costs a delivery more than decoding it."""
        m = object.__new__(cls)
        m.__dict__.update(body=body, headers=headers, content_type=content_type,
                          correlation_id=correlation_id, reply_to=reply_to, message_id=message_id,
                          type=type, persistent=persistent, expiration=expiration, timestamp=timestamp)
        return m

    def header(self, name: str) -> Any:
        """A header that must be present; L{BadMessage} names it otherwise."""
        try:
            return self.headers[name]
        except KeyError:
            raise BadMessage(f"missing header {name!r}") from None

    def evolve(self, **changes: Any) -> "Message":
        return replace(self, **changes)

    def with_headers(self, **extra: Any) -> "Message":
        merged = dict(self.headers)
        merged.update(extra)
        return replace(self, headers=merged)
