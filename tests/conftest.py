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
- ``vhost`` (function): the amqp:// URL of a virtual host of this test's own
  on the run's broker (tests.support.vhost), deleted afterwards; a private
  node where rabbitmqctl cannot manage the broker.

``OOIDX_TEST_BROKER=none`` switches brokers off (tests.support.nobroker):
every fixture above fails at once, saying so, and magnet's AMQP transport
refuses to be built. The fast tier (tests/fast) runs under it.

Tiers, as markers: ``fast`` (everything under tests/fast, added here),
``rabbitmq`` (every test that asks for a broker fixture, added here), ``slow``.
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
from tests.support import nobroker
from tests.support.vhost import own_vhost

_BROKER_FIXTURES = ("broker_url", "private_rabbitmq", "private_rabbitmq_factory", "vhost")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fast: the fast tier (tests/fast): no broker, no port, no subprocess, no sleep")
    if nobroker.install():
        _log("OOIDX_TEST_BROKER=none: brokers are switched off; a test that needs one fails at once")


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "/tests/fast/" in path:
            item.add_marker(pytest.mark.fast)
        elif any(name in _BROKER_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.rabbitmq)


def _no_broker(what):
    if nobroker.forbidden():
        pytest.fail(nobroker.refusal(what), pytrace=False)

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
    _no_broker("a RabbitMQ broker (the broker_url fixture)")
    try:
        url, how, node = select_broker(
            lambda: _node_dir("ooidx-broker-"), log=_log)
        problem = None
    except BrokerUnavailable as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    vhost = _session_vhost(url) if node is None else None
    if vhost is not None:
        url = vhost[0]
        how += ", in a virtual host of this run's own"
    _broker_used.append("%s (%s)" % (redact(url), how))
    try:
        yield url
    finally:
        if vhost is not None:
            vhost[1]()
        if node is not None:
            node.remove()


def _session_vhost(url):
    """On the machine's shared broker, a virtual host for this run, deleted at
    its end: whatever a test leaves behind (durable queues, messages for a
    component nobody ran) cannot reach another test run. Returns
    ``(url, delete)``, or None where rabbitmqctl cannot manage the broker
    (a remote OOIDX_TEST_BROKER): then the URL is used as it is."""
    return own_vhost(url, "run")


@pytest.fixture
def vhost(request):
    """The amqp:// URL of a virtual host of this test's own (component queues
    have fixed names: nothing else consumes them there), deleted afterwards;
    a private node where rabbitmqctl cannot manage the run's broker."""
    base = request.getfixturevalue("broker_url")
    made = own_vhost(base, "test")
    if made is None:
        yield request.getfixturevalue("private_rabbitmq").url
        return
    url, delete = made
    try:
        yield url
    finally:
        delete()


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
