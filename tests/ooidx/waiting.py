"""The component tests' waits: tests.support.waiting (one implementation for the suite)."""
from tests.support.waiting import TIMEOUT, eventually, sleep, until, wait

__all__ = ["TIMEOUT", "eventually", "sleep", "until", "wait"]
