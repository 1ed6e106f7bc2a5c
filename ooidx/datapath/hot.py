"""Hot answers: small answers the cache served, held in the proxy's memory
and answered at once, without the bus (docs/data-path.md).

An answer is held (L{HotResponses}) when the cache served it (status 200, a
body of at most C{HOT_ENTRY_BYTES}), keyed by method and URL, for at most the
proxy's C{hot_ttl}; all held answers together cost at most C{HOT_BYTES},
their headers and URL counted with their body; the least recently used go
first, and expired ones are swept (L{HotResponses.sweep}) on the proxy's timer.
What a dataset change makes stale is dropped: L{drop_on_event} (the
C{notification} fanout's C{purged|registered|fetched|refreshed|cached}
events) and L{drop_on_purge} (the caches' purge broadcast). The requests
answered from here are counted (L{AnsweredCounts}) and posted to the
controller's statistics in batches.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from twisted.web import server

from magnet import MagnetError
from magnet.rpc import decode_request

from ooidx import events, wire

__all__ = ["AnsweredCounts", "HOT_BYTES", "HOT_ENTRY_BYTES", "HOT_TTL", "Held", "HotResponses", "answer_held",
           "drop_on_event", "drop_on_purge", "held_from"]

#: Seconds a hot response is held at the proxy (capped by the cache's max_age).
HOT_TTL = 10.0
#: Largest body held at the proxy, and all held bodies together.
HOT_ENTRY_BYTES = 256 * 1024
HOT_BYTES = 32 * 1024 * 1024
#: The most bytes of header fields (and of the URL) one held answer may have besides its body.
MAX_HELD_HEAD = 64 * 1024 + 8192 + 256
#: Events after which what the proxy holds for a dataset may be out of date.
_INVALIDATING = frozenset(("purged", "registered", "fetched", "refreshed", "cached"))
#: Response headers never held: the connection's own, and those Twisted sets on each request.
_NOT_HELD = wire.HOP_BY_HOP_BYTES | {b"date", b"server"}


class Held:
    """One answer held at the proxy."""

    __slots__ = ("status", "reason", "headers", "body", "dataset", "url", "expires", "size")

    def __init__(self, status: int, reason: Optional[bytes], headers: List[Tuple[bytes, List[bytes]]], body: bytes,
                 dataset: Optional[str], url: str, expires: float) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.dataset = dataset
        self.url = url
        self.expires = expires
        #: what holding it costs, counted against HOT_BYTES: body, headers, URL and a fixed share
        self.size = (len(body) + len(url) + 256
                     + sum(len(name) + sum(len(v) + 16 for v in values) for name, values in headers))


class HotResponses:
    """Small answers held in memory: bounded bytes, least recently used out first."""

    def __init__(self, max_bytes: int = HOT_BYTES, max_entry: int = HOT_ENTRY_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.size = 0
        self.hits = 0
        self._entries: "OrderedDict[Tuple[bytes, str], Held]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, method: bytes, url: str, now: float) -> Optional[Held]:
        key = (method, url)
        held = self._entries.get(key)
        if held is None:
            return None
        if held.expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return held

    def put(self, method: bytes, url: str, held: Held) -> None:
        if len(held.body) > self.max_entry or held.size - len(held.body) > MAX_HELD_HEAD:
            return
        key = (method, url)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = held
        self.size += held.size
        while self.size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def sweep(self, now: float) -> int:
        """Drop every expired answer (not only those asked for again); how many went."""
        return self._drop_where(lambda held: held.expires <= now)

    def drop_url(self, url: str) -> int:
        return self._drop_where(lambda held: held.url == url)

    def drop_dataset(self, name: Optional[str], base_url: Optional[str]) -> int:
        """Drop what belongs to dataset C{name} or lies under C{base_url}."""
        def under(held: Held) -> bool:
            if name is not None and held.dataset == name:
                return True
            if base_url:
                url = held.url
                return url == base_url or (url.startswith(base_url) and url[len(base_url)] in "./?")
            return False

        return self._drop_where(under)

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0

    def _drop_where(self, test: Any) -> int:
        keys = [key for key, held in self._entries.items() if test(held)]
        for key in keys:
            self._drop(key)
        return len(keys)

    def _drop(self, key: Tuple[bytes, str]) -> None:
        held = self._entries.pop(key, None)
        if held is not None:
            self.size -= held.size


def held_from(request: server.Request, dataset: Optional[str], url: str, body: bytes, expires: float) -> Held:
    """The answer just relayed to C{request}, to be held: its status, the
    headers it went out with (less the connection's own), its body."""
    headers = [(name, list(values)) for name, values in request.responseHeaders.getAllRawHeaders()
               if name.lower() not in _NOT_HELD]
    return Held(request.code, request.code_message, headers, body, dataset, url, expires)


def answer_held(request: server.Request, held: Held) -> bytes:
    """Answer C{request} with a held answer; the body to write (none for HEAD)."""
    request.setResponseCode(held.status, held.reason)
    headers = request.responseHeaders
    for name, values in held.headers:
        headers.setRawHeaders(name, values)
    return held.body


class AnsweredCounts:
    """The requests answered from the held answers, per dataset and URL, until
    they are posted to the controller's statistics (one C{record} each)."""

    def __init__(self) -> None:
        self._counts: Dict[Tuple[Optional[str], str], List[int]] = {}  # (dataset, url) -> [count, bytes]

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, dataset: Optional[str], url: str, size: int) -> None:
        counts = self._counts.get((dataset, url))
        if counts is None:
            self._counts[(dataset, url)] = [1, size]
        else:
            counts[0] += 1
            counts[1] += size

    def post(self, bus: Any, log: Any, component: str) -> None:
        """Post what was counted (and start counting again); an undelivered record is logged."""
        counts, self._counts = self._counts, {}
        for (dataset, url), (count, size) in counts.items():
            d = bus.post("controller", "record", dataset=dataset, url=url, hit=True, bytes=size, status=200,
                         count=count, requests=count)
            d.addErrback(lambda f: log.debug("{component}: record not delivered: {reason}",
                                             component=component, reason=f.getErrorMessage()))


def drop_on_event(hot: HotResponses, message: Any) -> Optional[str]:
    """Drop what an event on the notification fanout makes stale; the dataset
    whose base URL may have changed (to forget it too), if any."""
    if message.type != events.EVENT:
        return None
    topic = message.headers.get(events.TOPIC_HEADER)
    if not isinstance(topic, str):
        return None
    parts = topic.split(".", 2)
    if len(parts) != 3 or parts[1] not in _INVALIDATING:
        return None
    name = parts[2] if parts[2] != "-" else None
    try:
        body = message.json()
    except MagnetError:
        body = None
    url = body.get("url") if isinstance(body, dict) and isinstance(body.get("url"), str) else None
    if parts[1] == "cached":
        if url is not None:
            hot.drop_url(url)
        return None
    hot.drop_dataset(name, url)
    return name


def drop_on_purge(hot: HotResponses, message: Any) -> Optional[str]:
    """Drop what a cache purge broadcast names (all of it if the message cannot
    be read); the purged dataset, if named."""
    try:
        op, kwargs = decode_request(message)
    except MagnetError:
        hot.clear()  # cannot tell what went: drop it all
        return None
    if op != "purge":
        return None
    name = kwargs.get("name") if isinstance(kwargs.get("name"), str) else None
    base_url = kwargs.get("base_url") if isinstance(kwargs.get("base_url"), str) else None
    hot.drop_dataset(name, base_url)
    return name
