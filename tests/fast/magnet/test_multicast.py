"""Bus.multicast on the in-process broker: one publish (BCC) to a set of
addresses, copies to those that exist, the missing ones reported, the
address book's rechecks, long lists split, bad input refused. The same on
RabbitMQ is tests/magnet/test_multicast.py."""
from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from magnet import ConnectionLost, Message, MulticastError, MulticastResult, NotConnected, Unroutable
from magnet import multicast as mc
from magnet.testing import MemoryBroker
from magnet.transport import BCC_HEADER, CC_HEADER, DEFAULT_EXCHANGE


class MulticastTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = MemoryBroker()
        self.addCleanup(self.broker.stop)
        self.bus = self.broker.bus(address_recheck=10.0)
        self.subscriber = self.broker.bus()  # makes the addresses, as another node would
        self.inboxes: Dict[str, List[Message]] = {}

    def address(self, name: str) -> str:
        box: List[Message] = []
        self.inboxes[name] = box
        self.successResultOf(self.subscriber.declare_address(name))
        self.broker.flush()
        return name

    def consume(self, name: str) -> None:
        self.bus.consume(name, self.inboxes[name].append)
        self.broker.flush()

    def multicast(self, addresses: Any, message: Message = Message(body=b"hi", type="t")) -> Any:
        d = self.bus.multicast(addresses, message)
        self.broker.flush()
        return d

    def test_one_copy_each_without_the_list(self) -> None:
        names = [self.address(f"mc.{i}") for i in range(5)]
        for n in names:
            self.consume(n)
        result = self.successResultOf(self.multicast(names, Message(body=b"x", type="t", headers={"k": "v"})))
        self.assertEqual(result, MulticastResult(delivered=tuple(names), unroutable=()))
        for n in names:
            [got] = self.inboxes[n]
            self.assertEqual((got.body, got.type, dict(got.headers)), (b"x", "t", {"k": "v"}))  # no BCC

    def test_one_publish_for_ten_addresses(self) -> None:
        names = [self.address(f"mc.{i}") for i in range(10)]
        published: List[Any] = []
        real = self.bus.transport.publish
        self.bus.transport.publish = lambda *a, **k: published.append((a, k)) or real(*a, **k)
        self.successResultOf(self.multicast(names))
        self.assertEqual(len(published), 1)
        (exchange, key, message), options = published[0]
        self.assertEqual((exchange, key, list(message.headers[BCC_HEADER]), options["mandatory"]),
                         (DEFAULT_EXCHANGE, names[0], names[1:], True))
        for n in names:
            self.assertEqual(len(self.broker.ready(n)), 1)

    def test_missing_addresses_are_reported_and_the_others_get_theirs(self) -> None:
        a, b = self.address("mc.a"), self.address("mc.b")
        result = self.successResultOf(self.multicast(["mc.gone", a, "mc.never", b]))
        self.assertEqual(result.delivered, (a, b))
        self.assertEqual(result.unroutable, ("mc.gone", "mc.never"))
        self.assertEqual((len(self.broker.ready(a)), len(self.broker.ready(b))), (1, 1))

    def test_all_missing_is_a_result_not_an_error(self) -> None:
        result = self.successResultOf(self.multicast(["mc.x", "mc.y"]))
        self.assertEqual(result, MulticastResult(delivered=(), unroutable=("mc.x", "mc.y")))

    def test_a_queue_deleted_between_publishes_is_reported_after_its_recheck(self) -> None:
        names = [self.address(f"mc.{i}") for i in range(4)]
        self.successResultOf(self.multicast(names))
        self.successResultOf(self.broker.bus().transport.delete_queue("mc.2"))  # an operator, elsewhere
        # within the recheck interval the address book still believes in it: the
        # broker drops that copy (it would have died with the queue anyway)
        first = self.successResultOf(self.multicast(names))
        self.assertEqual(first.unroutable, ())
        self.broker.advance(10.0)
        second = self.successResultOf(self.multicast(names))
        self.assertEqual(second.unroutable, ("mc.2",))
        self.assertEqual(second.delivered, ("mc.0", "mc.1", "mc.3"))
        for n in ("mc.0", "mc.1", "mc.3"):
            self.assertEqual(len(self.broker.ready(n)), 3)

    def test_a_returned_publish_marks_its_addresses_missing_at_once(self) -> None:
        names = [self.address("mc.a"), self.address("mc.b")]
        self.successResultOf(self.multicast(names))
        other = self.broker.bus()
        for n in names:
            self.successResultOf(other.transport.delete_queue(n))
        result = self.successResultOf(self.multicast(names))  # one publish, returned
        self.assertEqual(result.unroutable, tuple(names))
        checks = self.bus.addresses.checks
        self.successResultOf(self.multicast(names))  # known missing: no publish, no new check
        self.assertEqual(self.bus.addresses.checks, checks)

    def test_an_address_made_later_is_found_after_forget_or_recheck(self) -> None:
        self.assertEqual(self.successResultOf(self.multicast(["mc.late"])).unroutable, ("mc.late",))
        self.successResultOf(self.broker.bus().declare_address("mc.late"))  # another node subscribes it
        self.assertEqual(self.successResultOf(self.multicast(["mc.late"])).unroutable, ("mc.late",))
        self.bus.forget_addresses(["mc.late"])
        self.assertEqual(self.successResultOf(self.multicast(["mc.late"])).delivered, ("mc.late",))
        # and one declared through this bus is known at once
        self.successResultOf(self.bus.declare_address("mc.mine"))
        checks = self.bus.addresses.checks
        self.assertEqual(self.successResultOf(self.multicast(["mc.mine"])).delivered, ("mc.mine",))
        self.assertEqual(self.bus.addresses.checks, checks)

    def test_checks_are_cached_and_shared(self) -> None:
        names = [self.address(f"mc.{i}") for i in range(3)]
        calls: List[List[str]] = []
        pending: List[Deferred] = []

        def slow(wanted: Any) -> Deferred:
            calls.append(list(wanted))
            d: Deferred = Deferred()
            pending.append(d)
            return d

        self.bus.transport.existing_queues = slow
        d1 = self.bus.multicast(names, Message(body=b"1"))
        d2 = self.bus.multicast(names[:2] + ["mc.other"], Message(body=b"2"))
        self.assertEqual(calls, [names, ["mc.other"]])
        pending[0].callback(set(names))
        pending[1].callback(set())
        self.broker.flush()
        self.assertEqual(self.successResultOf(d1).delivered, tuple(names))
        self.assertEqual(self.successResultOf(d2).unroutable, ("mc.other",))
        self.successResultOf(self.multicast(names))
        self.assertEqual(len(calls), 2)  # answered from the book

    def test_the_book_starting_over_during_a_check_loses_no_address(self) -> None:
        names = [self.address(f"mc.{i}") for i in range(4)]
        self.successResultOf(self.multicast(names[:3]))  # three known
        self.patch(mc, "MAX_REMEMBERED", 2)  # the next mark starts the book over
        result = self.successResultOf(self.multicast(names))  # mc.3 checked now
        self.assertEqual(result.delivered, tuple(names))
        self.assertEqual(result.unroutable, ())

    def test_a_failed_check_fails_the_multicast_and_every_waiter(self) -> None:
        names = [self.address("mc.a")]
        pending: List[Deferred] = []
        self.bus.transport.existing_queues = lambda wanted: pending.append(Deferred()) or pending[-1]
        d1, d2 = self.bus.multicast(names, Message(body=b"1")), self.bus.multicast(names, Message(body=b"2"))
        pending[0].errback(NotConnected("no link"))
        self.failureResultOf(d1, NotConnected)
        self.failureResultOf(d2, NotConnected)
        self.assertEqual(len(pending), 1)
        self.assertNotIn("mc.a", self.bus.addresses.seen)

    def test_a_long_list_goes_as_several_publishes(self) -> None:
        names = [self.address(f"mc.{i:04d}") for i in range(1200)]
        published: List[Any] = []
        real = self.bus.transport.publish
        self.bus.transport.publish = lambda *a, **k: published.append(a) or real(*a, **k)
        result = self.successResultOf(self.multicast(names))
        self.assertEqual(len(result.delivered), 1200)
        self.assertEqual([1 + len(m.headers.get(BCC_HEADER, ())) for _, _, m in published], [500, 500, 200])
        self.assertEqual(sum(len(self.broker.ready(n)) for n in names), 1200)

    def test_long_addresses_split_by_header_bytes(self) -> None:
        names = [("x" * 240) + f"{i:04d}" for i in range(300)]  # 300 x 249 bytes > 32 KiB
        groups = mc.chunks(names)
        self.assertGreater(len(groups), 1)
        for group in groups:
            self.assertLessEqual(sum(len(n) + 5 for n in group), mc.MAX_HEADER_BYTES)
        self.assertEqual([n for g in groups for n in g], names)

    def test_an_unconfirmed_publish_names_its_addresses(self) -> None:
        names = [self.address(f"mc.{i}") for i in range(3)]
        self.successResultOf(self.multicast(names))  # the book knows them now
        real = self.bus.transport.publish
        calls = []

        def lost_second(exchange: str, key: str, message: Message, **kw: Any) -> Deferred:
            calls.append(key)
            if len(calls) == 2:
                return fail(ConnectionLost("link lost before the confirm"))
            return real(exchange, key, message, **kw)

        self.bus.transport.publish = lost_second
        self.patch(mc, "MAX_PER_PUBLISH", 2)
        self.patch(mc.chunks, "__defaults__", (2, mc.MAX_HEADER_BYTES))
        f = self.failureResultOf(self.multicast(names), MulticastError)
        self.assertEqual(list(f.value.failed), ["mc.2"])
        self.assertIn("ConnectionLost", f.value.failed["mc.2"])
        self.assertEqual(f.value.result.delivered, ("mc.0", "mc.1"))

    def test_a_timeout_fails_with_the_addresses(self) -> None:
        names = [self.address("mc.a"), self.address("mc.b")]
        self.successResultOf(self.multicast(names))
        self.bus.transport.publish = lambda *a, **k: Deferred()  # never confirmed
        d = self.bus.multicast(names, Message(body=b"x"), timeout=2.0)
        self.broker.advance(2.0)
        f = self.failureResultOf(d, MulticastError)
        self.assertEqual(sorted(f.value.failed), names)
        self.assertIn("Timeout", f.value.failed["mc.a"])

    def test_bad_input_is_refused_clearly(self) -> None:
        a = self.address("mc.a")
        self.successResultOf(self.bus.declare_fanout("a.fanout"))
        cases = [
            ([], ValueError, "at least one"),
            ("mc.a", TypeError, "sequence of strings"),
            (None, TypeError, "sequence of strings"),
            ([a, 5], TypeError, "must be a string"),
            ([a, b"mc.b"], TypeError, "must be a string"),
            ([a, ""], ValueError, "1 to 255"),
            ([a, "x" * 256], ValueError, "1 to 255"),
            ([a, "mc.b", a], ValueError, "listed twice"),
            ([f"mc.{i}" for i in range(mc.MAX_ADDRESSES + 1)], ValueError, "at most"),
            (["a.fanout"], ValueError, "not fanouts"),
        ]
        for addresses, error, text in cases:
            f = self.failureResultOf(self.bus.multicast(addresses, Message(body=b"x")), error)
            self.assertIn(text, str(f.value), addresses if not isinstance(addresses, list) else addresses[:3])
        for header in (BCC_HEADER, CC_HEADER):
            f = self.failureResultOf(self.bus.multicast([a], Message(body=b"x", headers={header: ["q"]})), ValueError)
            self.assertIn(header, str(f.value))
        self.failureResultOf(self.bus.multicast([a], b"not a message"), TypeError)  # type: ignore[arg-type]
        self.assertEqual(self.broker.ready(a), [])


class MemoryBrokerSenderSelected(SynchronousTestCase):
    """The in-process broker routes CC and BCC as RabbitMQ does."""

    def setUp(self) -> None:
        self.broker = MemoryBroker()
        self.addCleanup(self.broker.stop)
        self.bus = self.broker.bus()
        for q in ("q1", "q2", "q3"):
            self.successResultOf(self.bus.transport.declare_queue(q))

    def publish(self, key: str, headers: Dict[str, Any]) -> Deferred:
        d = self.bus.transport.publish(DEFAULT_EXCHANGE, key, Message(body=b"m", headers=headers), mandatory=True)
        self.broker.flush()
        return d

    def test_cc_is_kept_bcc_removed(self) -> None:
        self.successResultOf(self.publish("q1", {CC_HEADER: ["q2"], BCC_HEADER: ["q3", "missing"]}))
        self.assertEqual(dict(self.broker.ready("q1")[0].headers), {CC_HEADER: ["q2"]})
        self.assertEqual(dict(self.broker.ready("q2")[0].headers), {CC_HEADER: ["q2"]})
        self.assertEqual(dict(self.broker.ready("q3")[0].headers), {CC_HEADER: ["q2"]})

    def test_one_copy_per_queue_however_often_named(self) -> None:
        self.successResultOf(self.publish("q1", {BCC_HEADER: ["q1", "q1", "q2"]}))
        self.assertEqual((len(self.broker.ready("q1")), len(self.broker.ready("q2"))), (1, 1))

    def test_returned_only_when_no_queue_took_it(self) -> None:
        self.successResultOf(self.publish("missing", {BCC_HEADER: ["q2"]}))
        self.assertEqual(len(self.broker.ready("q2")), 1)
        self.failureResultOf(self.publish("missing", {BCC_HEADER: ["missing2"]}), Unroutable)

    def test_a_header_that_is_not_an_array_is_refused(self) -> None:
        self.failureResultOf(self.publish("q1", {BCC_HEADER: "q2"}))
        self.assertEqual(self.broker.ready("q2"), [])

    def test_existing_queues(self) -> None:
        self.assertEqual(self.successResultOf(self.bus.transport.existing_queues(["q1", "nope", "q3"])),
                         {"q1", "q3"})
