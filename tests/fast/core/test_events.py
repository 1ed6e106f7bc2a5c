"""ooidx.events: emitting never fails the caller; subscribers get the bodies
whose topic their regex matches (memory://, on a Clock)."""
from __future__ import annotations

import uuid
from typing import Any, List

from twisted.internet import defer

import magnet
from magnet import Message

from ooidx import events
from ooidx.errors import InvalidRegex
from ooidx.node.bootstrap import declare_topology

from tests.fast.core.support import ClockCase, LogEvents, on_clock


class EventsTests(ClockCase):
    async def bus(self) -> Any:
        bus = magnet.connect(f"memory://events-{uuid.uuid4().hex}", self.clock, node="n1")
        bus.startService()
        await declare_topology(bus)
        self.addCleanup(lambda: self.wait(bus.stopService()))
        return bus

    def test_topics_and_messages(self) -> None:
        assert events.topic_of("saved", "sst") == "event.saved.sst"
        assert events.topic_of("failed", None) == "event.failed.-"
        message = events.event_message("saved", "sst", node="n1", now=5.0, bytes=3)
        assert message.type == events.EVENT and message.headers == {events.TOPIC_HEADER: "event.saved.sst"}
        assert message.json() == {"topic": "event.saved.sst", "kind": "saved", "dataset": "sst", "time": 5.0,
                                  "node": "n1", "bytes": 3}
        assert not message.persistent

    @on_clock
    async def test_an_unknown_kind_is_a_programming_error(self) -> None:
        bus = await self.bus()
        with self.assertRaises(ValueError) as e:
            events.emit(bus, "exploded", "sst")
        assert "unknown event kind 'exploded'" in str(e.exception)

    @on_clock
    async def test_an_event_that_is_not_json_is_logged_and_dropped(self) -> None:
        logged = LogEvents(self)
        bus = await self.bus()
        assert await events.emit(bus, "saved", "sst", what=object()) is None
        assert [e for e in logged.events if e.get("log_namespace") == "ooidx.events"
                and "not sent" in e["log_format"]]

    @on_clock
    async def test_an_event_that_cannot_be_sent_is_logged_and_the_caller_goes_on(self) -> None:
        logged = LogEvents(self)
        bus = await self.bus()
        self.patch(bus, "send", lambda *a, **k: defer.fail(magnet.NotConnected("link down")))
        assert await events.emit(bus, "fetched", "sst") is None
        [warned] = [e for e in logged.events if e.get("log_namespace") == "ooidx.events"]
        assert warned["topic"] == "event.fetched.sst" and "link down" in warned["error"]

    @on_clock
    async def test_subscribers_get_the_events_their_regex_matches(self) -> None:
        bus = await self.bus()
        got: List[dict] = []
        subscription = await events.subscribe(bus, r"^event\.saved\.", got.append)
        await events.emit(bus, "saved", "a", n=1)
        await events.emit(bus, "fetched", "a")
        await bus.send(events.NOTIFICATION, Message.of_json({"x": 1}, type="other",
                                                           headers={events.TOPIC_HEADER: "event.saved.b"}),
                       mandatory=False)
        await bus.send(events.NOTIFICATION, Message.of_json({"x": 2}, type=events.EVENT), mandatory=False)
        await events.emit(bus, "saved", "c")
        await self.advance_until(lambda: len(got) == 2)
        await self.advance(0.1)
        assert [(e["dataset"], e.get("n")) for e in got] == [("a", 1), ("c", None)]
        await subscription.cancel()

    def test_an_invalid_regex_fails_at_once(self) -> None:
        with self.assertRaises(InvalidRegex):
            events.subscribe(None, "(?=x)", lambda event: None)
