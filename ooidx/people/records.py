"""What a person and a subscription are: names, ids, queue names, token hashes, bounds.

Attribute store keys:

    person:NAME                       {"name", "token_sha256", "created"}
    user_subscription:NAME:ID         the subscription record (L{ooidx.people.component.PersonalSubscriptions.subscribe})
    webhook_log:NAME:ID               a webhook subscription's delivery log {"entries": [...], "consecutive_failures"}

Everything else in L{ooidx.people} builds on these.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from functools import lru_cache
from typing import Any

import re2
from magnet import Refusal

from ooidx import routing, wire

__all__ = ["KINDS", "PERSON_NAME", "SUBSCRIPTION_ID", "MAX_LENGTH", "MAX_LENGTH_LIMIT", "MAX_SUBSCRIPTIONS",
           "MAX_URL", "MAX_QUEUED_PER_PERSON", "MAX_REGEX_PROGRAM_PER_PERSON", "MAX_STREAMS_PER_PERSON",
           "OverBudget", "regex_program_size", "CHANGED_FANOUT", "ID_HEADER", "PERSON_KEY", "SUBSCRIPTION_KEY", "WEBHOOK_DETAIL",
           "WEBHOOK_LOG_KEY", "WEBHOOK_LOG_SIZE", "WEBHOOK_DISABLE_AFTER", "WEBHOOK_VERIFY_TIMEOUT",
           "WEBHOOK_SECRET_GRACE", "WEBHOOK_DISABLED_TTL",
           "InvalidSubscription", "UnknownSubscription", "QUEUE_PREFIX", "queue_name", "hash_token", "message_id", "check_person",
           "check_id", "public_record"]

#: kind -> the component that serves it.
KINDS = {"datasets": "user_pub_sub", "events": "user_notification"}
#: What a person's name may look like (it is part of queue names).
PERSON_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
SUBSCRIPTION_ID = re.compile(r"[0-9a-f]{12}\Z")
#: Default bound of a person's queue (messages); the largest one may ask for.
MAX_LENGTH = 10_000
MAX_LENGTH_LIMIT = 100_000
MAX_SUBSCRIPTIONS = 100
MAX_URL = 2048
#: A person's budgets, so that one person cannot exhaust the node for everyone:
#: messages their queues may hold together (the sum of their max_length),
MAX_QUEUED_PER_PERSON = 200_000
#: the size of their regexes compiled (RE2 program instructions, summed: about
#: 16 bytes each, and each is compiled again in pub_sub's or user_notification's
#: Sets; one \pL{440}x is 526,245 of them),
MAX_REGEX_PROGRAM_PER_PERSON = 1_000_000
#: and the event streams they hold open on one web edge (each a descriptor).
MAX_STREAMS_PER_PERSON = 10
#: The fanout every instance of both components hears after a subscription changes.
CHANGED_FANOUT = wire.USER_SUBSCRIPTIONS_CHANGED
#: The header stamping every message in a person's queue with a sortable id (SSE's C{id:}).
ID_HEADER = wire.ID_HEADER
PERSON_KEY = wire.PERSON_KEY
SUBSCRIPTION_KEY = wire.USER_SUBSCRIPTION_KEY
WEBHOOK_LOG_KEY = wire.WEBHOOK_LOG_KEY
#: A webhook's delivery log keeps this many attempts (the newest).
WEBHOOK_LOG_SIZE = 50
#: A webhook is disabled after this many failed attempts in a row.
WEBHOOK_DISABLE_AFTER = 20
#: How long a verification challenge is open (seconds): the callback answers within it or not at all.
WEBHOOK_VERIFY_TIMEOUT = 5.0
#: After a rotation, POSTs carry the old secret's signature too for this long (seconds).
WEBHOOK_SECRET_GRACE = 24 * 3600.0
#: A webhook disabled this long (seconds) without being verified again is removed, queue and all (0: never).
WEBHOOK_DISABLED_TTL = 7 * 24 * 3600.0
#: Details of an event that a failing webhook caused: such events are never
#: routed to webhook subscriptions, so failing webhooks cannot feed each other.
WEBHOOK_DETAIL = "webhook_subscription"


class InvalidSubscription(Refusal):
    """A subscription request that does not hold together (400)."""


class UnknownSubscription(Refusal):
    """No such subscription of this person (404)."""


class OverBudget(Refusal):
    """What a person asks for is past their budget (429); the message says which and how to get under it."""


@lru_cache(maxsize=4096)
def regex_program_size(regex: str) -> int:
    """The size of C{regex} compiled by RE2 (program instructions, forward):
    what it costs in memory wherever it is matched. L{ooidx.errors.InvalidRegex}
    if it does not compile. Remembered (a costly regex takes a third of a second
    to compile, and a person's budget adds up all of theirs)."""
    if not isinstance(regex, str) or len(regex) > routing.MAX_REGEX_BYTES or "\x00" in regex:
        routing.validate(regex)  # raises, saying why
    try:
        return int(re2.compile(regex, routing.options()).programsize)
    except Exception:  # noqa: BLE001 - validate says why in words
        routing.validate(regex)
        raise


#: What the names of people's queues (and their pub_sub subscriptions) start with.
QUEUE_PREFIX = "user."


def queue_name(person: str, sid: str) -> str:
    return f"{QUEUE_PREFIX}{person}.{sid}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_last_micros = [0]


def message_id(now: float) -> str:
    """Sortable (fixed width): microseconds since the epoch, then randomness.
    Strictly increasing in this process (one microsecond past the last id at
    least): a stream resuming after Last-Event-ID skips every id <= it, so two
    ids of the same microsecond must not sort by their random part."""
    micros = max(int(now * 1_000_000), _last_micros[0] + 1)
    _last_micros[0] = micros
    return f"{micros:017d}-{secrets.token_hex(3)}"


def check_person(name: Any) -> str:
    if not isinstance(name, str) or not PERSON_NAME.match(name):
        raise InvalidSubscription(f"a person's name is 1-32 characters of a-z 0-9 _ - (starting with a letter "
                                  f"or digit), not {str(name)[:40]!r}")
    return name


def check_id(sid: Any) -> str:
    if not isinstance(sid, str) or not SUBSCRIPTION_ID.match(sid):
        raise UnknownSubscription(f"no subscription {str(sid)[:40]!r}")
    return sid


def public_record(record: Any) -> Any:
    """A subscription record as its person sees it: never its webhook secrets (shown once, when made)."""
    if not isinstance(record, dict):
        return record
    out = {k: record.get(k) for k in ("id", "kind", "regex", "webhook", "max_length", "created", "queue")}
    out["events"] = None if record.get("webhook") else f"/api/subscriptions/{record.get('id')}/events"
    if record.get("webhook"):  # never the secret: it is shown once, when made
        out.update({k: record.get(k) for k in ("verified", "disabled", "disabled_reason", "rotated")
                    if record.get(k) is not None})
        out["state"] = record.get("state", "active")
        out["signed"] = isinstance(record.get("secret"), str)
        out["deliveries"] = f"/api/subscriptions/{record.get('id')}/deliveries"
    return out
