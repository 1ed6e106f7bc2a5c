"""Stream tickets: how a browser opens a person's event stream.

An EventSource cannot send an Authorization header, so a page trades the
person's token for a short-lived ticket (C{POST /api/subscriptions/ID/ticket})
that opens that one stream only (C{GET /api/subscriptions/ID/events?ticket=...}).

A ticket is C{v1.PERSON.ID.EXPIRES.NONCE.MAC}: the MAC (HMAC-SHA256,
base64url) covers the purpose (this subscription's event stream, GET),
the person, the subscription, the expiry (Unix seconds), the nonce and the
person's current token hash, so a ticket dies with the person (or their
token), cannot be moved to another subscription or person, and opens
nothing but that stream. The key is derived from the operator token (shared by
nodes whose config sets C{security.token}) with scrypt: any person can
obtain tickets, so a ticket must not be a fast offline oracle for the
operator token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Any, Dict, Optional, Tuple

from ooidx.people.records import PERSON_NAME, SUBSCRIPTION_ID

__all__ = ["TICKET_LIFETIME", "TICKET_MAX", "TICKET_VERSION", "TicketError", "ticket_key", "ticket_mac",
           "make_ticket", "parse_ticket"]

TICKET_LIFETIME = 60
#: The longest ticket looked at (a real one is about 100 characters).
TICKET_MAX = 256
TICKET_VERSION = "v1"
_TICKET_SALT = b"ooidx stream ticket v1"
_TICKET_PURPOSE = "GET /api/subscriptions/{id}/events"
_NONCE = re.compile(r"[A-Za-z0-9_-]{16}\Z")
_MAC = re.compile(r"[A-Za-z0-9_-]{43}\Z")
_EXPIRES = re.compile(r"[0-9]{1,12}\Z")
_keys: Dict[str, bytes] = {}


class TicketError(ValueError):
    """A ticket that is not even shaped like one; the message says how (it never repeats the ticket)."""


def ticket_key(operator_token: str) -> bytes:
    """The MAC key of stream tickets, derived from the operator token (once a process: scrypt is slow on purpose)."""
    key = _keys.get(operator_token)
    if key is None:
        secret = operator_token.encode("utf-8")
        try:
            key = hashlib.scrypt(secret, salt=_TICKET_SALT, n=2 ** 14, r=8, p=1, dklen=32)
        except (AttributeError, ValueError):  # pragma: no cover - an OpenSSL without scrypt
            key = hashlib.pbkdf2_hmac("sha256", secret, _TICKET_SALT, 300_000)
        _keys.clear()
        _keys[operator_token] = key
    return key


def ticket_mac(key: bytes, person: str, sid: str, expires: int, nonce: str, token_sha256: str) -> str:
    text = "\n".join([TICKET_VERSION, _TICKET_PURPOSE.format(id=sid), person, sid, str(expires), nonce,
                      token_sha256])
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_ticket(key: bytes, person: str, sid: str, token_sha256: str, expires: int,
                nonce: Optional[str] = None) -> str:
    """A ticket opening C{person}'s subscription C{sid}'s stream until C{expires} (Unix seconds)."""
    nonce = nonce or secrets.token_urlsafe(12)
    mac = ticket_mac(key, person, sid, expires, nonce, token_sha256)
    return ".".join([TICKET_VERSION, person, sid, str(expires), nonce, mac])


def parse_ticket(raw: Any) -> Tuple[str, str, int, str, str]:
    """C{(person, id, expires, nonce, mac)} of a ticket's text (bytes or str),
    not yet checked against its MAC; L{TicketError} if it is malformed."""
    if isinstance(raw, bytes):
        if len(raw) > TICKET_MAX:
            raise TicketError(f"the stream ticket is too long (at most {TICKET_MAX} characters)")
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise TicketError("the stream ticket is not ASCII text") from None
    if not isinstance(raw, str):
        raise TicketError("the stream ticket is not text")
    if not raw:
        raise TicketError("the stream ticket is empty")
    if len(raw) > TICKET_MAX:
        raise TicketError(f"the stream ticket is too long (at most {TICKET_MAX} characters)")
    if not raw.isascii():
        raise TicketError("the stream ticket is not ASCII text")
    parts = raw.split(".")
    if len(parts) != 6:
        raise TicketError(f"a stream ticket has 6 parts separated by dots ({TICKET_VERSION}.PERSON.ID.EXPIRES."
                          f"NONCE.MAC); this one has {len(parts)}")
    version, person, sid, expires, nonce, mac = parts
    if version != TICKET_VERSION:
        raise TicketError(f"not a {TICKET_VERSION} stream ticket")
    if not (PERSON_NAME.match(person) and SUBSCRIPTION_ID.match(sid) and _EXPIRES.match(expires)
            and _NONCE.match(nonce) and _MAC.match(mac)):
        raise TicketError("the stream ticket is malformed")
    return person, sid, int(expires), nonce, mac
