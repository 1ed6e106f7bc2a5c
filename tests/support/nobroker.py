"""C{OOIDX_TEST_BROKER=none}: every use of a RabbitMQ broker fails at once.

The fast tier (tests/fast) runs under it, so a test there that reaches for a
broker fails with this module's message instead of quietly using the machine's
RabbitMQ (or waiting for one that is not there). tests/conftest.py installs it
for pytest; tests/fast/__init__.py installs it for trial.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional

ENV = "OOIDX_TEST_BROKER"
NONE = "none"


class BrokerForbidden(AssertionError):
    """A test used a broker while C{OOIDX_TEST_BROKER=none} (an AssertionError,
    so the test fails rather than errs)."""


def forbidden(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when the environment says no broker may be used."""
    env = os.environ if env is None else env
    return env.get(ENV, "").strip().lower() == NONE


def refusal(what: str) -> str:
    return (f"{ENV}=none: this test needs {what}, and brokers are switched off "
            f"(the fast tier runs without one; unset {ENV} to run the broker tiers)")


def install() -> bool:
    """Under C{OOIDX_TEST_BROKER=none}, make magnet's AMQP transport refuse to
    be built; returns whether it did. Idempotent."""
    if not forbidden():
        return False
    from magnet import amqp

    init = amqp.AMQPTransport.__init__
    if getattr(init, "_ooidx_forbidden", False):
        return True

    @functools.wraps(init)
    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        # Only the real reactor reaches a broker: a transport built on a
        # Clock or a memory reactor (the fast tier's contract tests, with a
        # scripted fake broker) is no broker use.
        from twisted.internet import reactor as real_reactor

        if kwargs.get("reactor") is not real_reactor:
            return init(self, *args, **kwargs)
        raise BrokerForbidden(refusal("an AMQP connection (magnet.amqp.AMQPTransport)"))

    refuse._ooidx_forbidden = True  # type: ignore[attr-defined]
    amqp.AMQPTransport.__init__ = refuse  # type: ignore[method-assign]
    return True
