"""`ooidx demo` on a real daemon (issue 18): a dataset through ncdump, the
page and `ooidx events` within 30 s of the start, new versions as the sample
changes; and the CLI against that daemon: ports from --config, the
exchange's own URLs for `ooidx get`, a status that does not wait 1.5 s, and
`--attach` to a daemon that refuses loopback upstreams saying what to allow."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.ooidx.twistd_helpers import Daemon, environment, free_port, write_config

pytestmark = pytest.mark.skipif(not shutil.which("ncdump"), reason="needs ncdump (netcdf-bin)")

CLI = [sys.executable, "-m", "ooidx.cli"]


class Demo:
    def __init__(self, work: Path, every: float = 3.0) -> None:
        self.work = work
        self.web, self.proxy, self.upstream = free_port(), free_port(), free_port()
        self.dir = work / "demo"
        self.log = work / "demo.out"
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                CLI + ["demo", "--dir", str(self.dir), "--web-port", str(self.web), "--proxy-port", str(self.proxy),
                       "--upstream-port", str(self.upstream), "--every", str(every)],
                cwd=work, env=environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + list(args), cwd=self.work, env=environment(), capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"the demo did not stop on SIGINT\n{self.output()}")
        return self.proc.returncode


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)


def until(check, timeout: float, what: str, demo: Demo) -> object:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        assert demo.proc.poll() is None, f"the demo exited ({demo.proc.returncode})\n{demo.output()}"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})\n{demo.output()}")


def test_demo_shows_a_dataset_within_30_s(demo: Demo) -> None:
    url = f"http://127.0.0.1:{demo.proxy}/datasets/grid"

    def ncdump() -> str:
        done = subprocess.run(["ncdump", "-h", url], capture_output=True, text=True, timeout=20)
        return done.stdout if done.returncode == 0 else ""

    header = until(ncdump, 30, "ncdump -h through the exchange", demo)
    assert time.monotonic() - demo.started < 30
    assert "float sst(time, lat, lon)" in header and 'standard_name = "sea_surface_temperature"' in header
    out = demo.output()
    config = demo.dir / "demo.yaml"
    for command in (f"ncdump -h {url}", f"http://127.0.0.1:{demo.web}/", "events"):
        assert command in out, out
    # the time series and the profile, with their data (not only the header)
    for name, variable in (("timeseries", "sea_water_temperature"), ("profile", "depth")):
        done = subprocess.run(["ncdump", "-v", variable, f"http://127.0.0.1:{demo.proxy}/datasets/{name}"],
                              capture_output=True, text=True, timeout=20)
        assert done.returncode == 0 and f" {variable} =" in done.stdout, done.stdout + done.stderr
    # the page
    import urllib.request
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{demo.web}/", timeout=10) as page:
        assert page.status == 200
    # ooidx events: the saved versions; new values every 3 s make more of them
    events = demo.cli("--config", str(config), "events", "--recent", "100", "--count", "1", r"^event\.saved\.grid")
    assert events.returncode == 0 and "event.saved.grid" in events.stdout, events.stdout + events.stderr
    versions = demo.dir / "var" / "datasets" / "grid"
    until(lambda: versions.is_dir() and len([p for p in versions.iterdir() if p.is_dir()]) >= 2, 20,
          "a second version of grid (new values, refreshed)", demo)
    assert demo.stop() == 0


def test_cli_against_the_demo(demo: Demo, tmp_path: Path) -> None:
    until(lambda: "Ctrl-C stops the demo" in demo.output(), 30, "the demo's commands", demo)
    config = str(demo.dir / "demo.yaml")
    # --config gives the ports (the web port here is not 8080)
    started = time.monotonic()
    status = demo.cli("--config", config, "status")
    took = time.monotonic() - started
    assert status.returncode == 0 and "controller" in status.stdout, status.stdout + status.stderr
    # one node on memory://: it answers at once; waiting out the 1.5 s status round is gone
    assert took < 1.4, f"ooidx status took {took:.2f} s"
    # the exchange's own URL, with the config's proxy port, or none at all (loopback)
    own = f"http://127.0.0.1:{demo.proxy}/datasets/grid.dds?lat"
    for args in (["--config", config], []):
        out = tmp_path / f"grid{len(args)}.dds"
        got = demo.cli(*args, "get", own, "-o", str(out))
        assert got.returncode == 0, got.stderr
        assert out.read_text().startswith("Dataset {") and "lat[lat = 40]" in out.read_text()
    # a refused upstream: what to allow, and where
    refused = demo.cli("--config", config, "datasets", "register", "x", "http://127.0.0.1:9/x.nc")
    assert refused.returncode == 1
    assert 'add "127.0.0.1:9" to security.allow_hosts' in refused.stderr
    assert "security.allow_private: true" in refused.stderr and os.path.abspath(config) in refused.stderr
    assert demo.stop() == 0


def test_attach_to_a_daemon_that_refuses_loopback(tmp_path: Path) -> None:
    """--attach registers with a running daemon; the default config refuses the
    demo's loopback upstream, and the demo says which key to set."""
    web, proxy = free_port(), free_port()
    config = write_config(tmp_path / "dx.yaml", http={"web_port": web, "proxy_port": proxy})
    daemon = Daemon(config)
    try:
        daemon.wait_log(" started: ", timeout=60)
        upstream = free_port()
        done = subprocess.run(CLI + ["--config", str(config), "demo", "--attach", "--dir", str(tmp_path / "d"),
                                     "--upstream-port", str(upstream)],
                              cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f'security.allow_hosts: ["127.0.0.1:{upstream}"]' in done.stderr, done.stderr
        assert "loopback address refused" in done.stderr
    finally:
        daemon.kill()


def test_attach_to_a_daemon_that_allows_the_upstream(tmp_path: Path) -> None:
    """--attach with a config that allows the demo upstream: the datasets go
    through that daemon, found through its --config (ports and token)."""
    web, proxy, upstream = free_port(), free_port(), free_port()
    config = write_config(tmp_path / "dx.yaml", http={"web_port": web, "proxy_port": proxy},
                          security={"allow_hosts": [f"127.0.0.1:{upstream}"]})
    daemon = Daemon(config)
    demo = None
    try:
        daemon.wait_log(" started: ", timeout=60)
        log = tmp_path / "attach.out"
        with open(log, "w") as out:
            demo = subprocess.Popen(CLI + ["--config", str(config), "demo", "--attach", "--dir", str(tmp_path / "d"),
                                           "--upstream-port", str(upstream)],
                                    cwd=tmp_path, env=environment(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 30
        while "Ctrl-C stops the demo" not in log.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert f"ooidx --config {config} events" in log.read_text()
        done = subprocess.run(["ncdump", "-h", f"http://127.0.0.1:{proxy}/datasets/timeseries"],
                              capture_output=True, text=True, timeout=20)
        assert "sea_water_temperature(station, time)" in done.stdout, done.stdout + done.stderr
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        if demo is not None and demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        daemon.kill()
