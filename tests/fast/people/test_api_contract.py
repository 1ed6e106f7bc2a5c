"""People's HTTP API (ooidx.people.api) through the web edge's site, no socket:
people made by the operator, subscriptions of both kinds, event streams (SSE)
with their tokens and tickets, budgets (429), the operator's event tail.
user_notification, user_pub_sub and notification run on a memory:// bus on a
Clock. The loopback version stays in tests/ooidx/test_user_subscriptions.py."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from magnet import RemoteError

from ooidx.people import api as api_module
from ooidx.people.tickets import make_ticket, ticket_key

from tests.fast.core.support import FastCase, LogEvents, cases, expand
from tests.fast.people.people_support import TOKEN, People


def _altered(ticket: str, part: int, value: str) -> str:
    parts = ticket.split(".")
    parts[part] = value
    return ".".join(parts)


# --------------------------------------------------------------------------- #
# people and tokens


class PeopleTests(FastCase):
    def test_people_are_made_by_the_operator_only(self) -> None:
        s = People(self)
        r = s.request("POST", "/api/people", {"name": "alice"})
        self.assertEqual((r.status, r.error()[0]), (401, "Unauthorized"))
        self.assertEqual(s.request("POST", "/api/people", {"name": "alice"}, token="wrong-" + "x" * 20).status, 401)
        r = s.request("POST", "/api/people", {"name": "alice"}, token=TOKEN)
        self.assertEqual(r.status, 201)
        token = r.json()["token"]
        self.assertTrue(token.startswith("alice."))
        stored = s.store.data["person:alice"]
        self.assertNotIn(token, json.dumps(stored))
        self.assertEqual(len(stored["token_sha256"]), 64)
        r = s.request("POST", "/api/people", {"name": "alice"}, token=TOKEN)
        self.assertEqual((r.status, r.error()[0]), (409, "Conflict"))
        for bad in ({"name": "Alice!"}, {"name": ""}, {"name": "x" * 40}, {"name": 5}, {"nom": "bob"}, {}):
            self.assertEqual(s.request("POST", "/api/people", bad, token=TOKEN).status, 400, bad)
        r = s.request("POST", "/api/people", b"{not json", token=TOKEN)
        self.assertEqual((r.status, r.error()[0]), (400, "BadRequest"))
        r = s.request("GET", "/api/people", token=TOKEN)
        self.assertEqual([p["name"] for p in r.json()["people"]], ["alice"])
        self.assertEqual(s.request("GET", "/api/people", token=token).status, 401)

    def test_a_persons_token_is_theirs_alone(self) -> None:
        s = People(self)
        token = s.person("alice")
        self.assertEqual(s.request("GET", "/api/subscriptions", token=token).json(), {"subscriptions": []})
        for wrong in (None, TOKEN, token[:-1] + ("A" if token[-1] != "A" else "B"), "bob." + token.split(".", 1)[1],
                      "nodot", "alice.", "Alice." + token.split(".", 1)[1], "alice." + "x" * 300):
            r = s.request("GET", "/api/subscriptions", token=wrong)
            self.assertEqual((r.status, r.error()[0]), (401, "Unauthorized"), wrong)
        for header in ("Basic " + token, "Bearer", "Bearer   "):
            r = s.request("GET", "/api/subscriptions", headers={"Authorization": header})
            self.assertEqual(r.status, 401, header)
        r = s.request("GET", "/api/subscriptions", headers={"Authorization": "Bearer al\xe9ce.x"})
        self.assertEqual(r.status, 401)

    def test_a_stored_person_without_a_usable_hash_opens_nothing(self) -> None:
        s = People(self)
        s.store.data["person:carol"] = {"name": "carol", "token_sha256": None}
        self.assertEqual(s.request("GET", "/api/subscriptions", token="carol.whatever").status, 401)
        s.store.data["person:carol"] = "not a record"
        self.assertEqual(s.request("GET", "/api/subscriptions", token="carol.whatever").status, 401)

    def test_deleting_a_person_removes_their_subscriptions(self) -> None:
        s = People(self)
        token = s.person("dave")
        s.subscribe(token, kind="events", regex="a")
        sub = s.subscribe(token, kind="datasets", regex="b")
        self.assertIn(sub["queue"], s.pub_sub.subscriptions)
        r = s.request("DELETE", "/api/people/dave", token=TOKEN)
        self.assertEqual(r.json(), {"deleted": "dave", "subscriptions": 2})
        self.assertEqual([k for k in s.store.data if "dave" in k], [])
        self.assertEqual(s.pub_sub.subscriptions, {})
        self.assertEqual(s.request("DELETE", "/api/people/dave", token=TOKEN).status, 404)
        self.assertEqual(s.request("DELETE", "/api/people/Not!A!Name", token=TOKEN).status, 404)
        self.assertEqual(s.request("DELETE", "/api/people/dave", token=token).status, 401)
        self.assertEqual(s.request("GET", "/api/subscriptions", token=token).status, 401)

    @cases("method, path, status", [
        ("PUT", "/api/subscriptions", 405), ("GET", "/api/subscriptions/a/b/c", 404),
        ("PUT", "/api/people", 405), ("GET", "/api/people/x", 405), ("GET", "/api/people/x/y", 404),
        ("GET", "/api/subscriptions/%ff", 404), ("GET", "/api/events/stream/x", 404),
        ("POST", "/api/events/stream", 405), ("GET", "/api/subscriptions/0123456789ab/nope", 404),
    ])
    def test_paths_and_methods(self, method: str, path: str, status: int) -> None:
        s = People(self)
        token = s.person()
        r = s.request(method, path, token=token)
        self.assertEqual(r.status, status, r)
        if status == 405:
            self.assertTrue(r.header("Allow"))


expand(PeopleTests)


# --------------------------------------------------------------------------- #
# subscriptions


@expand
class SubscriptionTests(FastCase):
    @cases("raw, status, kind", [
        (b"[1, 2]", 400, "BadRequest"),
        (b"{bad", 400, "BadRequest"),
        (json.dumps({"kind": "things", "regex": "x"}).encode(), 400, "BadRequest"),
        (json.dumps({"regex": "x"}).encode(), 400, "BadRequest"),
        (json.dumps({"kind": "events"}).encode(), 400, "InvalidRegex"),
        (json.dumps({"kind": "events", "regex": "(?=x)y"}).encode(), 400, "InvalidRegex"),
        (json.dumps({"kind": "events", "regex": "a" * 5000}).encode(), 400, "InvalidRegex"),
        (json.dumps({"kind": "events", "regex": "x", "extra": 1}).encode(), 400, "BadRequest"),
        (json.dumps({"kind": "events", "regex": "x", "webhook": 5}).encode(), 400, "InvalidURL"),
        (json.dumps({"kind": "events", "regex": "x", "max_length": 0}).encode(), 400, "InvalidSubscription"),
        (json.dumps({"kind": "events", "regex": "x", "max_length": "many"}).encode(), 400, "InvalidSubscription"),
        (json.dumps({"kind": "events", "regex": "x", "max_length": True}).encode(), 400, "InvalidSubscription"),
        (json.dumps({"kind": "datasets", "regex": "("}).encode(), 400, "InvalidRegex"),
    ])
    def test_subscription_requests_are_checked(self, raw: bytes, status: int, kind: str) -> None:
        s = People(self)
        token = s.person()
        r = s.request("POST", "/api/subscriptions", raw, token=token)
        self.assertEqual((r.status, r.error()[0]), (status, kind), r)
        self.assertEqual([k for k in s.store.data if k.startswith("user_subscription:")], [])

    def test_a_body_too_large_is_413(self) -> None:
        s = People(self, max_body=200)
        token = s.person()
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": "a" * 300}, token=token)
        self.assertEqual((r.status, r.error()[0]), (413, "PayloadTooLarge"))

    @cases("url, status, kind", [
        ("file:///etc/passwd", 400, "InvalidURL"),
        ("ftp://example.org/x", 400, "InvalidURL"),
        ("http://user:pw@example.org/x", 400, "InvalidURL"),
        ("http://example.org/" + "a" * 3000, 400, "InvalidURL"),
        ("http://127.0.0.1:9999/hook", 403, "Forbidden"),
        ("http://2130706433:9999/hook", 403, "Forbidden"),
        ("http://10.1.2.3/hook", 403, "Forbidden"),
        ("http://169.254.169.254/latest/meta-data", 403, "Forbidden"),
        ("http://[::1]/hook", 403, "Forbidden"),
        ("http://localhost:9999/hook", 403, "Forbidden"),
        ("http://sneaky.example/hook", 403, "Forbidden"),
        ("http://nowhere.example/hook", 400, "InvalidURL"),
        ("http://odd.example/hook", 400, "InvalidURL"),
    ])
    def test_forbidden_webhook_targets_are_refused_and_never_requested(self, url: str, status: int,
                                                                       kind: str) -> None:
        s = People(self)
        token = s.person()
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": ".", "webhook": url}, token=token)
        self.assertEqual((r.status, r.error()[0]), (status, kind), r)
        s.emit("saved", "sst")
        self.assertEqual(s.poster.posts, [])
        self.assertEqual([k for k in s.store.data if k.startswith("user_subscription:")], [])

    def test_subscribe_list_get_delete(self) -> None:
        s = People(self)
        token = s.person("erin")
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.")
        self.assertEqual(sub["kind"], "events")
        self.assertEqual(sub["queue"], f"user.erin.{sub['id']}")
        self.assertEqual(sub["max_length"], 10_000)
        self.assertEqual(sub["events"], f"/api/subscriptions/{sub['id']}/events")
        self.assertNotIn("regex_program", sub)
        hooked = s.subscribe(token, kind="datasets", regex="^dataset\\.sst$", webhook="https://hooks.example/h",
                             max_length=7)
        self.assertIsNone(hooked["events"])
        self.assertEqual(hooked["max_length"], 7)
        listed = s.request("GET", "/api/subscriptions", token=token).json()["subscriptions"]
        self.assertEqual([x["id"] for x in listed], [sub["id"], hooked["id"]])
        self.assertEqual(s.request("GET", f"/api/subscriptions/{sub['id']}", token=token).json(), sub)
        r = s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token)
        self.assertEqual(r.json(), {"deleted": sub["id"]})
        self.assertNotIn(sub["queue"], s.bus.transport.broker.queues)
        self.assertEqual(s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token).status, 404)
        s.edge.until(lambda: not s.user_notification.records)

    def test_other_peoples_subscriptions_are_not_there(self) -> None:
        s = People(self)
        alice, bob = s.person(), s.person()
        sub = s.subscribe(alice, kind="events", regex=".")
        for path in (f"/api/subscriptions/{sub['id']}", f"/api/subscriptions/{sub['id']}/events"):
            r = s.request("GET", path, token=bob)
            self.assertEqual((r.status, r.error()[0]), (404, "NotFound"))
        self.assertEqual(s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=bob).status, 404)
        self.assertEqual(s.request("GET", "/api/subscriptions/../../x", token=alice).status, 404)
        self.assertEqual(s.request("GET", f"/api/subscriptions/{sub['id']}", token=alice).json()["regex"], ".")

    def test_a_component_not_running_is_503(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=".")
        s.edge.wait(s.user_notification.stopService())
        s.edge.wait(s.bus.transport.delete_queue("user_notification"))
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": "x"}, token=token)
        self.assertEqual((r.status, r.error()[0]), (503, "Unavailable"))
        r = s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token)
        self.assertEqual((r.status, r.error()[0]), (503, "Unavailable"))

    @cases("remote_type, status", [("Forbidden", 403), ("UnknownSubscription", 404), ("OverBudget", 429),
                                   ("KeyError", 502)])
    def test_remote_refusals_become_statuses(self, remote_type: str, status: int) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=".")
        real_call_with = s.bus.call_with

        def call_with(address: str, op: str, kwargs: Any, timeout: Any = None) -> Any:
            if op in ("subscribe", "unsubscribe"):
                return defer.fail(RemoteError(remote_type, "no"))
            return real_call_with(address, op, kwargs, timeout=timeout)

        self.patch(s.bus, "call_with", call_with)
        self.assertEqual(s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token).status, status)
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": "x"}, token=token)
        self.assertEqual((r.status, r.error()[0]), (status, remote_type))

    def test_a_store_failing_is_500_not_a_leak(self) -> None:
        s = People(self)
        token = s.person()
        self.patch(s.bus, "call", lambda *a, **k: defer.fail(RemoteError("OperationalError", "disk I/O")))
        r = s.request("GET", "/api/subscriptions/0123456789ab", token=token)
        self.assertEqual(r.status, 500)
        self.assertEqual(r.error(), ("InternalError", "internal error"))
        self.flushLoggedErrors(RemoteError)


# --------------------------------------------------------------------------- #
# streams


class StreamTests(FastCase):
    def test_sse_stream_and_what_is_kept_while_away(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.")
        stream = s.open_stream(sub["events"], token)
        self.assertEqual(stream.response.header("Cache-Control"), "no-store")
        self.assertEqual(stream.response.header("X-Accel-Buffering"), "no")
        s.emit("fetched", "sst")
        s.emit("saved", "sst", version="v1")
        got = stream.wait_for(1)
        self.assertEqual(got[0]["data"]["topic"], "event.saved.sst")
        self.assertEqual(got[0]["data"]["version"], "v1")
        self.assertTrue(got[0]["id"])
        s.settle()
        self.assertEqual(len(stream.events), 1)  # the fetched event did not match
        stream.close()
        self.assertEqual(s.api.streams, set())

        for n in range(3):  # away: these are kept in the person's durable queue
            s.emit("saved", f"ds{n}")
        again = s.open_stream(sub["events"], token, last_id=got[0]["id"])
        rest = again.wait_for(3)
        self.assertEqual([e["data"]["dataset"] for e in rest], ["ds0", "ds1", "ds2"])
        ids = [e["id"] for e in rest]
        self.assertEqual(ids, sorted(ids))
        self.assertGreater(ids[0], got[0]["id"])
        again.close()

    def test_what_the_client_saw_already_is_skipped(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.")
        for n in range(3):
            s.emit("saved", f"ds{n}")
        first = s.open_stream(sub["events"], token)
        seen = first.wait_for(3)
        # a client that crashed before acking saw ds0 and ds1: the queue gives them back, the stream skips them
        queue = s.bus.transport.broker.queues[sub["queue"]]
        self.assertEqual(len(queue.ready), 0)
        first.close()
        s.edge.wait(s.bus.send(sub["queue"], _event_like(seen[0]["id"], "old")))
        s.edge.wait(s.bus.send(sub["queue"], _event_like("9" * 17 + "-ffffff", "new")))
        again = s.open_stream(sub["events"] + "?last_event_id=" + seen[2]["id"], token)
        s.settle()
        self.assertEqual([e["data"]["dataset"] for e in again.events], ["new"])
        self.assertEqual(len(queue.ready), 0)

    def test_a_message_that_is_not_json_is_dropped(self) -> None:
        from magnet import Message

        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex="x")
        s.edge.wait(s.bus.send(sub["queue"], Message(body=b"\xff not json", content_type="application/json")))
        s.edge.wait(s.bus.send(sub["queue"], _event_like("1" * 17 + "-aaaaaa", "fine")))
        stream = s.open_stream(sub["events"], token)
        self.assertEqual([e["data"]["dataset"] for e in stream.wait_for(1)], ["fine"])
        self.assertEqual(len(s.bus.transport.broker.queues[sub["queue"]].ready), 0)

    def test_the_bound_drops_the_oldest(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.", max_length=5)
        for n in range(12):
            s.emit("saved", f"ds{n}")
        s.edge.until(lambda: s.user_notification.routed >= 12)
        stream = s.open_stream(sub["events"], token)
        stream.wait_for(5)
        s.settle()
        self.assertEqual([e["data"]["dataset"] for e in stream.events], [f"ds{n}" for n in range(7, 12)])

    def test_keep_alive_comments_and_the_queue_keeps_what_comes_after(self) -> None:
        s = People(self)
        s.api.keepalive = 15.0
        token = s.person()
        sub = s.subscribe(token, kind="events", regex="x")
        stream = s.open_stream(sub["events"], token)
        s.clock.advance(15)
        s.clock.advance(15)
        self.assertEqual(stream.comments.count("keep-alive"), 2)
        stream.close()
        s.clock.advance(30)
        s.emit("saved", "x1")
        queue = s.bus.transport.broker.queues[sub["queue"]]
        self.assertEqual((len(queue.ready), len(queue.consumers)), (1, 0))

    def test_a_slow_client_pauses_the_stream(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.")
        stream = s.open_stream(sub["events"], token)
        (sse,) = s.api.streams
        sse.paused = True  # what the transport's producer does when its buffer is full
        for n in range(3):
            s.emit("saved", f"ds{n}")
        s.settle()
        self.assertEqual(stream.events, [])
        sse.resume()
        self.assertEqual([e["data"]["dataset"] for e in stream.wait_for(3)], ["ds0", "ds1", "ds2"])

    def test_closing_the_streams_ends_them_and_gives_back_what_was_held(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.")
        stream = s.open_stream(sub["events"], token)
        (sse,) = s.api.streams
        sse.paused = True
        s.emit("saved", "held")
        s.settle()
        s.api.close_streams()
        s.settle()
        self.assertTrue(stream.ended)
        self.assertEqual(s.api.streams, set())
        self.assertEqual(len(s.bus.transport.broker.queues[sub["queue"]].ready), 1)

    def test_a_webhook_subscription_has_no_stream(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex="x", webhook="https://hooks.example/h")
        r = s.request("GET", f"/api/subscriptions/{sub['id']}/events", token=token)
        self.assertEqual((r.status, r.error()[0]), (409, "Conflict"))
        r = s.request("POST", f"/api/subscriptions/{sub['id']}/ticket", token=token)
        self.assertEqual((r.status, r.error()[0]), (409, "Conflict"))

    def test_a_queue_that_cannot_be_read_ends_the_stream(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex="x")
        log = LogEvents(self)
        self.patch(s.bus, "consume_deliveries", lambda *a, **k: defer.fail(RuntimeError("queue gone")))
        connection = s.edge.open("GET", sub["events"], token=token)
        s.edge.until(lambda: (connection.response() or _incomplete()).complete)
        self.assertEqual(connection.response().status, 200)
        self.assertEqual(s.api.streams, set())
        self.assertTrue(any("cannot read" in t for t in log.texts()))

    def test_dataset_versions_reach_people_as_small_notices(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="datasets", regex=r"^dataset\.sst$")
        self.assertEqual(s.pub_sub.subscriptions, {sub["queue"]: r"^dataset\.sst$"})
        stream = s.open_stream(sub["events"], token)
        metadata = {"topic": "dataset.sst", "dataset": "sst", "url": "http://dap.example.org/sst.nc",
                    "fetched": 1700000000.0, "das": "Attributes {}", "dds": "Dataset {}", "status": 200,
                    "headers": [], "length": 3 * 65536}
        sent = s.edge.wait(s.bus.send_stream(f"pubsub.sub.{sub['queue']}", metadata, [b"\x00" * 65536] * 3))
        self.assertEqual(sent, 3 * 65536)
        got = stream.wait_for(1)
        self.assertEqual(got[0]["data"], {"topic": "dataset.sst", "dataset": "sst",
                                          "url": "http://dap.example.org/sst.nc", "fetched": 1700000000.0,
                                          "length": 196608})
        s.settle()
        self.assertEqual(len(stream.events), 1)
        self.assertEqual(s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token).status, 200)
        self.assertEqual(s.pub_sub.subscriptions, {})


def _event_like(mid: str, dataset: str) -> Any:
    from magnet import Message

    from ooidx.events import EVENT, TOPIC_HEADER
    from ooidx.people.records import ID_HEADER

    return Message.of_json({"topic": f"event.saved.{dataset}", "dataset": dataset}, type=EVENT,
                           headers={TOPIC_HEADER: f"event.saved.{dataset}", ID_HEADER: mid})


def _incomplete() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(complete=False)


# --------------------------------------------------------------------------- #
# stream tickets


@expand
class TicketTests(FastCase):
    def ticket(self, s: People, token: str, sid: str) -> Any:
        r = s.request("POST", f"/api/subscriptions/{sid}/ticket", token=token)
        self.assertEqual(r.status, 200, r)
        return r.json()

    def test_a_ticket_opens_the_stream_once_without_the_token(self) -> None:
        s = People(self)
        s.clock.advance(1_700_000_000)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=r"^event\.saved\.")
        answer = self.ticket(s, token, sub["id"])
        ticket = answer["ticket"]
        self.assertEqual(set(answer), {"ticket", "expires", "expires_in", "url"})
        self.assertEqual(answer["url"], f"/api/subscriptions/{sub['id']}/events?ticket={ticket}")
        self.assertEqual(answer["expires_in"], 60)
        self.assertEqual(answer["expires"], int(s.clock.seconds()) + 60)
        self.assertNotIn(token.split(".", 1)[1], ticket)
        stream = s.open_stream(answer["url"], None)
        s.emit("saved", "t1")
        got = stream.wait_for(1)
        stream.close()
        for n in (2, 3):
            s.emit("saved", f"t{n}")
        r = s.request("GET", answer["url"])
        self.assertEqual((r.status, r.error()[0]), (401, "TicketUsed"))
        self.assertIn(f"/api/subscriptions/{sub['id']}/ticket", r.error()[1])
        fresh = self.ticket(s, token, sub["id"])
        again = s.open_stream(fresh["url"] + f"&last_event_id={got[0]['id']}", None)
        self.assertEqual([e["data"]["dataset"] for e in again.wait_for(2)], ["t2", "t3"])

    def test_a_ticket_opens_nothing_else(self) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=".")
        ticket = self.ticket(s, token, sub["id"])["ticket"]
        q, sid = f"?ticket={ticket}", sub["id"]
        for method, path in [("GET", f"/api/subscriptions/{sid}{q}"), ("DELETE", f"/api/subscriptions/{sid}{q}"),
                             ("GET", f"/api/subscriptions{q}"), ("POST", f"/api/subscriptions/{sid}/ticket{q}"),
                             ("GET", f"/api/events/stream{q}"), ("GET", f"/api/people{q}"),
                             ("POST", f"/api/call/controller/get_stats{q}")]:
            r = s.request(method, path, {} if method == "POST" else None)
            self.assertEqual((r.status, r.error()[0]), (401, "Unauthorized"), (method, path))
        for method, path in [("GET", f"/api/subscriptions/{sid}"), ("DELETE", f"/api/subscriptions/{sid}"),
                             ("GET", f"/api/subscriptions/{sid}/events"), ("POST", f"/api/subscriptions/{sid}/ticket"),
                             ("GET", "/api/people")]:
            r = s.request(method, path, token=ticket)
            self.assertEqual((r.status, r.error()[0]), (401, "Unauthorized"), (method, path))
        self.assertEqual(s.request("POST", f"/api/subscriptions/{sid}/events{q}").status, 405)
        self.assertEqual(s.request("GET", f"/api/subscriptions/{sid}/ticket", token=token).status, 405)
        self.assertEqual(s.request("GET", f"/api/subscriptions/{sid}", token=token).status, 200)

    def test_an_expired_ticket_is_refused(self) -> None:
        s = People(self)
        s.clock.advance(1_700_000_000)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=".")
        start = int(s.clock.seconds())
        answer = self.ticket(s, token, sub["id"])
        self.assertEqual(answer["expires"], start + 60)
        s.clock.advance(60)
        r = s.request("GET", answer["url"])
        self.assertEqual((r.status, r.error()[0]), (401, "TicketExpired"))
        self.assertIn("/ticket", r.error()[1])
        fresh = self.ticket(s, token, sub["id"])
        self.assertNotEqual(fresh["ticket"], answer["ticket"])
        s.open_stream(fresh["url"], None).close()

    def test_tickets_that_are_not_for_this_stream(self) -> None:
        s = People(self)
        alice, bob = s.person("alice"), s.person("bob")
        a1 = s.subscribe(alice, kind="events", regex=".")
        a2 = s.subscribe(alice, kind="events", regex="x")
        b1 = s.subscribe(bob, kind="datasets", regex="^dataset\\.")
        t1 = self.ticket(s, alice, a1["id"])["ticket"]
        tb = self.ticket(s, bob, b1["id"])["ticket"]

        def events(sid: str) -> str:
            return f"/api/subscriptions/{sid}/events"

        mac = t1.rsplit(".", 1)[1]
        tampered = [
            _altered(t1, 5, mac[:-1] + ("A" if mac[-1] != "A" else "B")),
            _altered(t1, 3, str(int(t1.split(".")[3]) + 3600)),
            _altered(t1, 1, "bob"),
            _altered(t1, 2, a2["id"]),
            _altered(t1, 4, "A" * 16),
            _altered(t1, 1, "nobody"),
            make_ticket(ticket_key("a guessed operator token"), "alice", a1["id"], "0" * 64,
                        int(s.clock.seconds()) + 60),
        ]
        for bad in tampered:
            for sid in {bad.split(".")[2], a1["id"]}:
                r = s.request("GET", f"{events(sid)}?ticket={bad}")
                self.assertEqual((r.status, r.error()[0]), (401, "InvalidTicket"), bad)
                self.assertIn("not valid", r.error()[1])
        for ticket, sid in [(t1, a2["id"]), (t1, b1["id"]), (tb, a1["id"]), (t1, "0" * 12), (t1, "nothex")]:
            r = s.request("GET", f"{events(sid)}?ticket={ticket}")
            self.assertEqual((r.status, r.error()[0]), (403, "Forbidden"), sid)
        r = s.request("POST", f"/api/subscriptions/{a1['id']}/ticket", token=bob)
        self.assertEqual((r.status, r.error()[0]), (404, "NotFound"))
        r = s.request("POST", f"/api/subscriptions/{a1['id']}/ticket")
        self.assertEqual((r.status, r.error()[0]), (401, "Unauthorized"))
        t2 = self.ticket(s, alice, a2["id"])["ticket"]
        self.assertEqual(s.request("DELETE", f"/api/subscriptions/{a2['id']}", token=alice).status, 200)
        r = s.request("GET", f"{events(a2['id'])}?ticket={t2}")
        self.assertEqual((r.status, r.error()[0]), (404, "NotFound"))
        self.assertEqual(s.request("DELETE", "/api/people/bob", token=TOKEN).status, 200)
        r = s.request("GET", f"{events(b1['id'])}?ticket={tb}")
        self.assertEqual((r.status, r.error()[0]), (401, "InvalidTicket"))
        bob2 = s.person("bob")
        b2 = s.subscribe(bob2, kind="events", regex=".")
        for ticket, sid in [(tb, b1["id"]), (_altered(tb, 2, b2["id"]), b2["id"])]:
            r = s.request("GET", f"{events(sid)}?ticket={ticket}")
            self.assertEqual((r.status, r.error()[0]), (401, "InvalidTicket"))
        s.open_stream(f"{events(a1['id'])}?ticket={t1}", None).close()

    @cases("raw, status, kind, words", [
        ("", 401, "InvalidTicket", "empty"),
        ("x" * 10_000, 401, "InvalidTicket", "too long"),
        ("GOOD" + "A" * 300, 401, "InvalidTicket", "too long"),
        ("%C3%A9t%C3%A9", 401, "InvalidTicket", "ASCII"),
        ("%FF%FE%00", 401, "InvalidTicket", "ASCII"),
        ("abc", 401, "InvalidTicket", "6 parts"),
        ("GOOD.x", 401, "InvalidTicket", "6 parts"),
        (".....", 401, "InvalidTicket", "v1"),
        ("v1.....", 401, "InvalidTicket", "malformed"),
        ("GOOD0v2", 401, "InvalidTicket", "v1"),
        ("GOOD1Alice", 401, "InvalidTicket", "malformed"),
        ("GOOD3-5", 401, "InvalidTicket", "malformed"),
        ("GOOD5short", 401, "InvalidTicket", "malformed"),
        ("GOOD%00", 401, "InvalidTicket", "malformed"),
        ("GOOD&ticket=GOOD", 400, "BadRequest", "one ticket"),
    ])
    def test_malformed_tickets_are_a_clear_4xx(self, raw: str, status: int, kind: str, words: str) -> None:
        s = People(self)
        token = s.person()
        sub = s.subscribe(token, kind="events", regex=".")
        good = self.ticket(s, token, sub["id"])["ticket"]
        if raw[:4] == "GOOD" and raw[4:5].isdigit():
            raw = _altered(good, int(raw[4]), raw[5:])
        raw = raw.replace("GOOD", good)
        r = s.request("GET", f"/api/subscriptions/{sub['id']}/events?ticket={raw}")
        self.assertEqual((r.status, r.error()[0]), (status, kind), r)
        self.assertIn(words, r.error()[1])
        self.assertNotIn(good, r.error()[1])


# --------------------------------------------------------------------------- #
# budgets


class BudgetTests(FastCase):
    def test_a_person_has_a_budget_of_streams(self) -> None:
        """The attack: one person opens thousands of SSE streams (a descriptor
        each). Past their budget the next one is 429; others still get theirs."""
        s = People(self)
        s.api.max_streams_per_person = 3
        greedy, other = s.person(), s.person()
        sub = s.subscribe(greedy, kind="events", regex=r"^event\.saved\.")
        streams = [s.open_stream(sub["events"], greedy) for _ in range(3)]
        r = s.request("GET", sub["events"], token=greedy)
        self.assertEqual((r.status, r.error()[0]), (429, "TooManyStreams"))
        self.assertEqual(r.header("Retry-After"), "5")
        self.assertIn("close one first", r.error()[1])
        theirs = s.subscribe(other, kind="events", regex=r"^event\.saved\.")
        s.open_stream(theirs["events"], other)
        streams[0].close()
        name = greedy.partition(".")[0]
        self.assertEqual(len(s.api.streams_of[name]), 2)
        s.open_stream(sub["events"], greedy)
        for stream in streams[1:]:
            stream.close()

    def test_a_person_has_a_budget_of_compiled_regexes(self) -> None:
        s = People(self)
        for component in (s.user_notification, s.user_pub_sub):
            component.max_regex_program_per_person = 300
        greedy = s.person()
        s.subscribe(greedy, kind="events", regex=r"[a-z]{200}x")
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": r"[a-z]{200}y"}, token=greedy)
        self.assertEqual((r.status, r.error()[0]), (429, "OverBudget"), r)
        self.assertIn("RE2 instructions", r.error()[1])
        r = s.request("POST", "/api/subscriptions", {"kind": "datasets", "regex": r"[a-z]{200}y"}, token=greedy)
        self.assertEqual(r.status, 429)  # the budget covers both kinds
        s.subscribe(greedy, kind="events", regex=r"^event\.saved\.")
        s.subscribe(s.person(), kind="events", regex=r"[a-z]{200}x")

    def test_a_person_has_a_budget_of_queued_messages(self) -> None:
        s = People(self)
        for component in (s.user_notification, s.user_pub_sub):
            component.max_queued_per_person = 25
        greedy = s.person()
        s.subscribe(greedy, kind="events", regex="a", max_length=10)
        s.subscribe(greedy, kind="datasets", regex="b", max_length=10)
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": "c", "max_length": 10}, token=greedy)
        self.assertEqual((r.status, r.error()[0]), (429, "OverBudget"))
        self.assertIn("messages together", r.error()[1])
        s.subscribe(greedy, kind="events", regex="c", max_length=5)

    def test_a_person_has_a_most_subscriptions(self) -> None:
        s = People(self)
        self.patch(__import__("ooidx.people.component", fromlist=["x"]), "MAX_SUBSCRIPTIONS", 2)
        token = s.person()
        s.subscribe(token, kind="events", regex="a")
        s.subscribe(token, kind="events", regex="b")
        r = s.request("POST", "/api/subscriptions", {"kind": "events", "regex": "c"}, token=token)
        self.assertEqual((r.status, r.error()[0]), (400, "InvalidSubscription"))
        self.assertIn("the most allowed", r.error()[1])


# --------------------------------------------------------------------------- #
# the operator's tail


class TailTests(FastCase):
    def test_event_tail_over_sse(self) -> None:
        s = People(self)
        self.assertEqual(s.request("GET", "/api/events/stream").status, 401)
        r = s.request("GET", "/api/events/stream?regex=(%3F%3Dx)", token=TOKEN)
        self.assertEqual((r.status, r.error()[0]), (400, "InvalidRegex"))
        for query in ("recent=x", "recent=1001", "recent=-1", "regex=%ff"):
            self.assertEqual(s.request("GET", "/api/events/stream?" + query, token=TOKEN).status, 400, query)
        s.emit("registered", "old")
        s.edge.until(lambda: s.notification.ring)
        stream = s.open_stream("/api/events/stream?regex=%5Eevent%5C.(saved|registered)&recent=5", TOKEN)
        s.emit("fetched", "a")
        s.emit("saved", "b")
        got = stream.wait_for(2)
        self.assertEqual([e["data"]["topic"] for e in got], ["event.registered.old", "event.saved.b"])
        stream.close()
        self.assertEqual(s.api.streams, set())

    def test_the_tail_without_the_ring(self) -> None:
        s = People(self)
        s.edge.wait(s.notification.stopService())
        log = LogEvents(self)
        stream = s.open_stream("/api/events/stream?recent=3", TOKEN)
        s.settle(6)
        self.assertTrue(any("no recent events" in t for t in log.texts()))
        s.emit("saved", "b")
        self.assertEqual([e["data"]["topic"] for e in stream.wait_for(1)], ["event.saved.b"])

    def test_the_tail_that_cannot_subscribe_ends(self) -> None:
        s = People(self)
        self.patch(api_module.events, "subscribe", lambda *a: defer.fail(RuntimeError("no fanout")))
        connection = s.edge.open("GET", "/api/events/stream", token=TOKEN)
        s.edge.until(lambda: (connection.response() or _incomplete()).complete)
        self.assertEqual(s.api.streams, set())

    def test_events_arriving_during_the_replay_come_after_it_once(self) -> None:
        s = People(self)
        s.emit("saved", "old")
        s.edge.until(lambda: s.notification.ring)
        real_call = s.bus.call

        def call(address: str, op: str, **kwargs: Any) -> Any:
            if op == "recent":
                # an event goes live while the ring is being read: the ring has it too
                return defer.ensureDeferred(_emit_then_recent(s, real_call, address, op, kwargs))
            return real_call(address, op, **kwargs)

        self.patch(s.bus, "call", call)
        stream = s.open_stream("/api/events/stream?recent=5", TOKEN)
        s.settle()
        topics = [e["data"]["dataset"] for e in stream.events]
        self.assertEqual(topics, ["old", "during"])


async def _emit_then_recent(s: People, call: Any, address: str, op: str, kwargs: Any) -> Any:
    from ooidx import events

    await events.emit(s.bus, "saved", "during")
    await defer.ensureDeferred(_turns(s, 5))
    return await call(address, op, **kwargs)


async def _turns(s: People, n: int) -> None:
    from twisted.internet import task

    for _ in range(n):
        await task.deferLater(s.clock, 0.01, lambda: None)
