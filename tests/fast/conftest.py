"""pytest's view of the fast tier: trial runs it too, so every test here must
be a twisted.trial (unittest) TestCase method, not a pytest function or a
pytest-twisted coroutine trial would never see."""
from __future__ import annotations

import pytest
from _pytest.unittest import TestCaseFunction


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not isinstance(item, TestCaseFunction):
        pytest.fail(f"{item.nodeid}: tests/fast holds twisted.trial TestCase classes only "
                    "(python -m twisted.trial tests.fast runs this tier too); "
                    "make it a method of a SynchronousTestCase", pytrace=False)
