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
        body = json.dumps(value, separators=(",", ":")).encode("utf-8")
        return cls(body=body, content_type=JSON, **properties)

    def json(self) -> Any:
        """The body decoded as JSON; L{BadMessage} if it is not JSON."""
        if self.content_type not in (JSON, None):
            raise BadMessage(
                f"expected content type {JSON}, got {self.content_type!r}"
            )
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadMessage(f"body is not valid JSON: {e}") from None

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
