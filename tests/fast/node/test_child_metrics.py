"""ooidx.node.metrics.ChildMetrics, in-process: the "children" are files that
this test writes as prometheus_client's multiprocess mode would (the same
MmapedDict and keys), under made-up pids; a child exits when its pid leaves
the live set. (Real child processes are in tests/ooidx/test_metrics.py.)"""
from __future__ import annotations

import os
from typing import Any, Set

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from ooidx.node import metrics
from ooidx.node.metrics import BadFile, ChildMetrics, PrometheusObserver, prepare_directory, read_file

from tests.fast.core.support import FastCase, LogEvents

FETCHER = ("magnet_messages_in_total", frozenset({("name", "fetcher")}))
INFLIGHT = ("magnet_inflight", frozenset({("name", "fetcher")}))
UP = ("ooidx_component_up", frozenset({("component", "fetcher")}))


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class Child:
    """The files of one child process, written by hand."""

    def __init__(self, directory: str, pid: int) -> None:
        self.directory, self.pid = directory, pid

    def path(self, kind: str) -> str:
        return os.path.join(self.directory, f"{kind}_{self.pid}.db")

    def write(self, kind: str, metric: str, sample: str, labels: dict, value: float,
              help_text: str = "help") -> None:
        d = MmapedDict(self.path(kind))
        try:
            d.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), help_text), value, 0.0)
        finally:
            d.close()

    def count(self, n: float, latency: float = 0.02) -> "Child":
        self.write("counter", "magnet_messages_in", "magnet_messages_in_total", {"name": "fetcher"}, n,
                   "Messages received, by address.")
        self.write("gauge_livesum", "magnet_inflight", "magnet_inflight", {"name": "fetcher"}, 2.0,
                   "Messages being handled, by address.")
        self.write("gauge_livemax", "ooidx_component_up", "ooidx_component_up", {"component": "fetcher"}, 1.0,
                   "1 while the component runs.")
        key = {"address": "cache", "op": "get", "outcome": "ok"}
        self.write("histogram", "magnet_rpc_latency_seconds", "magnet_rpc_latency_seconds_bucket",
                   dict(key, le="0.025"), 1.0, "RPC latency.")
        self.write("histogram", "magnet_rpc_latency_seconds", "magnet_rpc_latency_seconds_bucket",
                   dict(key, le="+Inf"), 0.0, "RPC latency.")  # as stored: per bucket, made cumulative on read
        self.write("histogram", "magnet_rpc_latency_seconds", "magnet_rpc_latency_seconds_sum", key, latency,
                   "RPC latency.")
        return self


class ChildMetricsTests(FastCase):
    def setUp(self) -> None:
        self.directory = str(self.tmp_path() / "child-metrics")
        os.mkdir(self.directory)
        self.live: Set[int] = set()
        self.metrics = ChildMetrics(self.directory, lambda: set(self.live))
        self.observer = PrometheusObserver()
        self.observer.message_in("fetcher")
        self.observer.inflight("fetcher", +1)
        self.observer.include(self.metrics)

    def start(self, pid: int) -> Child:
        self.metrics.child_started(pid)
        self.live.add(pid)
        return Child(self.directory, pid)

    def exit(self, child: Child) -> None:
        self.live.discard(child.pid)
        self.metrics.retire()

    def exposition(self) -> dict:
        text = self.observer.generate().decode()
        names = [family.name for family in text_string_to_metric_families(text)]
        assert len(names) == len(set(names)), names
        return samples(text)

    def test_children_add_to_the_daemons_series(self) -> None:
        self.start(101).count(3)
        self.start(102).count(5, latency=3.0)
        s = self.exposition()
        assert s[FETCHER] == 1 + 3 + 5
        assert s[INFLIGHT] == 1 + 2 + 2  # livesum
        assert s[UP] == 1  # livemax
        get = frozenset({("address", "cache"), ("op", "get"), ("outcome", "ok")})
        assert s[("magnet_rpc_latency_seconds_count", get)] == 2
        assert s[("magnet_rpc_latency_seconds_sum", get)] == 3.02
        assert s[("magnet_rpc_latency_seconds_bucket", get | {("le", "0.025")})] == 2

    def test_an_exited_child_is_counted_once_its_gauges_go_and_its_files_go(self) -> None:
        first = self.start(101).count(3)
        self.start(102).count(5)
        self.exit(first)
        assert sorted(os.listdir(self.directory)) == [f"{k}_102.db" for k in (
            "counter", "gauge_livemax", "gauge_livesum", "histogram")]
        for _ in range(3):
            s = self.exposition()
            assert s[FETCHER] == 9 and s[INFLIGHT] == 1 + 2
        again = self.start(101).count(4)  # the pid reused by a new child: counted on top
        assert self.exposition()[FETCHER] == 13
        self.exit(again)
        assert self.exposition()[FETCHER] == 13

    def test_files_of_pids_not_ours_and_odd_names_are_ignored_and_logged_once(self) -> None:
        events = LogEvents(self)
        Child(self.directory, 999).count(100)  # not spawned by this daemon
        with open(os.path.join(self.directory, "notes.txt"), "w") as f:
            f.write("x")
        self.start(101).count(1)
        Child(self.directory, 101).write("gauge_weird", "g", "g", {}, 1.0)
        for _ in range(2):
            assert self.exposition()[FETCHER] == 2
        texts = [e["log_format"] for e in events.events if e.get("log_namespace") == "ooidx.node.metrics"]
        assert len(texts) == 6  # counter, 2 gauges, histogram of 999; notes.txt; the weird mode: once each
        assert all("is not a metrics file of this daemon's children" in t for t in texts)

    def test_a_corrupt_file_of_a_live_child_is_left_out_then_removed_when_it_exits(self) -> None:
        events = LogEvents(self)
        child = self.start(101).count(3)
        with open(child.path("counter"), "r+b") as f:
            f.seek(8)
            f.write(b"\xff" * 64)
        assert self.exposition()[FETCHER] == 1  # the daemon's own only
        assert self.exposition()[INFLIGHT] == 3  # its other files are read
        self.exit(child)
        assert not os.path.exists(child.path("counter"))
        formats = [e["log_format"] for e in events.events if e.get("log_namespace") == "ooidx.node.metrics"]
        assert any("left out of /metrics while its process runs" in t for t in formats)
        assert any("its counts are lost; file removed" in t for t in formats)

    def test_a_family_of_another_type_than_the_daemon_s_is_left_out(self) -> None:
        events = LogEvents(self)
        child = self.start(101)
        child.write("gauge_livesum", "magnet_messages_in", "magnet_messages_in", {"name": "fetcher"}, 7.0)
        for _ in range(2):
            assert self.exposition()[FETCHER] == 1
        warned = [e for e in events.events if e.get("log_namespace") == "ooidx.node.metrics"]
        assert len(warned) == 1 and "has another type than the daemon's" in warned[0]["log_format"]

    def test_a_family_of_another_type_than_another_child_s_is_left_out(self) -> None:
        events = LogEvents(self)
        self.start(101).write("counter", "jobs", "jobs_total", {}, 2.0)
        self.start(102).write("gauge_livesum", "jobs", "jobs", {}, 9.0)
        assert self.exposition()[("jobs_total", frozenset())] == 2
        assert ("jobs", frozenset()) not in self.exposition()
        assert any("has another type than elsewhere" in e["log_format"] for e in events.events
                   if e.get("log_namespace") == "ooidx.node.metrics")

    def test_an_exited_child_s_file_that_cannot_be_removed_is_read_where_it_is(self) -> None:
        events = LogEvents(self)
        child = self.start(101).count(3)
        real_unlink = os.unlink

        def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "unlink", refuse)
        self.exit(child)
        for _ in range(2):
            assert self.exposition()[FETCHER] == 4  # not twice
        self.patch(os, "unlink", real_unlink)
        self.metrics.retire()
        assert os.listdir(self.directory) == [] and self.exposition()[FETCHER] == 4
        assert any("cannot be removed" in e["log_format"] for e in events.events
                   if e.get("log_namespace") == "ooidx.node.metrics")

    def test_an_unreadable_directory_leaves_the_daemon_s_own_and_the_retired(self) -> None:
        events = LogEvents(self)
        child = self.start(101).count(3)
        self.exit(child)
        os.rmdir(self.directory)
        assert self.exposition()[FETCHER] == 4
        assert any("cannot read the children's directory" in e["log_format"] for e in events.events
                   if e.get("log_namespace") == "ooidx.node.metrics")

    def test_close_keeps_the_totals_and_removes_the_directory(self) -> None:
        self.start(101).count(3)
        self.live.clear()
        self.metrics.close()
        assert not os.path.exists(self.directory)
        assert self.exposition()[FETCHER] == 4
        assert repr(self.metrics) == f"<ChildMetrics {self.directory}>"

    def test_read_file(self) -> None:
        child = Child(self.directory, 7)
        empty = child.path("counter")
        open(empty, "wb").close()
        assert read_file(empty, "counter") == {}
        child.count(2)
        families = read_file(child.path("histogram"), "histogram")
        family = families["magnet_rpc_latency_seconds"]
        assert family.type == "histogram"
        labels = (("address", "cache"), ("op", "get"), ("outcome", "ok"))
        assert family.samples[("magnet_rpc_latency_seconds_count", labels)] == 1.0
        bad = Child(self.directory, 8)
        bad.write("histogram", "h", "h_bucket", {"x": "1"}, 1.0)
        with self.assertRaises(BadFile):
            read_file(bad.path("histogram"), "histogram")
        worse = Child(self.directory, 9)
        worse.write("histogram", "h", "h_bucket", {"le": "many"}, 1.0)
        with self.assertRaises(BadFile):
            read_file(worse.path("histogram"), "histogram")
        odd = Child(self.directory, 10)
        d = MmapedDict(odd.path("counter"))
        d.write_value("not json", 1.0, 0.0)
        d.close()
        with self.assertRaises(BadFile):
            read_file(odd.path("counter"), "counter")
        mismatched = Child(self.directory, 11)
        mismatched.write("counter", "a", "b_total", {}, 1.0)
        with self.assertRaises(BadFile):
            read_file(mismatched.path("counter"), "counter")


class DirectoryTests(FastCase):
    def test_prepare_directory_empties_its_own_and_removes_those_of_daemons_gone(self) -> None:
        data_dir = str(self.tmp_path())
        root = os.path.join(data_dir, metrics.CHILD_METRICS_DIR)
        gone = 2 ** 22 + 12345  # above pid_max on Linux: no such process
        os.makedirs(os.path.join(root, str(gone)))
        os.makedirs(os.path.join(root, str(os.getppid())))  # a daemon that runs: kept
        os.makedirs(os.path.join(root, "keep-me"))
        path = prepare_directory(data_dir, pid=4242)
        open(os.path.join(path, "counter_1.db"), "wb").close()
        assert prepare_directory(data_dir, pid=4242) == path and os.listdir(path) == []
        assert sorted(os.listdir(root)) == sorted(["4242", str(os.getppid()), "keep-me"])
        assert oct(os.stat(path).st_mode & 0o777) == "0o700"

    def test_share_with_daemon_is_nothing_without_a_directory(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV})
        assert metrics.share_with_daemon() is None

    def test_alive(self) -> None:
        assert metrics._alive(os.getpid())
        assert not metrics._alive(2 ** 22 + 12345)
        self.patch(os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError(1, "not ours")))
        assert metrics._alive(1)  # a process we may not signal is alive all the same

