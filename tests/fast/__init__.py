"""The fast tier: unit tests that need no broker, no network port, no
subprocess and no sleep. Time is a L{twisted.internet.task.Clock}; the bus is
L{magnet.testing}. Every module here holds
L{twisted.trial.unittest.SynchronousTestCase} (or C{TestCase}) classes only,
so both runners run all of it:

    OOIDX_TEST_BROKER=none python -m twisted.trial tests.fast
    OOIDX_TEST_BROKER=none python -m pytest tests/fast

(C{scripts/test --fast} runs both.) Under C{OOIDX_TEST_BROKER=none} any
attempt to reach RabbitMQ fails at once (L{tests.support.nobroker}).
"""
from tests.support import nobroker

nobroker.install()
