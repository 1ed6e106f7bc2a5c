"""Atom feeds of events, for feed readers and services that poll.

    GET /feeds/datasets/NAME.atom?limit=N     the events of dataset NAME (registered, fetched, saved, failed, ...)
    GET /feeds/events.atom?regex=R&limit=N    the events whose topic R matches (RE2; every event without R)

Both are made (with C{feedgen}) from the notification component's ring of
recent events (C{notification.api recent}, the one the management page's
C{/api/events} reads), newest first, at most C{limit} (default
L{DEFAULT_LIMIT}, at most L{MAX_LIMIT}) entries. Each entry is one event: its
title says what happened to which dataset, its summary is the change summary
(the event's C{changes}, which C{saved} events carry) when there is one, and
its content is the whole event as JSON. An entry's id is the SHA-256 of the
event, so a reader polling again sees the same entries as the same.

Reading them is like reading C{/api/events}: open on a web port bound to
loopback, behind the operator token elsewhere (C{security.read_token}
decides when it is set). Refusals are the web edge's JSON errors: a malformed
name or regex, a regex longer than L{MAX_REGEX}, an unknown query parameter
or a bad limit is a 400, a dataset that is not registered a 404.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import unquote

from feedgen.feed import FeedGenerator
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web import server

from magnet import RemoteError, Timeout, Unroutable

from ooidx import dap, wire
from ooidx.errors import InvalidRegex
from ooidx.http.answers import Answer, HTTPError
from ooidx.routing import compile_filter

__all__ = ["Feeds", "DEFAULT_LIMIT", "MAX_LIMIT", "MAX_REGEX", "CONTENT_TYPE", "dataset_regex", "summary_of",
           "title_of", "render_atom"]

log = Logger(namespace="ooidx.web.feeds")

DEFAULT_LIMIT = 50
#: The ring keeps at most this many anyway (ooidx.dissemination.notification.MAX_LIMIT).
MAX_LIMIT = 1000
#: The longest ?regex= taken (characters), as /api/events.
MAX_REGEX = 1024
#: The longest change summary put in an entry (characters); the content has the whole event.
MAX_SUMMARY = 4000
CONTENT_TYPE = b"application/atom+xml; charset=utf-8"
#: How long notification and the controller have to answer.
CALL_TIMEOUT = 5.0
_SUFFIX = ".atom"
#: What XML 1.0 cannot carry (feedgen refuses such text: an event must not break its feed).
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def dataset_regex(name: str) -> str:
    """The RE2 regex of dataset C{name}'s event topics (C{event.KIND.NAME})."""
    return r"^event\.[a-z_]+\." + re.sub(r"([.\-])", r"\\\1", name) + r"\z"


def _text(value: Any, limit: int = 500) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = _NOT_XML.sub("\ufffd", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary_of(event: Dict[str, Any]) -> str:
    """A person's words for an event: what happened, and its change summary (C{changes}) when it has one."""
    kind, dataset = event.get("kind"), event.get("dataset")
    lines = [f"{_text(kind, 40)} {_text(dataset, 80) if dataset else ''}".strip()]
    for key in ("version", "versions", "bytes", "status", "reason", "url"):
        if event.get(key) is not None:
            lines.append(f"{key}: {_text(event[key], 300)}")
    changes = event.get("changes")
    if changes not in (None, {}, []):
        lines.append("changes:")
        if isinstance(changes, dict):
            # The persister's summary (ooidx.dissemination.changes) says it in words under "text"; the
            # rest is its structure, each part bounded (the content has it whole).
            if isinstance(changes.get("text"), str):
                lines.append(f"  {_text(changes['text'], 2000)}")
            for key in sorted((k for k in changes if k != "text"), key=str):
                lines.append(f"  {_text(key, 80)}: {_text(changes[key], 600)}")
        elif isinstance(changes, list):
            lines.extend(f"  - {_text(item, 600)}" for item in changes[:100])
        else:
            lines.append(f"  {_text(changes, 2000)}")
    text = "\n".join(lines)
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 3] + "..."


def title_of(event: Dict[str, Any]) -> str:
    """C{KIND DATASET}, and what changed in words when the event says (a C{saved} event's C{changes.text})."""
    kind, dataset = event.get("kind", "event"), event.get("dataset")
    title = f"{_text(kind, 40)} {_text(dataset, 80)}" if dataset else _text(kind, 40)
    changes = event.get("changes")
    if isinstance(changes, dict) and isinstance(changes.get("text"), str) and changes["text"].strip():
        title += ": " + _text(changes["text"].strip(), 160)
    return title


def _when(value: Any) -> Optional[datetime]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 253402300800:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    return None


def render_atom(events: List[Dict[str, Any]], *, feed_id: str, title: str, self_link: str,
                now: float) -> bytes:
    """The Atom document of C{events} (oldest first, as the ring gives them): newest entry first."""
    fg = FeedGenerator()
    fg.id(feed_id)
    fg.title(title)
    fg.author({"name": "ooidx"})
    fg.link(href=self_link, rel="self")
    fg.generator("ooidx")
    latest = None
    for event in events:
        if not isinstance(event, dict):
            continue
        when = _when(event.get("time")) or _when(now)
        latest = when if latest is None or when > latest else latest
        digest = hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode("utf-8")).hexdigest()
        entry = fg.add_entry()  # prepends: the newest (last in the ring) ends up first
        entry.id(f"urn:sha256:{digest}")
        dataset = event.get("dataset")
        entry.title(title_of(event))
        entry.updated(when)
        entry.summary(summary_of(event))
        entry.content(_text(json.dumps(event, sort_keys=True, indent=1, default=str), 100_000), type="text")
        entry.category(term=_text(event.get("topic", ""), 200))
        if isinstance(dataset, str) and dap.valid_name(dataset):
            entry.link(href=f"/api/datasets/{dataset}", rel="related")
    fg.updated(latest or _when(now))
    return fg.atom_str(pretty=True)


class Feeds:
    """The C{/feeds/} paths of the web edge (L{ooidx.web.app})."""

    PREFIX = b"/feeds/"

    def __init__(self, bus: Any, *, check_operator: Callable[[server.Request], None], read_token: bool,
                 clock: Any) -> None:
        """C{check_operator(request)} raises a 401 unless the request carries the operator token;
        C{read_token}: whether reading needs it (as /api/events)."""
        self.bus = bus
        self._check_operator = check_operator
        self.read_token = read_token
        self.clock = clock

    def methods(self, path: bytes) -> Optional[Dict[bytes, Callable[[server.Request], Any]]]:
        if path == b"/feeds/events.atom":
            return {b"GET": self.render_events}
        if path.startswith(b"/feeds/datasets/"):
            return {b"GET": self.render_dataset}
        return None

    # the two feeds ---------------------------------------------------------------------

    def render_events(self, request: server.Request) -> Deferred:
        self._check_read(request)
        limit = self._arguments(request, (b"regex", b"limit"))
        regex = self._regex(request)
        title = f"ooidx events matching {regex}" if regex else "ooidx events"
        return self._feed(regex, limit, feed_id="urn:ooidx:feed:events:" +
                          hashlib.sha256((regex or "").encode("utf-8")).hexdigest()[:32],
                          title=_text(title, 300), self_link=_text(request.uri.decode("ascii", "replace"), 2000))

    def render_dataset(self, request: server.Request) -> Deferred:
        self._check_read(request)
        name = self._dataset_name(request.path)
        limit = self._arguments(request, (b"limit",))
        d = self._known(name)
        d.addCallback(lambda _: self._feed(dataset_regex(name), limit, feed_id=f"urn:ooidx:feed:dataset:{name}",
                                           title=f"ooidx dataset {name}",
                                           self_link=f"/feeds/datasets/{name}.atom"))
        return d

    # helpers ---------------------------------------------------------------------------

    def _check_read(self, request: server.Request) -> None:
        if self.read_token:
            self._check_operator(request)

    def _arguments(self, request: server.Request, known: tuple) -> int:
        args = request.args or {}
        unknown = sorted(k.decode("ascii", "replace")[:40] for k in args if k not in known)
        if unknown:
            raise HTTPError(400, "BadRequest", f"unknown query parameter(s): {', '.join(unknown)} (this feed "
                                               f"takes {', '.join(k.decode() for k in known)})")
        if b"limit" not in args:
            return DEFAULT_LIMIT
        raw = args[b"limit"][-1].decode("ascii", "replace")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise HTTPError(400, "BadRequest", f"limit is a whole number from 1 to {MAX_LIMIT}")
        return int(raw)

    def _regex(self, request: server.Request) -> Optional[str]:
        values = (request.args or {}).get(b"regex")
        if not values:
            return None
        if len(values) > 1:
            raise HTTPError(400, "InvalidRegex", "give one regex, not several")
        try:
            regex = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "InvalidRegex", "regex is not UTF-8 text") from None
        if len(regex) > MAX_REGEX:
            raise HTTPError(400, "InvalidRegex", f"regex is at most {MAX_REGEX} characters, not {len(regex)}")
        if not regex:
            return None
        try:
            compile_filter(regex)
        except InvalidRegex as e:
            raise HTTPError(400, "InvalidRegex", str(e)[:300]) from None
        return regex

    def _dataset_name(self, path: bytes) -> str:
        raw = path[len(b"/feeds/datasets/"):]
        try:
            text = unquote(raw.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            raise HTTPError(400, "InvalidName", "a dataset feed is /feeds/datasets/NAME.atom, NAME in ASCII") from None
        if not text.endswith(_SUFFIX) or "/" in text:
            raise HTTPError(404, "NotFound", "a dataset feed is /feeds/datasets/NAME.atom")
        name = text[:-len(_SUFFIX)]
        if not dap.valid_name(name):
            shown = name if len(name) <= 70 else name[:67] + "..."
            raise HTTPError(400, "InvalidName", f"{shown!r} is not a dataset name: use 1 to 64 letters, digits, "
                                                "'_', '.' or '-', starting with a letter or digit")
        return name

    @inlineCallbacks
    def _known(self, name: str) -> Any:
        """None if dataset C{name} is registered; a 404 if not, a 503 if the controller cannot say."""
        try:
            yield self.bus.call("controller", "get", name=name, timeout=CALL_TIMEOUT)
        except RemoteError as e:
            if e.remote_type == "UnknownDataset":
                raise HTTPError(404, "UnknownDataset", f"no dataset {name!r} is registered") from None
            raise HTTPError(502, e.remote_type, e.message) from None
        except (Unroutable, Timeout):
            raise HTTPError(503, "Unavailable", "the controller did not answer: the dataset cannot be "
                                                "looked up") from None

    @inlineCallbacks
    def _feed(self, regex: Optional[str], limit: int, *, feed_id: str, title: str, self_link: str) -> Any:
        kwargs: Dict[str, Any] = {"limit": limit}
        if regex:
            kwargs["regex"] = regex
        try:
            found = yield self.bus.call_with(wire.NOTIFICATION_API, "recent", kwargs, timeout=CALL_TIMEOUT)
        except RemoteError as e:
            status = 400 if e.remote_type == "InvalidRegex" else 502
            raise HTTPError(status, e.remote_type, e.message) from None
        except (Unroutable, Timeout):
            raise HTTPError(503, "Unavailable", "events are not available on this node: notification did not "
                                                "answer") from None
        events = [e for e in (found or []) if isinstance(e, dict)]
        body = render_atom(events, feed_id=feed_id, title=title, self_link=self_link, now=self.clock.seconds())
        return Answer(200, body, CONTENT_TYPE)
