"""Direct exchanges, queue and exchange-to-exchange bindings, and Bus.send_to
on the in-process broker, with RabbitMQ's semantics (the same on RabbitMQ:
tests/magnet/test_exchange_bindings.py)."""
from __future__ import annotations

from typing import Dict, List

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from magnet import Message, Unroutable
from magnet.memory import ChannelError
from magnet.testing import MemoryBroker


class ExchangeBindingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = MemoryBroker()
        self.addCleanup(self.broker.stop)
        self.bus = self.broker.bus()
        self.t = self.bus.transport
        self.inboxes: Dict[str, List[Message]] = {}
        self.successResultOf(self.bus.declare_direct("topics"))

    def queue(self, name: str) -> str:
        self.inboxes[name] = []
        self.successResultOf(self.bus.declare_address(name))
        self.bus.consume(name, self.inboxes[name].append)
        self.broker.flush()
        return name

    def fanout(self, name: str) -> str:
        self.successResultOf(self.t.declare_exchange(name, "fanout"))
        return name

    def send(self, key: str, body: bytes = b"x") -> object:
        d = self.bus.send_to("topics", key, Message(body=body, type="t", persistent=True))
        self.broker.flush()
        return d

    def counts(self) -> Dict[str, int]:
        return {name: len(box) for name, box in self.inboxes.items()}

    def test_through_an_exchange_bound_to_a_direct_exchange_every_queue_once(self) -> None:
        a, b = self.queue("q.a"), self.queue("q.b")
        x = self.fanout("x.t1")
        for q in (a, b):
            self.successResultOf(self.t.bind_queue(q, x, "", remember=False))
        self.successResultOf(self.t.bind_exchange(x, "topics", "t1", remember=False))
        self.successResultOf(self.t.bind_queue(a, "topics", "t1"))  # a reached twice: one copy
        self.successResultOf(self.send("t1"))
        self.assertEqual(self.counts(), {"q.a": 1, "q.b": 1})

    def test_a_key_bound_to_nothing_or_to_an_exchange_bound_to_nothing_is_returned(self) -> None:
        self.queue("q.a")
        self.failureResultOf(self.send("nobody"), Unroutable)
        x = self.fanout("x.empty")
        self.successResultOf(self.t.bind_exchange(x, "topics", "t2"))
        self.failureResultOf(self.send("t2"), Unroutable)
        self.assertEqual(self.counts(), {"q.a": 0})

    def test_unbinding_the_exchange_returns_the_next_publish_whole(self) -> None:
        a, b = self.queue("q.a"), self.queue("q.b")
        x = self.fanout("x.t")
        for q in (a, b):
            self.successResultOf(self.t.bind_queue(q, x))
        self.successResultOf(self.t.bind_exchange(x, "topics", "t"))
        self.successResultOf(self.t.unbind_exchange(x, "topics", "t"))
        self.failureResultOf(self.send("t"), Unroutable)
        self.assertEqual(self.counts(), {"q.a": 0, "q.b": 0})

    def test_deleting_an_exchange_removes_the_bindings_it_is_source_or_destination_of(self) -> None:
        a = self.queue("q.a")
        x = self.fanout("x.t")
        self.successResultOf(self.t.bind_queue(a, x))
        self.successResultOf(self.t.bind_exchange(x, "topics", "t"))
        self.successResultOf(self.t.delete_exchange(x))
        self.failureResultOf(self.send("t"), Unroutable)
        self.fanout("x.t")  # made again: nothing bound to it, nor it to topics
        self.failureResultOf(self.send("t"), Unroutable)
        self.assertEqual(self.t.broker.exchanges["x.t"][1], set())

    def test_unbind_of_what_is_not_bound_is_fine_binding_to_what_does_not_exist_not_found(self) -> None:
        # as RabbitMQ answers (tests/magnet/test_exchange_bindings.py checks it there)
        a = self.queue("q.a")
        x = self.fanout("x.t")
        self.successResultOf(self.t.unbind_queue(a, x, ""))
        self.successResultOf(self.t.unbind_exchange(x, "topics", "t"))
        self.successResultOf(self.t.unbind_queue("q.none", x, ""))
        self.successResultOf(self.t.unbind_queue(a, "x.none", ""))
        self.successResultOf(self.t.unbind_exchange("x.none", "topics", "t"))
        self.assertIn("NOT_FOUND", str(self.failureResultOf(self.t.bind_queue("q.none", x, ""), ChannelError).value))
        self.assertIn("NOT_FOUND", str(self.failureResultOf(self.t.bind_exchange("x.none", "topics", "t"),
                                                            ChannelError).value))
        self.assertIn("NOT_FOUND", str(self.failureResultOf(self.t.bind_exchange(x, "x.none", "t"),
                                                            ChannelError).value))

    def test_unbinding_a_queue(self) -> None:
        a, b = self.queue("q.a"), self.queue("q.b")
        for q in (a, b):
            self.successResultOf(self.t.bind_queue(q, "topics", "t"))
        self.successResultOf(self.t.unbind_queue(a, "topics", "t"))
        self.successResultOf(self.send("t"))
        self.assertEqual(self.counts(), {"q.a": 0, "q.b": 1})

    def test_a_cycle_of_exchanges_delivers_once(self) -> None:
        a = self.queue("q.a")
        x, y = self.fanout("x.1"), self.fanout("x.2")
        self.successResultOf(self.t.bind_exchange(x, "topics", "t"))
        self.successResultOf(self.t.bind_exchange(y, x))
        self.successResultOf(self.t.bind_exchange(x, y))
        self.successResultOf(self.t.bind_queue(a, y))
        self.successResultOf(self.send("t"))
        self.assertEqual(self.counts(), {"q.a": 1})

    def test_send_to_refuses_bad_input(self) -> None:
        msg = Message(body=b"x", type="t")
        self.failureResultOf(self.bus.send_to("", "k", msg), ValueError)
        self.failureResultOf(self.bus.send_to("topics", 5, msg), TypeError)  # type: ignore[arg-type]
        self.failureResultOf(self.bus.send_to("topics", "é" * 128, msg), ValueError)
        self.assertEqual(self.bus.kind_of("topics"), "direct")


class NotRememberedTests(SynchronousTestCase):
    """What is declared or bound with C{remember=False} is not replayed after a reconnect (AMQP transport)."""

    def test_not_in_the_topology(self) -> None:
        from twisted.internet.task import Clock
        from magnet.amqp.transport import AMQPTransport

        t = AMQPTransport("amqp://guest:guest@127.0.0.1:1/", reactor=Clock())
        t._operation = lambda what, f: succeed(None)  # type: ignore[method-assign]  # the broker said ok
        self.successResultOf(t.declare_exchange("kept", "fanout"))
        self.successResultOf(t.declare_exchange("not.kept", "fanout", remember=False))
        self.successResultOf(t.bind_queue("q", "kept", "k"))
        self.successResultOf(t.bind_queue("q", "not.kept", "k", remember=False))
        self.successResultOf(t.bind_exchange("kept", "topics", "a"))
        self.successResultOf(t.bind_exchange("not.kept", "topics", "b", remember=False))
        self.assertEqual(set(t._topology), {("exchange", "kept"), ("bind", "q", "kept", "k"),
                                            ("xbind", "kept", "topics", "a")})
        self.successResultOf(t.unbind_exchange("kept", "topics", "a"))
        self.successResultOf(t.unbind_queue("q", "kept", "k"))
        self.assertEqual(set(t._topology), {("exchange", "kept")})
        self.successResultOf(t.bind_exchange("kept", "topics", "a"))
        self.successResultOf(t.delete_exchange("kept"))
        self.assertEqual(set(t._topology), set())
