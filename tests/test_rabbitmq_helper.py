"""
Tests of the private RabbitMQ helper (tests/rabbitmq.py) and the broker
fixtures. The TestCase classes run under pytest and trial alike.
"""

import shutil
import socket
import tempfile
import threading
import time
import unittest

from tests.rabbitmq import (
    BrokerUnavailable,
    PrivateRabbitMQ,
    amqp_answers,
    ensure_rabbitmq_server,
    free_port,
    pid_alive,
    redact,
    url_host_port,
)


class AMQPAnswersTests(unittest.TestCase):
    def test_closed_port(self):
        self.assertFalse(amqp_answers("127.0.0.1", free_port(), timeout=1))

    def test_not_amqp(self):
        """A TCP server that is not an AMQP broker does not count."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def serve():
            conn, _ = server.accept()
            conn.recv(8)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            self.assertFalse(amqp_answers("127.0.0.1", port, timeout=2))
        finally:
            t.join(5)
            server.close()

    def test_url_helpers(self):
        self.assertEqual(url_host_port("amqp://u:p@h:1234/v"), ("h", 1234))
        self.assertEqual(url_host_port("amqp://h/"), ("h", 5672))
        self.assertEqual(url_host_port("amqps://h/"), ("h", 5671))
        self.assertEqual(redact("amqp://u:secret@h:1/v"), "amqp://u:***@h:1/v")
        self.assertEqual(redact("amqp://h/"), "amqp://h/")


class PrivateRabbitMQTests(unittest.TestCase):
    """Start, kill -9, start again and stop a private node."""

    def setUp(self):
        try:
            bindir = ensure_rabbitmq_server()
        except BrokerUnavailable as e:
            self.fail(str(e))
        self.tmpdir = tempfile.mkdtemp(prefix="ooidx-helper-")
        self.addCleanup(shutil.rmtree, self.tmpdir, True)
        self.node = PrivateRabbitMQ(tmpdir=self.tmpdir, bindir=bindir)
        self.addCleanup(self.node.stop)

    def test_lifecycle(self):
        node = self.node
        shared_before = amqp_answers("127.0.0.1", 5672)
        self.assertNotEqual(node.port, 5672)
        self.assertTrue(node.nodename.startswith("magnet-test-"))
        self.assertTrue(node.nodename.endswith("@localhost"))
        self.assertFalse(node.answers())

        t0 = time.monotonic()
        node.start()
        first_start = time.monotonic() - t0
        self.assertTrue(node.answers())
        self.assertTrue(amqp_answers("127.0.0.1", node.port))
        # loopback only: bound to 127.0.0.1, not to every address
        self.assertFalse(amqp_answers("127.0.0.2", node.port, timeout=1))
        pid = node.beam_pid()
        self.assertIsNotNone(pid)
        self.assertTrue(pid_alive(pid))

        # rabbitmqctl reaches it (own cookie, own node name)
        status = node.ctl("status")
        self.assertEqual(status.returncode, 0, status.stdout[-2000:])
        self.assertIn(str(node.port).encode(), status.stdout)

        node.kill()
        self.assertFalse(node.running)
        self.assertFalse(node.answers())
        self.assertFalse(pid_alive(pid))

        t0 = time.monotonic()
        node.start()
        second_start = time.monotonic() - t0
        self.assertTrue(node.answers())

        node.stop()
        self.assertFalse(node.running)
        self.assertFalse(node.answers())
        # The shared node was left alone.
        self.assertEqual(amqp_answers("127.0.0.1", 5672), shared_before)
        print("private node start: %.1f s, after kill -9: %.1f s"
              % (first_start, second_start))


def test_broker_url_answers(broker_url):
    host, port = url_host_port(broker_url)
    assert broker_url.startswith(("amqp://", "amqps://"))
    if broker_url.startswith("amqp://"):
        assert amqp_answers(host, port)


def test_private_rabbitmq_fixture(private_rabbitmq):
    node = private_rabbitmq
    assert node.running
    assert node.answers()
    assert node.url == "amqp://guest:guest@127.0.0.1:%d/" % node.port
    node.restart(kill=True)
    assert node.answers()
