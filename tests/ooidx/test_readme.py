"""Every shell command README.md shows, run as written against real daemons (issue 18).

The shell blocks are read from README.md itself, so an example cannot rot:
each line (each `&&` part) is run by bash in a scratch directory that holds
a copy of etc/, one after the other, and must exit 0. What differs from a
newcomer's terminal, and only that:

- the ports: 8080, 8100 and 8099 become free ports (this machine runs other
  tests), in the commands and in the copy of etc/dx.yaml; `ooidx demo` gets
  them as --web-port/--proxy-port/--upstream-port;
- `.venv/bin/` is the virtualenv running this test, so `python3 -m venv .venv`
  and `pip install -e .` are not run (it is installed), nor `scripts/test`
  (the suite this test is part of): L{SKIPPED} lists them, and any other line
  is run;
- the daemons run in the background: `twistd -n ooidx` until its /healthz
  answers 200 (then stopped with SIGTERM, as the README says to stop it),
  `ooidx demo` until it printed its commands (stopped with SIGINT, Ctrl-C,
  after the last block).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.ooidx.twistd_helpers import ROOT, environment, free_port

README = ROOT / "README.md"
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)
VENV_BIN = Path(sys.executable).parent
#: The parts of README lines that are not run, and why.
SKIPPED = {
    "python3 -m venv .venv": "the test runs in a virtualenv already",
    ".venv/bin/pip install -e .": "ooidx is installed in it",
    "scripts/test": "the suite this test is part of",
}

pytestmark = pytest.mark.skipif(not shutil.which("ncdump") or not shutil.which("curl"),
                                reason="needs ncdump and curl")


def readme_lines() -> List[str]:
    return [line for block in SHELL_BLOCK.findall(README.read_text(encoding="utf-8"))
            for line in block.splitlines() if line.strip()]


def wait_for(check, timeout: float, what: str, proc: Optional[subprocess.Popen] = None, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode})\n{log_text(log)}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s\n{log_text(log)}")


def log_text(path: str) -> str:
    return Path(path).read_text(errors="replace")[-4000:] if path and os.path.exists(path) else ""


def healthy(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Runner:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports = {"8080": str(free_port()), "8100": str(free_port()), "8099": str(free_port())}
        self.env = environment()
        self.env.pop("OOIDX_CONFIG", None)
        self.exports: List[str] = []
        self.demo: Optional[subprocess.Popen] = None
        self.ran: List[str] = []
        self.skipped: List[str] = []
        shutil.copytree(ROOT / "etc", work / "etc")
        dx = work / "etc" / "dx.yaml"
        dx.write_text(self.ported(dx.read_text()))

    def ported(self, text: str) -> str:
        for default, port in self.ports.items():
            text = re.sub(rf"\b{default}\b", port, text)
        return text

    def command(self, part: str) -> str:
        return self.ported(part).replace(".venv/bin/", f"{VENV_BIN}/")

    def run_part(self, part: str) -> None:
        part = part.strip()
        if part in SKIPPED:
            self.skipped.append(part)
            return
        if " twistd -n ooidx" in f" {part}" or part.startswith(".venv/bin/twistd"):
            return self.run_daemon(part)
        if re.search(r"\booidx demo\b", part):
            return self.start_demo(part)
        script = "\n".join(self.exports + [self.command(part)])
        done = subprocess.run(["bash", "-c", script], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=90)
        assert done.returncode == 0, (f"README command failed ({done.returncode}): {part}\n"
                                      f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}")
        if part.startswith("export "):
            self.exports.append(self.command(part))
        else:
            assert done.stdout.strip() or done.stderr.strip(), f"README command printed nothing: {part}"
        self.ran.append(part)

    def run_daemon(self, part: str) -> None:
        log = str(self.work / "twistd.out")
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + self.command(part).replace("twistd -n", "twistd --pidfile= -n")],
                                    cwd=self.work, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_for(lambda: healthy(f"http://127.0.0.1:{self.ports['8080']}/healthz"), 60,
                     f"{part}: /healthz 200", proc, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        assert code == 0, f"{part}: exit status {code} after SIGTERM\n{log_text(log)}"
        self.ran.append(part)

    def start_demo(self, part: str) -> None:
        command = self.command(part) + " ".join(
            ["", "--web-port", self.ports["8080"], "--proxy-port", self.ports["8100"],
             "--upstream-port", self.ports["8099"]])
        self.demo_log = str(self.work / "demo.out")
        with open(self.demo_log, "w") as out:
            self.demo = subprocess.Popen(["bash", "-c", "exec " + command], cwd=self.work, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "Ctrl-C stops the demo" in log_text(self.demo_log), 60, f"{part}: its commands printed",
                 self.demo, self.demo_log)
        self.ran.append(part)

    def stop_demo(self) -> None:
        if self.demo is None or self.demo.poll() is not None:
            return
        self.demo.send_signal(signal.SIGINT)
        try:
            code = self.demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.demo.pid, signal.SIGKILL)
            self.demo.wait(10)
            raise AssertionError(f"ooidx demo still running 30 s after Ctrl-C\n{log_text(self.demo_log)}")
        assert code == 0, f"ooidx demo: exit status {code} after Ctrl-C\n{log_text(self.demo_log)}"


def test_every_readme_command_runs(tmp_path: Path) -> None:
    runner = Runner(tmp_path)
    try:
        for line in readme_lines():
            for part in line.split(" && "):
                runner.run_part(part)
        runner.stop_demo()
    finally:
        if runner.demo is not None and runner.demo.poll() is None:
            os.killpg(runner.demo.pid, signal.SIGKILL)
    assert sorted(runner.skipped) == sorted(SKIPPED), runner.skipped
    assert len(runner.ran) >= 12, runner.ran
    assert any("ncdump" in part for part in runner.ran)
