"""A refused login (403 ACCESS_REFUSED) is told apart from a network error:
those waiting for the link fail at once with LoginRefused (a NotConnected),
while the link itself goes on retrying (issue 18)."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp.connection import LoginRefused
from magnet.errors import NotConnected
from tests.fast.magnet.test_amqp_protocol_contract import method
from tests.fast.magnet.test_amqp_transport_contract import Harness


class LoginRefusedTests(SynchronousTestCase):
    def refuse(self, h: Harness) -> None:
        h.broker.hold.add("connection.open")
        h.pump()
        h.broker.feed(method(0, "connection.close", reply_code=403,
                             reply_text="ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"))

    def test_a_waiter_fails_at_once_without_the_password(self) -> None:
        h = Harness("amqp://bob:hunter2@broker/")
        h.transport.start()
        waiter = h.transport.when_connected(None)
        self.refuse(h)
        failure = self.failureResultOf(waiter, LoginRefused)
        self.assertIsInstance(failure.value, NotConnected)
        words = str(failure.value)
        self.assertIn("amqp://bob:***@broker:5672/%2F refused the login", words)
        self.assertIn("403 ACCESS_REFUSED", words)
        self.assertNotIn("hunter2", words)
        self.assertFalse(h.transport.connected)

    def test_a_network_error_leaves_the_waiters_waiting(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        h = Harness(script=[ConnectionRefusedError()])
        waiter = h.transport.when_connected(None)
        h.transport.start()  # the first attempt is refused by the network
        self.assertNoResult(waiter)
        self.assertFalse(h.brokers)
        h.clock.advance(1)  # backoff(1) = 1 s, then the second attempt gets through
        h.pump()
        self.successResultOf(waiter)
