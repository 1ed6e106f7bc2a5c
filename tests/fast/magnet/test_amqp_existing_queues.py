"""AMQPTransport.existing_queues without a broker: a passive queue.declare per
name on the declarations channel (answered here by hand), 404 meaning no such
queue, 405 (exclusive to another connection) meaning it exists, anything else
an error. What Bus.multicast's address book asks (magnet.multicast)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from txamqp.client import Closed

from magnet.amqp import AMQPTransport
from magnet.amqp.protocol import ChannelError

from tests.fast.magnet.test_amqp_liveness import FakeControlChannel, not_found
from tests.support.amqp_link import URL, link


def refused(code: int, text: str) -> Closed:
    return Closed(SimpleNamespace(fields=[code, text]))


class ExistingQueuesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = AMQPTransport(URL, reactor=self.clock, heartbeat=0)
        self.proto, _ = link(self.transport, self.clock)
        self.control = FakeControlChannel()
        self.drop_link: List[bool] = []
        self.transport._control_call = self._control_call  # type: ignore[method-assign]

    def _control_call(self, protocol: Any, call: Any, drop_link: bool = True) -> Deferred:
        self.drop_link.append(drop_link)
        return call(self.control)

    def answer(self, *outcomes: Any) -> None:
        for outcome in outcomes:
            queue, d = self.control.declares.pop(0)
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(SimpleNamespace(queue=queue, message_count=0, consumer_count=0))

    def test_each_name_once_missing_and_locked_told_apart(self) -> None:
        d = self.transport.existing_queues(["a", "gone", "a", "private", "b"])
        self.answer(None)
        self.answer(not_found("gone"))
        self.answer(refused(405, "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'private'"))
        self.answer(None)
        self.assertEqual(self.successResultOf(d), {"a", "private", "b"})
        self.assertEqual(self.control.declares, [])
        self.assertEqual(self.drop_link, [False] * 4)  # a broker that blocks publishers is no dead link

    def test_another_refusal_is_an_error(self) -> None:
        d = self.transport.existing_queues(["a", "b"])
        self.answer(refused(403, "ACCESS_REFUSED - access to queue 'a' refused"))
        failure = self.failureResultOf(d, ChannelError)
        self.assertEqual(failure.value.reply_code, 403)
        self.assertEqual(self.control.declares, [])  # it stops there
