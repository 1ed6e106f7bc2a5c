"""user_pub_sub and user_notification (and the PersonalSubscriptions base they
share, ooidx.people.component) on a memory:// bus on a Clock, driven through
their operations and their queues: what reaches a person's queue, what is
ignored, what a failure leaves behind, and how every instance keeps up with
the attribute store."""
from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet import defer

from magnet import Message, RemoteError, Unroutable
from magnet import stream as magnet_stream

from ooidx.events import EVENT, TOPIC_HEADER
from ooidx.people import component as component_module
from ooidx.people.records import ID_HEADER, WEBHOOK_DETAIL, InvalidSubscription, UnknownSubscription
from ooidx.people.user_notification import UserNotification
from ooidx.people.user_pub_sub import PUBLICATION, UserPubSub

from tests.fast.core.support import FastCase, LogEvents
from tests.fast.people.people_support import People


def queued(s: People, queue: str) -> List[Any]:
    return [entry[0].json() for entry in s.bus.transport.broker.queues[queue].ready]


def event(topic: str, body: Any = None, type: str = EVENT) -> Message:
    return Message.of_json(body if body is not None else {"topic": topic}, type=type, headers={TOPIC_HEADER: topic})


class UserNotificationTests(FastCase):
    def subscribe(self, s: People, component: Any, person: str, regex: str, **kwargs: Any) -> Dict[str, Any]:
        return s.edge.wait(component.subscribe(person, regex, **kwargs))

    def test_matching_events_go_to_the_matching_queues_with_sortable_ids(self) -> None:
        s = People(self)
        un = s.user_notification
        a = self.subscribe(s, un, "ann", r"^event\.saved\.")
        b = self.subscribe(s, un, "bob", r"^event\.")
        self.assertIsNone(s.edge.wait(defer.maybeDeferred(un.on_event, event("dataset.x"))))
        s.edge.wait(un.on_event(event("event.saved.sst")))
        s.edge.wait(un.on_event(event("event.fetched.sst")))
        s.edge.until(lambda: True)
        self.assertEqual([m["topic"] for m in queued(s, a["queue"])], ["event.saved.sst"])
        self.assertEqual([m["topic"] for m in queued(s, b["queue"])], ["event.saved.sst", "event.fetched.sst"])
        ids = [entry[0].headers[ID_HEADER] for entry in s.bus.transport.broker.queues[b["queue"]].ready]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(un.routed, 2)

    def test_what_is_not_an_event_is_ignored(self) -> None:
        s = People(self)
        un = s.user_notification
        sub = self.subscribe(s, un, "ann", ".")
        log = LogEvents(self)
        self.assertIsNone(un.on_event(event("event.x", type="publication")))
        self.assertIsNone(un.on_event(Message.of_json({}, type=EVENT)))
        self.assertIsNone(un.on_event(Message(body=b"\xff{", type=EVENT, headers={TOPIC_HEADER: "event.x"})))
        self.assertTrue(any("its body is not JSON" in t for t in log.texts()))
        self.assertEqual(queued(s, sub["queue"]), [])

    def test_webhook_failures_never_feed_webhooks(self) -> None:
        s = People(self)
        un = s.user_notification
        streamed = self.subscribe(s, un, "ann", r"^event\.failed\.")
        hooked = self.subscribe(s, un, "ann", r"^event\.failed\.", webhook="https://hooks.example/h")
        s.poster.default = "hang"
        s.edge.wait(un.on_event(event("event.failed.-", {"topic": "event.failed.-", WEBHOOK_DETAIL: "x"})))
        s.edge.until(lambda: True)
        self.assertEqual(len(queued(s, streamed["queue"])), 1)
        self.assertEqual(s.poster.posts, [])
        self.assertIn(hooked["queue"], un.records)

    def test_a_queue_gone_meanwhile_is_logged_not_failed(self) -> None:
        s = People(self)
        un = s.user_notification
        sub = self.subscribe(s, un, "ann", ".")
        s.edge.wait(s.bus.transport.delete_queue(sub["queue"]))
        log = LogEvents(self)
        s.edge.wait(un.on_event(event("event.saved.x")))
        self.assertTrue(any("is gone; event event.saved.x not kept" in t for t in log.texts()))

    def test_more_matching_queues_than_one_multicast_takes(self) -> None:
        from magnet import multicast as mc
        from ooidx.people import user_notification as module

        s = People(self)
        un = s.user_notification
        subs = [self.subscribe(s, un, "ann", ".") for _ in range(3)]
        self.patch(mc, "MAX_ADDRESSES", 2)  # as if 10,000 were 2
        self.patch(module, "MAX_ADDRESSES", 2)
        s.edge.wait(un.on_event(event("event.saved.x")))
        s.edge.until(lambda: True)
        self.assertEqual([len(queued(s, sub["queue"])) for sub in subs], [1, 1, 1])

    def test_other_send_failures_are_failures(self) -> None:
        s = People(self)
        un = s.user_notification
        self.subscribe(s, un, "ann", ".")
        self.patch(s.bus, "send", lambda *a, **k: defer.fail(RuntimeError("link down")))
        d = un.on_event(event("event.saved.x"))
        self.assertRaises(Exception, s.edge.wait, d)

    def test_unsubscribe(self) -> None:
        s = People(self)
        un = s.user_notification
        sub = self.subscribe(s, un, "ann", ".")
        self.assertEqual(s.edge.wait(un.list()), [sub])
        self.assertEqual(s.edge.wait(un.list("bob")), [])
        self.assertRaises(UnknownSubscription, s.edge.wait, un.unsubscribe("ann", "0" * 12))
        self.assertRaises(UnknownSubscription, s.edge.wait, s.user_pub_sub.unsubscribe("ann", sub["id"]))
        self.assertTrue(s.edge.wait(un.unsubscribe("ann", sub["id"])))
        self.assertEqual(un.router.match("event.x"), set())
        self.assertNotIn(sub["queue"], s.bus.transport.broker.queues)

    def test_unsubscribe_when_the_store_fails(self) -> None:
        s = People(self)
        un = s.user_notification
        self.patch(s.bus, "call", lambda *a, **k: defer.fail(RemoteError("OperationalError", "disk")))
        self.assertRaises(RemoteError, s.edge.wait, un.unsubscribe("ann", "0" * 12))

    def test_a_subscription_the_store_refuses_leaves_no_queue(self) -> None:
        s = People(self)
        un = s.user_notification
        real = s.bus.call

        def call(address: str, op: str, **kwargs: Any) -> Any:
            if op == "set":
                return defer.fail(RemoteError("OperationalError", "disk full"))
            return real(address, op, **kwargs)

        self.patch(s.bus, "call", call)
        self.assertRaises(RemoteError, s.edge.wait, un.subscribe("ann", "."))
        self.assertFalse([q for q in s.bus.transport.broker.queues if q.startswith("user.ann.")])

    def test_failure_events_reach_that_persons_streams_only(self) -> None:
        s = People(self)
        un = s.user_notification
        mine = self.subscribe(s, un, "ann", r"^event\.failed\.")
        other_kind = self.subscribe(s, un, "ann", r"^event\.saved\.")
        theirs = self.subscribe(s, un, "bob", r"^event\.failed\.")
        s.store.data["user_subscription:ann:ffffffffffff"] = {"kind": "events", "person": "ann", "regex": "(",
                                                              "queue": "user.ann.ffffffffffff"}
        s.store.data["user_subscription:ann:eeeeeeeeeeee"] = {"kind": "events", "person": "ann", "regex": ".",
                                                              "queue": "user.ann.eeeeeeeeeeee"}
        record = {"id": "abcdef012345", "person": "ann", "webhook": "https://hooks.example/h"}
        failure = event("event.failed.-", {"topic": "event.failed.-", WEBHOOK_DETAIL: "abcdef012345"})
        sent = s.edge.wait(un.report_failure(record, failure))
        self.assertEqual(sent, 1)  # the bad regex is skipped, the queue that is gone is skipped
        s.edge.until(lambda: True)
        self.assertEqual(len(queued(s, mine["queue"])), 1)
        self.assertEqual(queued(s, other_kind["queue"]), [])
        self.assertEqual(queued(s, theirs["queue"]), [])

    def test_the_store_unreachable_at_reload_keeps_what_runs(self) -> None:
        s = People(self)
        un = s.user_notification
        sub = self.subscribe(s, un, "ann", ".")
        log = LogEvents(self)
        self.patch(s.bus, "call", lambda *a, **k: defer.fail(RuntimeError("store down")))
        s.edge.wait(un.reload())
        self.assertIn(sub["queue"], un.records)
        self.assertTrue(any("cannot load people's subscriptions" in t for t in log.texts()))

    def test_reloads_asked_meanwhile_run_once_more_after(self) -> None:
        s = People(self)
        un = s.user_notification
        gate: defer.Deferred = defer.Deferred()
        real = s.bus.call
        calls: List[str] = []

        def call(address: str, op: str, **kwargs: Any) -> Any:
            calls.append(op)
            if len(calls) == 1:
                return gate.addCallback(lambda _: real(address, op, **kwargs))
            return real(address, op, **kwargs)

        self.patch(s.bus, "call", call)
        first = un.reload()
        second = un.reload()
        third = un.reload()
        self.assertFalse(second.called)
        gate.callback(None)
        for d in (first, second, third):
            s.edge.wait(d)
        self.assertEqual(calls, ["query", "query"])

    def test_a_changed_record_is_restarted_and_a_broken_one_logged(self) -> None:
        s = People(self)
        un = s.user_notification
        sub = self.subscribe(s, un, "ann", "a")
        key = f"user_subscription:ann:{sub['id']}"
        s.store.data[key] = dict(sub, regex="b")
        s.edge.wait(un.reload())
        self.assertEqual(un.router.match("b"), {sub["queue"]})
        self.assertEqual(un.router.match("a"), set())
        s.store.data[key] = dict(sub, regex="(")
        log = LogEvents(self)
        s.edge.wait(un.reload())
        self.assertTrue(any("cannot start subscription" in t for t in log.texts()))

    def test_a_change_not_announced_is_logged(self) -> None:
        s = People(self)
        un = s.user_notification
        log = LogEvents(self)
        real = s.bus.send

        def send(address: str, message: Any, **kwargs: Any) -> Any:
            if address == component_module.CHANGED_FANOUT:
                return defer.fail(Unroutable("no fanout"))
            return real(address, message, **kwargs)

        self.patch(s.bus, "send", send)
        self.subscribe(s, un, "ann", ".")
        self.assertTrue(any("change not announced" in t for t in log.texts()))

    def test_the_default_poster_is_made_once(self) -> None:
        un = UserNotification("user_notification", object(), node="n", clock=object())
        self.assertIs(un.poster, un.poster)

    def test_a_webhook_is_checked_before_anything_is_made(self) -> None:
        s = People(self)
        un = s.user_notification
        for url in (5, "http://" + "a" * 3000, "http://nowhere.example/"):
            self.assertRaises(Exception, s.edge.wait, un.subscribe("ann", ".", webhook=url))
        self.assertEqual(s.store.data.keys() - {k for k in s.store.data if k.startswith("person:")}, set())
        un.allow_private = True
        self.assertEqual(s.edge.wait(un.check_webhook("http://nowhere.example/h")), "http://nowhere.example/h")


class StartTests(FastCase):
    def test_starting_where_the_attribute_store_is_unreachable(self) -> None:
        """The store unroutable at once (not running on this bus): the
        component starts, says so, and loads the subscriptions when told of a change."""
        import uuid

        import magnet

        from tests.fast.core.support import drive, threadless

        clock = threadless(self)
        bus = magnet.connect(f"memory://nostore-{uuid.uuid4().hex}", clock, node="n", rpc_timeout=5)
        bus.startService()
        log = LogEvents(self)
        for cls in (UserNotification, UserPubSub):
            component = cls(cls.__name__.lower(), bus, node="n", clock=clock)
            drive(self, clock, component.start())
            self.assertTrue(component.started)
            drive(self, clock, component.stopService())
        self.assertEqual(sum("cannot load people's subscriptions" in t for t in log.texts()), 2)
        drive(self, clock, bus.stopService())


class UserPubSubTests(FastCase):
    def test_a_stream_becomes_a_small_notice_and_a_publication_passes(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        sub = s.edge.wait(up.subscribe("ann", r"^dataset\.sst$"))
        self.assertEqual(sub["source"], f"pubsub.sub.{sub['queue']}")
        q = sub["queue"]
        start = Message.of_json({"topic": "dataset.sst", "dataset": "sst", "url": "u", "fetched": 1.0,
                                 "length": 3, "das": "big"}, type=magnet_stream.START)
        for m in (start, Message(body=b"x", type=magnet_stream.DATA), Message(body=b"", type=magnet_stream.END),
                  Message.of_json({"topic": "dataset.sst", "message": "hi"}, type=PUBLICATION)):
            s.edge.wait(defer.maybeDeferred(up.on_source_message, q, m))
        s.edge.until(lambda: True)
        self.assertEqual(queued(s, q), [{"topic": "dataset.sst", "dataset": "sst", "url": "u", "fetched": 1.0,
                                         "length": 3}, {"topic": "dataset.sst", "message": "hi"}])
        self.assertEqual(up.notices, 2)

    def test_what_cannot_be_a_notice_is_ignored(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        sub = s.edge.wait(up.subscribe("ann", "."))
        log = LogEvents(self)
        for m in (Message(body=b"\xff", type=magnet_stream.START), Message.of_json([1], type=magnet_stream.START),
                  Message.of_json([1], type=PUBLICATION), Message.of_json({}, type="other")):
            self.assertIsNone(up.on_source_message(sub["queue"], m))
        self.assertEqual(queued(s, sub["queue"]), [])
        self.assertTrue(any("ignoring a other message" in t for t in log.texts()))
        self.assertTrue(any("not a JSON object" in t for t in log.texts()))

    def test_a_notice_for_a_queue_gone_is_dropped(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        log = LogEvents(self)
        notice = Message.of_json({"topic": "dataset.x"}, type=PUBLICATION)
        self.assertIsNone(s.edge.wait(up.on_source_message("user.ann.000000000000", notice)))
        self.assertTrue(any("is gone; notice not kept" in t for t in log.texts()))
        self.patch(s.bus, "send", lambda *a, **k: defer.fail(RuntimeError("link down")))
        self.assertRaises(RuntimeError, s.edge.wait, up.on_source_message("user.ann.000000000000", notice))

    def test_pub_sub_refusing_is_the_persons_error(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        for answer, error in [(RemoteError("InvalidRegex", "RE2 says no"), InvalidSubscription),
                              ({"no": "address"}, InvalidSubscription),
                              (RemoteError("ZeroDivisionError", "bug"), RemoteError)]:
            intercept(self, s, "pub_sub", "subscribe", answer)
            self.assertRaises(error, s.edge.wait, up.subscribe("ann", "x"))
        self.assertFalse([q for q in s.bus.transport.broker.queues if q.startswith("user.ann.")])

    def test_a_record_without_its_source_is_not_fed(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        log = LogEvents(self)
        s.edge.wait(up._activate({"queue": "user.ann.000000000000", "kind": "datasets"}))
        self.assertTrue(any("has no pub_sub address" in t for t in log.texts()))
        s.edge.wait(up._deactivate("user.ann.000000000000"))

    def test_a_release_that_fails_is_logged_and_the_rest_done(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        sub = s.edge.wait(up.subscribe("ann", "."))
        intercept(self, s, "pub_sub", "unsubscribe", RemoteError("ZeroDivisionError", "bug"))
        log = LogEvents(self)
        self.assertTrue(s.edge.wait(up.unsubscribe("ann", sub["id"])))
        self.assertTrue(any("releasing" in t for t in log.texts()))
        self.assertNotIn(sub["queue"], s.bus.transport.broker.queues)

    def test_stopping_stops_every_feed(self) -> None:
        s = People(self)
        up = s.user_pub_sub
        sub = s.edge.wait(up.subscribe("ann", "."))
        self.assertIn(sub["queue"], up._sources)
        s.edge.wait(up.stopService())
        self.assertEqual((up._sources, up.records), ({}, {}))


def intercept(case: Any, s: People, service: str, op: str, answer: Any) -> None:
    """C{service.op} answers C{answer} (an exception fails it); every other call goes to the bus."""
    real = s.bus.call_with

    def call_with(address: str, name: str, kwargs: Any, timeout: Any = None) -> Any:
        if (address, name) == (service, op):
            return defer.fail(answer) if isinstance(answer, BaseException) else defer.succeed(answer)
        return real(address, name, kwargs, timeout=timeout)

    case.patch(s.bus, "call_with", call_with)
