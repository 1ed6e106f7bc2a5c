"""magnet.amqp.connection's contract on a Clock and a fake endpoint: connect,
back off after failed attempts (refused, a setup that never finishes, a
refused login), rotate through a cluster's URLs, reconnect at once after a
loss, bound every wait, tell the link listeners, stop.
"""
from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp.connection import Link
from magnet.errors import BadURL, NotConnected
from tests.fast.magnet.test_amqp_protocol_contract import method
from tests.fast.magnet.test_amqp_transport_contract import Harness


class BackoffTests(SynchronousTestCase):
    def test_refused_attempts_back_off_then_connect(self) -> None:
        h = Harness(script=[ConnectionRefusedError(), ConnectionRefusedError()])
        h.transport.start()
        self.assertEqual(h.attempts, ["broker"])
        self.assertIn("Connection was refused", h.transport.last_error or "")
        h.clock.advance(1)  # backoff(1)
        self.assertEqual(len(h.attempts), 2)
        h.clock.advance(1.9)  # backoff(2) = 2
        self.assertEqual(len(h.attempts), 2)
        h.clock.advance(0.1)
        h.pump()
        self.assertTrue(h.transport.connected)
        self.assertIsNone(h.transport.last_error)
        self.assertEqual(h.transport._failures, 0)
        self.assertEqual(h.links, [True])

    def test_the_default_backoff_grows_to_a_bound(self) -> None:
        h = Harness(backoff=None)
        delays = [h.transport.backoff(n) for n in range(1, 30)]
        self.assertLess(delays[0], 2)
        self.assertLessEqual(max(delays), 30.0 * 1.1)

    def test_a_setup_that_never_finishes_times_out_and_is_retried(self) -> None:
        h = Harness(script=[{"handshake": False}], connect_timeout=10, operation_timeout=5)
        h.transport.start()
        h.pump()
        h.clock.advance(14.9)
        self.assertEqual(len(h.attempts), 1)
        h.clock.advance(0.1)
        h.pump()
        self.assertTrue(h.brokers[0].protocol.lost)
        self.assertIn("did not complete within 15.0 s", h.transport.last_error or "")
        h.clock.advance(1)
        h.pump()
        self.assertTrue(h.transport.connected)

    def test_a_refused_login_is_an_attempt_failed_without_the_password(self) -> None:
        h = Harness("amqp://bob:hunter2@broker/")
        h.transport.start()
        h.broker.hold.add("connection.open")
        h.pump()
        h.broker.feed(method(0, "connection.close", reply_code=403,
                             reply_text="ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"))
        self.assertEqual(h.transport.last_error,
                         "AMQP handshake failed: 403 ACCESS_REFUSED - Login was refused using authentication "
                         "mechanism PLAIN")
        self.assertFalse(h.transport.connected)
        waiter = h.transport.when_connected(timeout=0.5)
        h.clock.advance(0.5)
        words = str(self.failureResultOf(waiter, NotConnected).value)
        self.assertIn("amqp://bob:***@broker:5672/%2F", words)
        self.assertNotIn("hunter2", words)
        self.assertIn("last attempt: AMQP handshake failed: 403", words)

    def test_the_urls_mechanism_is_used(self) -> None:
        h = Harness("amqp://broker/?auth_mechanism=amqplain", auth_mechanism="plain")
        h.up()
        self.assertEqual(h.sent("connection.start-ok")[0]["mechanism"], "AMQPLAIN")
        self.assertEqual(h.transport.auth_mechanism, "PLAIN")

    def test_the_urls_heartbeat_wins(self) -> None:
        h = Harness("amqp://broker/?heartbeat=4", heartbeat=30)
        h.up()
        self.assertEqual(h.sent("connection.tune-ok")[0]["heartbeat"], 4)


class ClusterTests(SynchronousTestCase):
    def test_each_attempt_tries_the_next_url(self) -> None:
        h = Harness(["amqp://a/", "amqp://b/", "amqp://c/"],
                    script=[ConnectionRefusedError(), ConnectionRefusedError()])
        h.transport.start()
        h.clock.advance(1)
        h.clock.advance(2)
        h.pump()
        self.assertEqual(h.attempts, ["a", "b", "c"])
        self.assertTrue(h.transport.connected)
        self.assertEqual(h.transport._protocol.url.host, "c")
        h.broker.drop()
        h.clock.advance(0)  # a loss: at once, to the next one
        h.pump()
        self.assertEqual(h.attempts, ["a", "b", "c", "a"])
        self.assertTrue(h.transport.connected)
        self.assertEqual(h.links, [True, False, True])

    def test_an_operation_waits_for_the_cluster(self) -> None:
        h = Harness(["amqp://a/", "amqp://b/"], script=[ConnectionRefusedError()])
        h.transport.start()
        d = h.transport.declare_queue("q")
        h.clock.advance(1)
        h.pump()
        self.successResultOf(d)
        self.assertEqual(h.attempts, ["a", "b"])


class WaitingTests(SynchronousTestCase):
    def test_when_connected_is_bounded(self) -> None:
        h = Harness(script=["hang"])
        h.transport.start()
        waiter = h.transport.when_connected(timeout=3)
        h.clock.advance(3)
        failure = self.failureResultOf(waiter, NotConnected)
        self.assertIn("no link to the broker (amqp://guest:***@broker:5672/%2F) within 3.0 s", str(failure.value))
        self.assertEqual(h.transport._waiters, [])

    def test_a_cancelled_waiter_is_forgotten(self) -> None:
        h = Harness(script=["hang"])
        h.transport.start()
        waiter = h.transport.when_connected()
        waiter.cancel()
        self.failureResultOf(waiter)
        self.assertEqual(h.transport._waiters, [])

    def test_waiters_fire_when_the_link_comes_up(self) -> None:
        h = Harness()
        waiter = h.transport.when_connected(timeout=10)
        h.up()
        self.successResultOf(waiter)

    def test_an_operation_without_a_link_in_time(self) -> None:
        h = Harness(script=[ConnectionRefusedError()] * 10)
        h.transport.start()
        d = h.transport.declare_queue("q")
        h.clock.advance(5)
        failure = self.failureResultOf(d, NotConnected)
        self.assertIn("within 5.0 s", str(failure.value))
        self.assertIn("last attempt:", str(failure.value))

    def test_a_listener_that_raises_is_logged_and_the_others_still_hear(self) -> None:
        h = Harness()

        def bad(up: bool) -> None:
            raise RuntimeError("listener bug")

        h.transport._listeners.insert(0, bad)
        h.up()
        self.assertEqual(h.links, [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LifecycleTests(SynchronousTestCase):
    def test_no_url_is_badurl(self) -> None:
        self.assertRaises(BadURL, Harness, [])

    def test_start_twice_makes_one_attempt(self) -> None:
        h = Harness(script=["hang"])
        h.transport.start()
        h.transport.start()
        self.assertEqual(h.attempts, ["broker"])

    def test_stop_during_the_backoff_stops_retrying(self) -> None:
        h = Harness(script=[ConnectionRefusedError()])
        h.transport.start()
        self.successResultOf(h.transport.stop())
        h.clock.advance(100)
        self.assertEqual(h.attempts, ["broker"])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.failureResultOf(h.transport.declare_queue("q"), NotConnected)

    def test_started_again_after_a_stop(self) -> None:
        h = Harness()
        h.up()
        d = h.transport.stop()
        h.pump()
        self.successResultOf(d)
        h.transport.start()
        h.pump()
        self.assertTrue(h.transport.connected)
        self.assertEqual(len(h.brokers), 2)

    def test_no_reconnect_after_a_loss_while_stopping(self) -> None:
        h = Harness()
        broker = h.up()
        broker.hold.add("connection.close")
        d = h.transport.stop()
        broker.pump()
        broker.drop()
        self.successResultOf(d)
        h.clock.advance(10)
        self.assertEqual(len(h.attempts), 1)

    def test_the_transports_hooks_are_abstract_in_link(self) -> None:
        link = Link("amqp://h/", reactor=Clock(), heartbeat=0, operation_timeout=1, backoff=None,
                    connect_timeout=1, close_timeout=1, auth_mechanism="plain", tls_options=None)
        self.assertRaises(NotImplementedError, link._link_ready, None)
        self.assertRaises(NotImplementedError, link._link_lost, None, True)

    def test_the_link_is_up_only_once_confirm_select_is_answered(self) -> None:
        h = Harness()
        h.transport.start()
        broker = h.broker
        broker.hold.add("confirm.select")
        broker.pump()
        [(channel, name, fields)] = broker.held
        self.assertFalse(h.transport.connected)
        broker.protocol.dataReceived(broker.answer(channel, name, fields))
        self.assertTrue(h.transport.connected)

    def test_a_setup_timeout_is_a_timeout(self) -> None:
        h = Harness(script=[{"handshake": False}], connect_timeout=1, operation_timeout=1)
        h.transport.start()
        h.clock.advance(2)
        h.pump()
        self.assertIn("did not complete within 2.0 s", h.transport.last_error or "")


class BrokerClosesTheConnectionTests(SynchronousTestCase):
    """A node that pauses (RabbitMQ's pause_minority in a partition) or stops
    closes its clients' connections with connection.close 320
    CONNECTION_FORCED. txAMQP fails every waiting method with Closed before it
    marks the connection closed: an operation waiting then is the link's loss,
    tried again on the next node, not a channel error for the caller."""

    def _forced_close(self, h: Harness) -> None:
        h.broker.feed(method(0, "connection.close", reply_code=320,
                             reply_text="CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"))

    def test_an_operation_waiting_when_the_broker_closes_the_connection_goes_to_the_next_node(self) -> None:
        h = Harness(["amqp://a/", "amqp://b/"])
        first = h.up()
        first.hold.add("queue.declare")
        d = h.transport.declare_queue("q")
        h.pump()
        self.assertNoResult(d)
        self._forced_close(h)
        self.assertNoResult(d)  # not ChannelError(320)
        h.clock.advance(0.1)
        h.pump()
        self.successResultOf(d)
        self.assertEqual(h.attempts, ["a", "b"])
        self.assertIn("queue.declare", h.broker.names())
        self.assertIsNot(h.broker, first)

    def test_a_replay_step_cut_by_a_forced_close_is_not_logged_as_a_refusal(self) -> None:
        h = Harness(["amqp://a/", "amqp://b/"])
        h.up()
        self.successResultOf(self._declared(h))
        h.broker.drop()
        h.clock.advance(0)  # at once to b, whose replay of the queue is held...
        h.brokers[-1].hold.add("queue.declare")
        h.pump()
        self.assertFalse(h.transport.connected)
        refusals: list = []
        from twisted.logger import globalLogPublisher
        observer = lambda event: refusals.append(event) if "refused the" in event.get("log_format", "") else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self._forced_close(h)  # ...and b closes the connection meanwhile
        self.assertEqual(refusals, [])
        self.assertFalse(h.transport.connected)

    def _declared(self, h: Harness) -> object:
        d = h.transport.declare_queue("q")
        h.pump()
        return d
