"""
Test fixtures shared by the whole suite.

- ``broker_url`` (session): the amqp:// URL of a real RabbitMQ, found or
  started once per run; see ``tests.rabbitmq.select_broker`` for the order.
  The suite never skips for want of a broker: it fails and says what to do.
- ``private_rabbitmq`` (function): a started private RabbitMQ node of this
  test's own, for tests that stop, kill or restart their broker. It is
  stopped and its directory removed afterwards.
- ``private_rabbitmq_factory`` (function): ``make(name=None, start=True)``
  makes more such nodes; all of them are removed afterwards.
"""

import os
import tempfile

import pytest

from tests.rabbitmq import (
    BrokerUnavailable,
    PrivateRabbitMQ,
    ensure_rabbitmq_server,
    redact,
    select_broker,
)

_broker_used = []


def _log(msg):
    # Shown even with output captured: the broker set-up is worth knowing.
    import sys
    sys.__stderr__.write("\n[ooidx tests] %s\n" % msg)
    sys.__stderr__.flush()


def _node_dir(prefix):
    # Short paths: Erlang and RabbitMQ dislike very long data directories.
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("OOIDX_TEST_TMP"))


@pytest.fixture(scope="session")
def broker_url():
    """The amqp:// URL of the RabbitMQ broker for this test run."""
    try:
        url, how, node = select_broker(
            lambda: _node_dir("ooidx-broker-"), log=_log)
        problem = None
    except BrokerUnavailable as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    _broker_used.append("%s (%s)" % (redact(url), how))
    try:
        yield url
    finally:
        if node is not None:
            node.remove()


@pytest.fixture
def private_rabbitmq_factory():
    """
    ``make(name=None, start=True)`` -> a PrivateRabbitMQ (started unless
    start=False). Every node made is stopped and deleted at teardown.
    """
    try:
        bindir = ensure_rabbitmq_server(log=_log)
        problem = None
    except BrokerUnavailable as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    nodes = []

    def make(name=None, start=True):
        node = PrivateRabbitMQ(
            name=name, tmpdir=_node_dir("ooidx-node-"), bindir=bindir)
        nodes.append(node)
        if start:
            try:
                node.start()
                problem = None
            except BrokerUnavailable as e:
                problem = str(e)
            if problem:
                pytest.fail(problem, pytrace=False)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.remove()


@pytest.fixture
def private_rabbitmq(private_rabbitmq_factory):
    """A started private RabbitMQ node (``.url``, ``.stop()``, ``.kill()``,
    ``.start()``, ``.restart()`` and their ``*_async`` variants)."""
    return private_rabbitmq_factory()


def pytest_terminal_summary(terminalreporter):
    for line in _broker_used:
        terminalreporter.write_line("RabbitMQ used by the tests: " + line)
