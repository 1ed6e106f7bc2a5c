"""PrometheusObserver with child processes (ChildMetrics); the rest is in the
fast tier, tests/fast/node/test_metrics.py."""
from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ooidx.node.metrics import PrometheusObserver


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


# --------------------------------------------------------------------------- #
# child processes: their files, read by the daemon (ooidx.node.metrics.ChildMetrics)

import os  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, List, Set  # noqa: E402

from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402

from ooidx.node.metrics import (FILE_PREFIXES, FILE_SIZE, MULTIPROC_ENV, ChildMetrics,  # noqa: E402
                           prepare_directory)

ROOT = Path(__file__).resolve().parents[2]

#: A child process as ooidx.node.child makes it: shares its metrics, counts, says its pid, waits.
CHILD = """
import os, sys
from ooidx.node.metrics import PrometheusObserver, share_with_daemon
assert share_with_daemon() == os.environ["PROMETHEUS_MULTIPROC_DIR"]
o = PrometheusObserver()
for _ in range(int(sys.argv[1])):
    o.message_in("fetcher")
o.message_out("cache")
o.inflight("fetcher", +2)
o.rpc_latency("cache", "get", 0.02, "ok")
o.rpc_latency("cache", "get", 3.0, "ok")
print(os.getpid(), flush=True)
sys.stdin.read()
"""


class Child:
    def __init__(self, directory: Path, count: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **{MULTIPROC_ENV: str(directory)})
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(count)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), (line, self.proc.wait(10))
        self.pid = int(line)

    def exit(self, kill: bool = False) -> None:
        if kill:
            os.kill(self.pid, signal.SIGKILL)
        else:
            self.proc.stdin.close()
        self.proc.wait(30)


class Children:
    """Child processes and the daemon's side: a ChildMetrics that knows which are live."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.live: Set[int] = set()
        self.made: List[Child] = []
        self.metrics = ChildMetrics(str(directory), lambda: set(self.live))

    def start(self, count: int) -> Child:
        child = Child(self.directory, count)
        self.made.append(child)
        self.metrics.child_started(child.pid)
        self.live.add(child.pid)
        return child

    def exited(self, child: Child, kill: bool = False) -> None:
        child.exit(kill)
        self.live.discard(child.pid)
        self.metrics.retire()

    def files(self) -> List[str]:
        return sorted(os.listdir(self.directory))


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    directory = tmp_path / "child-metrics"
    directory.mkdir()
    made = Children(directory)
    yield made
    for child in made.made:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(10)


@pytest.fixture
def logged() -> Iterator[List[str]]:
    lines: List[str] = []

    def observe(event: dict) -> None:
        if str(event.get("log_namespace", "")).startswith("ooidx.node.metrics"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def daemon_with(children: Children) -> PrometheusObserver:
    """The daemon's observer (it counts too), with the children included."""
    obs = PrometheusObserver()
    obs.message_in("fetcher")
    obs.rpc_latency("cache", "get", 0.02, "ok")
    obs.inflight("fetcher", +1)
    obs.component_up("fetcher", True)
    obs.include(children.metrics)
    return obs


def exposition(obs: PrometheusObserver) -> dict:
    text = obs.generate().decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), names  # each family once
    assert "pid=" not in text
    return samples(text)


FETCHER = ("magnet_messages_in_total", frozenset({("name", "fetcher")}))
INFLIGHT = ("magnet_inflight", frozenset({("name", "fetcher")}))
GET = frozenset({("address", "cache"), ("op", "get"), ("outcome", "ok")})


def test_children_add_to_the_daemons_series(children: Children) -> None:
    children.start(3)
    children.start(5)
    obs = daemon_with(children)
    s = exposition(obs)
    assert s[FETCHER] == 1 + 3 + 5
    assert s[("magnet_messages_out_total", frozenset({("name", "cache")}))] == 2
    assert s[INFLIGHT] == 1 + 2 + 2  # livesum
    assert s[("magnet_rpc_latency_seconds_count", GET)] == 1 + 2 + 2
    assert s[("magnet_rpc_latency_seconds_bucket", GET | {("le", "0.025")})] == 3  # the 0.02 s calls
    assert s[("magnet_rpc_latency_seconds_bucket", GET | {("le", "2.5")})] == 3
    assert s[("magnet_rpc_latency_seconds_bucket", GET | {("le", "5.0")})] == 5  # and the two 3.0 s ones
    assert s[("magnet_rpc_latency_seconds_bucket", GET | {("le", "+Inf")})] == 5
    assert s[("magnet_rpc_latency_seconds_sum", GET)] == pytest.approx(0.02 * 3 + 3.0 * 2)
    assert s[("ooidx_component_up", frozenset({("component", "fetcher")}))] == 1
    # the daemon's own counters are what they were (their registry is untouched)
    own = samples(generate_own(obs))
    assert own[FETCHER] == 1 and own[INFLIGHT] == 1
    # each child: its files, allocated on disk (no sparse holes)
    for child in children.made:
        for prefix in FILE_PREFIXES:
            path = children.directory / f"{prefix}_{child.pid}.db"
            assert path.stat().st_size >= FILE_SIZE and path.stat().st_blocks * 512 >= FILE_SIZE


def generate_own(obs: PrometheusObserver) -> str:
    from prometheus_client import generate_latest
    return generate_latest(obs.registry).decode()


@pytest.mark.parametrize("kill", [False, True], ids=["exit", "kill -9"])
def test_an_exited_child_is_counted_once_and_its_files_go(children: Children, kill: bool) -> None:
    first = children.start(3)
    children.start(5)
    obs = daemon_with(children)
    before = exposition(obs)
    children.exited(first, kill=kill)
    assert [name for name in children.files() if name.endswith(f"_{first.pid}.db")] == []
    for _ in range(3):  # every scrape: the same counts, not twice
        after = exposition(obs)
        assert after[FETCHER] == before[FETCHER] == 9
        assert after[("magnet_rpc_latency_seconds_count", GET)] == 5
        assert after[("magnet_rpc_latency_seconds_bucket", GET | {("le", "+Inf")})] == 5
        assert after[("magnet_rpc_latency_seconds_bucket", GET | {("le", "0.025")})] == 3
        assert after[INFLIGHT] == 1 + 2  # a dead child's in-flight work is not in flight
    # a new child (the restart) counts on top
    again = children.start(4)
    assert exposition(obs)[FETCHER] == 13
    children.exited(again)
    assert exposition(obs)[FETCHER] == 13
    assert len(children.files()) == len(FILE_PREFIXES)  # only the live child's files are on disk


def test_an_exited_childs_file_that_cannot_be_removed_is_read_where_it_is(children: Children, monkeypatch: Any,
                                                                          logged: List[str]) -> None:
    first = children.start(3)
    obs = daemon_with(children)
    real_unlink = os.unlink

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "unlink", refuse)
    children.exited(first)
    for _ in range(3):
        assert exposition(obs)[FETCHER] == 4
    assert len([line for line in logged if "cannot be removed" in line]) == len(FILE_PREFIXES)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert exposition(obs)[FETCHER] == 4  # now folded into memory and removed
    assert children.files() == []
    assert exposition(obs)[FETCHER] == 4


def test_bad_files_are_logged_once_and_left_out(children: Children, logged: List[str]) -> None:
    live = children.start(3)
    dead = children.start(5)
    obs = daemon_with(children)
    d = children.directory
    (d / "notes.txt").write_text("hello")
    (d / "counter_4000000.db").write_bytes(b"\xff" * 64)  # a pid that is no child of ours
    (d / f"gauge_bogus_{live.pid}.db").write_bytes(b"")  # not a multiprocess mode
    (d / "subdir").mkdir()
    with open(d / f"histogram_{live.pid}.db", "r+b") as f:  # a live child's file, broken
        f.write(struct.pack("i", 1 << 30))
    with open(d / f"counter_{dead.pid}.db", "r+b") as f:  # a bad key in a child's file
        f.seek(12)
        f.write(b"\xff\xfe")
    for _ in range(3):
        s = exposition(obs)
        assert s[FETCHER] == 1 + 3  # the dead child's bad counter file is left out, the rest is served
        assert s[("magnet_rpc_latency_seconds_count", GET)] == 1 + 2  # the broken histogram left out
        assert s[INFLIGHT] == 1 + 2 + 2
    text = "\n".join(logged)
    for name in ("notes.txt", "counter_4000000.db", f"gauge_bogus_{live.pid}.db", "subdir"):
        assert text.count(f"{name} is not a metrics file of this daemon's children") == 1, text
    assert text.count(f"histogram_{live.pid}.db cannot be read") == 1, text
    # the dead child's: when it exits, its good files are kept, the bad one goes
    children.exited(dead)
    assert exposition(obs)[FETCHER] == 4
    assert exposition(obs)[("magnet_rpc_latency_seconds_count", GET)] == 1 + 2  # the live one's still broken
    assert f"counter_{dead.pid}.db of an exited child cannot be read" in "\n".join(logged)
    assert not (d / f"counter_{dead.pid}.db").exists()
    assert (d / "notes.txt").exists() and (d / "counter_4000000.db").exists()  # not ours: left alone


def test_a_family_of_another_type_is_left_out(children: Children, logged: List[str]) -> None:
    child = children.start(1)
    obs = daemon_with(children)
    # a counter file that says magnet_inflight is a counter
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    path = children.directory / f"counter_{child.pid}.db"
    f = MmapedDict(str(path))
    f.write_value(mmap_key("magnet_inflight", "magnet_inflight", ["name"], ["x"], "?"), 7.0, 0.0)
    f.close()
    s = exposition(obs)
    assert s[FETCHER] == 2
    assert ("magnet_inflight", frozenset({("name", "x")})) not in s
    assert any("magnet_inflight has another type" in line for line in logged)


def test_the_directory_of_a_daemon_run(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    root = tmp_path / "child-metrics"
    (root / str(gone.pid)).mkdir(parents=True)  # a daemon that is gone
    (root / str(gone.pid) / "counter_1.db").write_bytes(b"x")
    (root / str(os.getppid())).mkdir()  # one that runs (the test runner's parent)
    (root / str(os.getpid())).mkdir()  # this pid's, from an earlier run
    (root / str(os.getpid()) / "counter_1.db").write_bytes(b"x")
    (root / "README").write_text("not a pid")
    path = prepare_directory(str(tmp_path))
    assert path == str(root / str(os.getpid()))
    assert os.listdir(path) == []
    assert sorted(os.listdir(root)) == sorted([str(os.getppid()), str(os.getpid()), "README"])
    with pytest.raises(OSError):
        prepare_directory(str(root / "README" / "x"))


def test_a_child_that_cannot_share_keeps_its_metrics_in_memory(tmp_path: Path) -> None:
    script = ("import os\n"
              "from prometheus_client import values\n"
              "from ooidx.node.metrics import PrometheusObserver, share_with_daemon\n"
              "assert share_with_daemon() is None\n"
              "assert values.ValueClass is values.MutexValue\n"
              "o = PrometheusObserver(); o.message_in('fetcher')\n"
              "print(o.generate().decode())\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{MULTIPROC_ENV: str(tmp_path / "missing")})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'magnet_messages_in_total{name="fetcher"} 1.0' in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_child_on_a_full_disk_is_not_killed_by_its_metrics(tmp_path: Path) -> None:
    """Stock multiprocess mode maps sparse files: on a full disk the first
    count is SIGBUS. A child allocates its files first, and on ENOSPC keeps
    its metrics in memory."""
    full = tmp_path / "full"
    full.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    try:
        fd = os.open(full / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        script = ("from prometheus_client import values\n"
                  "from ooidx.node.metrics import PrometheusObserver, share_with_daemon\n"
                  "assert share_with_daemon() is None\n"
                  "o = PrometheusObserver()\n"
                  "for _ in range(100): o.message_in('fetcher'); o.rpc_latency('cache', 'get', 0.1, 'ok')\n"
                  "print(o.generate().decode())\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT), **{MULTIPROC_ENV: str(full)})
        ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, (ran.returncode, ran.stderr)
        assert 'magnet_messages_in_total{name="fetcher"} 100.0' in ran.stdout
        assert os.listdir(full) == ["fill"]  # nothing half-made left behind
    finally:
        subprocess.run(["umount", str(full)], capture_output=True, timeout=30)
