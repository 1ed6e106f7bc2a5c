"""The base URLs of datasets asked for by name at the proxy
(C{/datasets/NAME.SUFFIX}): read from the dataset record in the attribute
store (C{attribute_store.get(key="dataset:NAME")}) and remembered for a few
seconds (C{ttl}; a purge or a change reaches the controller anyway, and the
proxy forgets a dataset on its change events)."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from magnet import RemoteError

from ooidx import wire
from ooidx.datapath.proxy_url import ProxyError, Target

__all__ = ["BASE_TTL", "BaseURLs", "MAX_REMEMBERED"]

#: How long a by-name base URL is remembered.
BASE_TTL = 5.0
#: Past this many remembered names the expired ones are dropped.
MAX_REMEMBERED = 4096
#: The attribute store's ways of saying "no such key".
_NOT_FOUND = ("KeyError", "NotFound", "UnknownKey", "UnknownDataset")


class BaseURLs:
    """Dataset name -> base URL, looked up on the bus and remembered for C{ttl} seconds."""

    def __init__(self, bus: Any, clock: Any, *, ttl: float = BASE_TTL, timeout: float = 30.0) -> None:
        self.bus = bus
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        self._known: Dict[str, Tuple[float, str]] = {}  # name -> (expires, base URL)

    def url_of(self, target: Target) -> Deferred:
        """The URL a target asks for: as given, or the dataset's base + suffix
        (C{.dods} for C{.csv}) + query; fails with L{ProxyError} 404 for no such dataset."""
        if target.url is not None:
            return succeed(target.url)
        suffix = ".dods" if target.csv else target.suffix
        d = self.lookup(target.name)  # type: ignore[arg-type]
        return d.addCallback(lambda base: base + suffix + ("?" + target.query if target.query is not None else ""))

    def remembered_url(self, target: Target) -> Optional[str]:
        """The URL of a by-name target if its base URL is remembered now, else None."""
        known = self._known.get(target.name)  # type: ignore[arg-type]
        if known is None or known[0] <= self.clock.seconds():
            return None
        return known[1] + target.suffix + ("?" + target.query if target.query is not None else "")

    @inlineCallbacks
    def lookup(self, name: str) -> Any:
        """The base URL of dataset C{name}."""
        now = self.clock.seconds()
        known = self._known.get(name)
        if known is not None and known[0] > now:
            return known[1]
        try:
            record = yield self.bus.call("attribute_store", "get", key=wire.dataset_key(name), timeout=self.timeout)
        except RemoteError as e:
            if e.remote_type in _NOT_FOUND:
                raise ProxyError(404, "UnknownDataset", f"no dataset named {name!r}") from None
            raise
        if isinstance(record, str):
            try:
                record = json.loads(record)
            except ValueError:
                record = None
        if not isinstance(record, dict) or not isinstance(record.get("url"), str) \
                or record.get("status") == "purged":
            raise ProxyError(404, "UnknownDataset", f"no dataset named {name!r}")
        base = record["url"]
        self._known[name] = (now + self.ttl, base)
        if len(self._known) > MAX_REMEMBERED:
            self._known = {k: v for k, v in self._known.items() if v[0] > now}
        return base

    def remember(self, name: str, base: str) -> None:
        """Remember C{base} as dataset C{name}'s base URL for C{ttl} seconds (as the
        controller resolved it for a request by name)."""
        now = self.clock.seconds()
        self._known[name] = (now + self.ttl, base)
        if len(self._known) > MAX_REMEMBERED:
            self._known = {k: v for k, v in self._known.items() if v[0] > now}

    def forget(self, name: Optional[str] = None) -> None:
        """Drop remembered base URLs (one dataset's, or all)."""
        if name is None:
            self._known.clear()
        else:
            self._known.pop(name, None)
