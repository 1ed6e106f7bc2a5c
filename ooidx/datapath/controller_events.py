"""What the controller follows: the events that update a dataset's record
(fetched, saved, failed) and whether a dataset with an expected period of
update is out of date (C{stale}). A part of
L{ooidx.datapath.controller.Controller}, kept apart because it is one thing."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

from twisted.internet.defer import inlineCallbacks

from magnet import MagnetError

from ooidx import dap, events
from ooidx import wire


__all__ = ["FollowsEvents", "STALE_FACTOR"]

#: A dataset with an expected period of update is out of date after this many periods without a new version.
STALE_FACTOR = 1.5


class FollowsEvents:
    """The controller's event following and freshness (a mixin of its class)."""


    @inlineCallbacks
    def check_freshness(self) -> Any:
        """Mark C{stale} every live dataset with an C{expect_every} that has had
        no new version (no C{fetched} or C{saved}) for L{STALE_FACTOR} times
        that period, and emit one C{stale} event for it; the next version
        clears the mark. Fires with the names newly marked."""
        now = self._now()
        marked = []
        for name, record in sorted(self.datasets.items()):
            period = record.get("expect_every")
            since = record.get("fresh_since")
            if record.get("status") == "purged" or record.get("stale") or \
                    not isinstance(period, (int, float)) or not isinstance(since, (int, float)):
                continue
            if now - since <= STALE_FACTOR * period:
                continue
            current = yield self._stored(name)
            if not isinstance(current, dict) or current.get("stale") or current.get("status") == "purged" or \
                    current.get("fresh_since") != since:
                if isinstance(current, dict):
                    self.datasets[name] = current
                continue  # changed elsewhere (a new version, another controller's mark)
            updated = dict(current, stale=True, stale_since=now)
            yield self._store("set", key=wire.dataset_key(name), value=updated)
            self.datasets[name] = updated
            marked.append(name)
            self.log.warn("{component}: dataset {name} is out of date: no new version for {age:.0f} s "
                          "(expected every {period:g} s)", component=self.name, name=name, age=now - since,
                          period=period)
            yield events.emit(self.bus, "stale", name, component=self.name, url=current.get("url"),
                              expect_every=period, age=now - since)
        return marked

    # following events ----------------------------------------------------------------

    def _on_event(self, message: Any) -> Any:
        """An event on the notification fanout: C{fetched}, C{saved} and
        C{failed} of a dataset update its record. Never fails (an event is a report)."""
        topic = message.headers.get(events.TOPIC_HEADER) if isinstance(message.headers, dict) else None
        if message.type != events.EVENT or not isinstance(topic, str):
            return None
        parts = topic.split(".", 2)
        if len(parts) != 3 or parts[1] not in ("fetched", "saved", "failed") or not dap.valid_name(parts[2]):
            return None
        try:
            body = message.json()
        except MagnetError:
            return None
        if not isinstance(body, dict):
            return None
        d = self._record_lock(parts[2]).run(self._apply_event, parts[1], parts[2], body)
        d.addErrback(lambda f: self.log.warn("{component}: record of {name} not updated after {kind}: {reason}",
                                             component=self.name, name=parts[2], kind=parts[1],
                                             reason=f.getErrorMessage()))
        return d

    @inlineCallbacks
    def _apply_event(self, kind: str, name: str, event: Dict[str, Any]) -> Any:
        record = yield self._stored(name)
        if not isinstance(record, dict) or record.get("status") == "purged":
            return None
        if isinstance(event.get("url"), str) and record.get("url") not in (None, event["url"]):
            return None  # an event of the dataset's former upstream
        updated = dict(record)

        def number(key: str) -> Optional[float]:
            value = event.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        def later(value: Optional[float]) -> None:
            if value is not None and (not isinstance(updated.get("last_fetch"), (int, float))
                                      or value > updated["last_fetch"]):
                updated["last_fetch"] = value

        if kind in ("fetched", "saved"):
            if updated.get("stale"):
                self.log.info("{component}: dataset {name} is up to date again", component=self.name, name=name)
            updated["stale"] = False
            updated["fresh_since"] = self._now()
        if kind == "fetched":
            updated["status"] = "fetched"
            later(number("time"))
            if number("bytes") is not None and event.get("addresses"):
                updated["size"] = int(event["bytes"])
        elif kind == "saved":
            later(number("fetched"))
            if number("bytes") is not None:
                updated["size"] = int(event["bytes"])
            versions = number("versions")
            if versions is not None:
                updated["versions"] = max(int(versions), int(updated.get("versions") or 0))
        else:
            updated["status"] = "failed"
            reason = event.get("reason") or event.get("error") or "failed"
            updated["last_error"] = {"reason": str(reason)[:500], "stage": event.get("stage"),
                                     "time": number("time") or time.time()}
        if updated == record:
            return None
        yield self._store("set", key=wire.dataset_key(name), value=updated)
        if name in self.datasets:
            self.datasets[name] = updated
        return updated
