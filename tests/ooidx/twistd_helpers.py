"""Running `twistd -n ooidx` in subprocesses for the daemon tests: start, wait
for a log line (every wait bounded), signal, and always clean up."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from tests.support import waiting

ROOT = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).with_name("twistd")

#: Runs twistd's own entry point, after the Python statements given in
#: OOIDX_TEST_PRELUDE (used to make a component fail on purpose).
LAUNCHER = ("import os, sys; exec(os.environ.get('OOIDX_TEST_PRELUDE', '')); "
            "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: what makes an HTTP client of a child go through a proxy of the environment
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY")


def environment(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("OOIDX_BROKER", None)
    env.pop("OOIDX_TOKEN", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def direct_environment(**extra: str) -> Dict[str, str]:
    """L{environment} less L{PROXY_VARIABLES}: a child's HTTP goes straight to 127.0.0.1."""
    env = environment(**extra)
    for k in PROXY_VARIABLES:
        env.pop(k, None)
    return env


def write_config(path: Path, **settings: Any) -> Path:
    settings.setdefault("data_dir", str(path.parent / f"{path.stem}-data"))
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def twistd_command(config: Path, *extra: str, launcher: bool = False) -> List[str]:
    args = ["-n", "--pidfile=", "ooidx", "--config", str(config), *extra]
    if launcher or not TWISTD.exists():
        return [sys.executable, "-c", LAUNCHER, *args]
    return [str(TWISTD), *args]


def run_twistd(config: Path, *extra: str, env: Optional[Dict[str, str]] = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run to completion (for configs that must be refused)."""
    return subprocess.run(twistd_command(config, *extra), cwd=config.parent, env=env or environment(),
                          capture_output=True, text=True, timeout=timeout)


class Daemon:
    """A `twistd -n ooidx` process; its log (stdout) and stderr go to files."""

    def __init__(self, config: Path, *, env: Optional[Dict[str, str]] = None, name: Optional[str] = None,
                 launcher: bool = False) -> None:
        self.name = name or config.stem
        self.log_path = config.parent / f"{self.name}.out"
        self.err_path = config.parent / f"{self.name}.err"
        self._out = open(self.log_path, "w")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(twistd_command(config, launcher=launcher), cwd=config.parent,
                                     env=env or environment(), stdout=self._out, stderr=self._err,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"daemon {self.name} (pid {self.pid}, rc {self.proc.poll()})\n--- log:\n{self.log()[-6000:]}"
                f"\n--- stderr:\n{self.stderr()[-3000:]}")

    def has(self, text: str) -> bool:
        return text in self.log()

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Block until C{text} is in the log (for tests that need no reactor)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.has(text):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited while waiting for {text!r}\n{self.describe()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s\n{self.describe()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s\n{self.describe()}") from None

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """The daemon and anything left in its session (its child processes)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


def eventually(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll C{check} (it may return a Deferred) until it returns a true value,
    without blocking the reactor; an exception counts as "not yet"; fail after
    C{timeout} seconds (tests.support.waiting.eventually)."""
    return waiting.eventually(check, timeout, what, interval, tolerate=(Exception,))
