"""The open-files limit a node raises itself to, and the warning when it is
low (ooidx.node.limits): every client connection is an open file, and a
node at its limit accepts a new client and closes it at once."""
from __future__ import annotations

import resource
from typing import Any, List, Tuple

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from ooidx.node.daemon import Daemon
from ooidx.node.limits import LOW_FILES, RESERVED_FILES, WANTED_FILES, OpenFiles, raise_open_files

from tests.fast.core.support import FastCase, LogEvents, drive, threadless
from tests.fast.node.test_daemon import memory_config, until


class Limits:
    """getrlimit / setrlimit on a pretend process."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set: List[Tuple[int, int]] = []

    def get(self, which: int) -> Tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def put(self, which: int, limits: Tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.set.append(limits)
        self.soft, self.hard = limits


class RaiseOpenFilesTests(SynchronousTestCase):
    def test_the_soft_limit_is_raised_to_the_hard_one(self) -> None:
        limits = Limits(1024, 4096 * 4)
        files = raise_open_files(limits.get, limits.put)
        self.assertEqual(limits.set, [(16384, 16384)])
        self.assertEqual((files.before, files.after, files.hard), (1024, 16384, 16384))
        self.assertIsNone(files.warning())
        self.assertIn("raised from 1024", files.note())
        self.assertIn(f"about {16384 - RESERVED_FILES} HTTP connections", files.note())

    def test_at_most_to_the_wanted_number(self) -> None:
        for hard in (WANTED_FILES * 16, resource.RLIM_INFINITY):
            limits = Limits(1024, hard)
            files = raise_open_files(limits.get, limits.put)
            self.assertEqual(limits.set, [(WANTED_FILES, hard)])
            self.assertEqual(files.after, WANTED_FILES)

    def test_a_higher_soft_limit_is_never_lowered(self) -> None:
        for soft in (WANTED_FILES * 2, resource.RLIM_INFINITY):
            limits = Limits(soft, resource.RLIM_INFINITY)
            files = raise_open_files(limits.get, limits.put)
            self.assertEqual(limits.set, [])
            self.assertIsNone(files.warning())
            self.assertNotIn("raised", files.note())

    def test_a_low_hard_limit_is_warned_about(self) -> None:
        limits = Limits(256, 256)
        files = raise_open_files(limits.get, limits.put)
        self.assertEqual(limits.set, [])
        warning = files.warning()
        assert warning is not None
        self.assertIn("open files limited to 256 (hard limit 256)", warning)
        self.assertIn(f"about {256 - RESERVED_FILES} connections", warning)
        self.assertIn(f"at least {LOW_FILES} (ulimit -n", warning)
        self.assertNotIn("\n", warning)

    def test_a_refused_raise_is_warned_about_with_the_reason(self) -> None:
        limits = Limits(512, 65536, refuse=True)
        files = raise_open_files(limits.get, limits.put)
        self.assertEqual(files.after, 512)
        self.assertIn("raising it failed: not allowed to raise maximum limit", files.warning() or "")


class DaemonSaysItsLimitTests(FastCase):
    def start(self, files: Any) -> LogEvents:
        captured = LogEvents(self)
        clock = threadless(self)
        node = Daemon(memory_config(self.tmp_path()), reactor=clock, open_files=files)
        node.startService()
        until(self, clock, lambda: node.started)
        drive(self, clock, node.stopService())
        return captured

    def test_a_low_limit_is_a_warning_at_start(self) -> None:
        captured = self.start(OpenFiles(256, 256, 256))
        warnings = [t for e, t in zip(captured.events, captured.texts()) if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len([t for t in warnings if "open files limited to 256" in t]), 1, warnings)

    def test_a_high_limit_is_one_line_of_information(self) -> None:
        captured = self.start(OpenFiles(1024, 65536, 65536))
        texts = captured.texts()
        self.assertTrue(any("open files limit 65536 (raised from 1024)" in t for t in texts), texts)
        self.assertFalse(any("open files limited" in t for t in texts))
