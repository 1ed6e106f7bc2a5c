"""C{ooidx demo}: the sample datasets through an exchange, in one command.

    ooidx demo                  # a daemon of its own (config and data in ./ooidx-demo/)
    ooidx demo --attach         # register with the daemon already running (--url/--config)

It copies the shipped sample files (L{ooidx.demo.sample}) into
C{DIR/upstream/}, serves them on C{127.0.0.1:8099} (L{ooidx.demo.upstream},
in a process of its own, which also writes the new values),
and either starts a daemon in this process with C{DIR/demo.yaml} (written
here: the embedded memory:// bus, and C{security.allow_hosts} naming the demo
upstream's port, which is how a loopback upstream is allowed explicitly; the
default config still refuses loopback) or, with C{--attach}, registers with a
daemon that is already running. The datasets are registered with a refresh
period of C{--every} seconds (60), and the files get new values at the same
period, so each refresh makes a new version, a C{saved} event and a notice.
It prints the commands to try and runs until Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from ooidx.demo import sample

__all__ = ["DemoOptions", "DemoError", "config_text", "run_demo", "commands"]

#: How long the daemon may take to start before the demo gives up.
START_TIMEOUT = 60.0


class DemoError(Exception):
    """The demo cannot run; C{str()} says why and what to do."""


@dataclass
class DemoOptions:
    directory: Path
    upstream_port: int = 8099
    web_port: int = 8080
    proxy_port: int = 8100
    every: float = 60.0
    #: register with a running daemon: C{call(service, op, kwargs)} -> result (blocking), and its ports
    attach: Optional[Callable[[str, str, Dict[str, Any]], Any]] = None
    config_hint: str = ""  # attach: the --config the user passed, for the printed commands

    @property
    def upstream_base(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "demo.yaml"


def config_text(options: DemoOptions) -> str:
    """The demo daemon's config: the embedded default plus one allowed upstream."""
    return f"""\
# Written by `ooidx demo` (again at each run: edit a copy, not this file).
# The embedded default (etc/dx.yaml) with one change: security.allow_hosts
# names the demo's own DAP upstream, 127.0.0.1:{options.upstream_port}. The exchange refuses
# loopback and private upstreams unless a config allows them like this, one
# host (and port) at a time; allow_private: true would open them all.
#
#   twistd -n ooidx --config {options.config_path}
broker: memory://
data_dir: var            # relative to this file: {options.directory / 'var'}
http:
  proxy_port: {options.proxy_port}
  web_port: {options.web_port}
  interface: 127.0.0.1
security:
  allow_hosts: ["127.0.0.1:{options.upstream_port}"]
"""


def commands(options: DemoOptions, config_arg: str) -> List[str]:
    """The three commands to try (a DAP client, the page, the events)."""
    return [
        f"ncdump -h http://127.0.0.1:{options.proxy_port}/datasets/grid",
        f"xdg-open http://127.0.0.1:{options.web_port}/",
        f"ooidx{config_arg} events",
    ]


def prepare(options: DemoOptions) -> Path:
    """DIR/upstream/ with the shipped step-0 files; its path."""
    target = options.directory / "upstream"
    target.mkdir(parents=True, exist_ok=True)
    for name, path in sample.shipped().items():
        if not path.is_file():
            raise DemoError(f"the sample file {path} is missing from the package (scripts/make-demo-data makes it)")
        shutil.copyfile(path, target / path.name)
    return target


@inlineCallbacks
def run_demo(reactor: Any, options: DemoOptions, out: TextIO) -> Any:
    """Start everything, register, print the commands; fires once all runs
    (the demo then goes on until the reactor stops)."""
    options.directory = Path(os.path.abspath(options.directory))
    config = None if options.attach is not None else demo_config(options)  # ports in use: said before anything runs
    files = prepare(options)
    upstream_process = UpstreamProcess(out)
    args = [sys.executable, "-m", "ooidx.demo.upstream", str(files), str(options.upstream_port), f"{options.every:g}"]
    reactor.spawnProcess(upstream_process, sys.executable, args, env=_child_env())
    reactor.addSystemEventTrigger("before", "shutdown", upstream_process.stop)
    try:
        yield upstream_process.listening.addTimeout(START_TIMEOUT, reactor)
    except Exception:
        reason = upstream_process.errors.strip() or "it did not start"
        raise DemoError(f"the demo upstream cannot listen on 127.0.0.1:{options.upstream_port} ({reason}); "
                        "pass --upstream-port N" + ("" if options.attach else " (demo.yaml then allows that port)")
                        ) from None
    out.write(f"demo upstream: {options.upstream_base}/ serves {', '.join(f'{n}.nc' for n in sample.NAMES)}\n")
    if options.attach is None:
        call = yield start_daemon(reactor, options, config, out)
        config_arg = f" --config {_shown(options.config_path)}"
    else:
        def call(service: str, op: str, kwargs: Dict[str, Any]) -> Deferred:
            return deferToThread(options.attach, service, op, kwargs)
        config_arg = f" --config {options.config_hint}" if options.config_hint else ""
    for name in sample.NAMES:
        yield call("controller", "register", {"name": name, "url": f"{options.upstream_base}/{name}.nc",
                                              "refresh": options.every})
        yield call("controller", "get_dataset", {"name": name})  # a first version now
    out.write(f"registered {', '.join(sample.NAMES)} (refresh every {options.every:g} s; new values as often)\n\n"
              "try:\n" + "".join(f"  {c}\n" for c in commands(options, config_arg))
              + "\nCtrl-C stops the demo.\n")
    out.flush()
    upstream_process.announce = True  # its "new values" lines from now on


class UpstreamProcess(ProcessProtocol):
    """The demo upstream's process (L{ooidx.demo.upstream.serve}): C{listening}
    fires once it listens (errbacks if it exits first); its updates are shown."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.listening: Deferred = Deferred()
        self.errors = ""
        self.announce = False
        self._buffer = b""
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.decode("utf-8", "replace")
            if text == "LISTENING" and not self.listening.called:
                self.listening.callback(None)
            elif text.startswith("STEP ") and self.announce:
                step, _, when = text[5:].partition(" ")
                self.out.write(f"{when} new values (step {step})\n")
                self.out.flush()
            elif text.startswith("FAILED ") and self.announce:
                self.out.write(text[7:] + "\n")
                self.out.flush()

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data.decode("utf-8", "replace"))[-2000:]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if not self.listening.called:
            self.listening.errback(reason)
        if self._gone is not None and not self._gone.called:
            self._gone.callback(None)

    _gone: Optional[Deferred] = None

    def stop(self) -> Optional[Deferred]:
        """SIGTERM, and SIGKILL if it is still there 5 s later; fires once it is gone."""
        if self.ended or self.transport is None:
            return None
        from twisted.internet import reactor
        self._gone = Deferred()
        self._signal("TERM")
        self._gone.addTimeout(5.0, reactor, onTimeoutCancel=lambda result, after: self._signal("KILL"))
        return self._gone

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _child_env() -> Dict[str, str]:
    """This environment, with the folder holding this ooidx first on PYTHONPATH
    (so that the upstream process runs this copy of it)."""
    import ooidx
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ooidx.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def demo_config(options: DemoOptions) -> Any:
    """Write DIR/demo.yaml and load it; L{DemoError} when its ports are taken."""
    from ooidx.config import ConfigError, check_ports_free, load

    options.directory.mkdir(parents=True, exist_ok=True)
    options.config_path.write_text(config_text(options))
    try:
        config = load(str(options.config_path))
        check_ports_free(config)
        return config
    except ConfigError as e:
        raise DemoError(f"{e}. A daemon already running? Stop it, pick other ports (--web-port, --proxy-port), "
                        f"or register the demo with it: ooidx [--config ITS_CONFIG] demo --attach (its config "
                        f'must allow the demo upstream: security.allow_hosts: ["127.0.0.1:{options.upstream_port}"])'
                        ) from None


@inlineCallbacks
def start_daemon(reactor: Any, options: DemoOptions, config: Any, out: TextIO) -> Any:
    """A daemon in this process with the demo config; fires with its call function."""
    from twisted.logger import globalLogBeginner

    from ooidx.node.daemon import Daemon
    from ooidx.node.logs import make_observer

    log_path = options.directory / "daemon.log"
    log_file = open(log_path, "a", encoding="utf-8")
    reactor.addSystemEventTrigger("after", "shutdown", log_file.close)
    globalLogBeginner.beginLoggingTo([make_observer(config, log_file)], discardBuffer=True,
                                     redirectStandardIO=False)
    fatal: List[int] = []
    daemon = Daemon(config, reactor=reactor, config_path=str(options.config_path),
                    on_fatal=lambda code: fatal.append(code))
    daemon.startService()
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    out.write(f"daemon: {_shown(options.config_path)}, log {_shown(log_path)}; "
              f"proxy 127.0.0.1:{options.proxy_port}, page http://127.0.0.1:{options.web_port}/\n")
    deadline = reactor.seconds() + START_TIMEOUT
    while not daemon.started:
        if fatal:
            raise DemoError(f"the daemon could not start; see {log_path}")
        if reactor.seconds() > deadline:
            raise DemoError(f"the daemon did not start within {START_TIMEOUT:g} s; see {log_path}")
        yield deferLater(reactor, 0.05, lambda: None)

    def call(service: str, op: str, kwargs: Dict[str, Any]) -> Deferred:
        return daemon.bus.call_with(service, op, kwargs)

    return call


def main(options: DemoOptions, out: TextIO = sys.stdout) -> Optional[str]:
    """Run the demo under the reactor until it stops (Ctrl-C); None, or
    why it could not run."""
    from twisted.internet import reactor

    problem: List[str] = []

    def failed(failure: Failure) -> None:
        problem.append(failure_text(failure, options))
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: run_demo(reactor, options, out).addErrback(failed))
    reactor.run()
    return problem[0] if problem else None


def failure_text(failure: Failure, options: DemoOptions) -> str:
    """One line: what went wrong, and for a refused upstream what to allow."""
    exc = failure.value
    if isinstance(exc, DemoError):
        return str(exc)
    remote_type = getattr(exc, "remote_type", None)  # magnet.RemoteError (in-process daemon)
    text = f"{remote_type}: {getattr(exc, 'message', exc)}" if remote_type else (str(exc) or type(exc).__name__)
    if "Forbidden" in text and options.attach is not None:
        text += (f"; the daemon's config must allow the demo upstream: security.allow_hosts: "
                 f'["127.0.0.1:{options.upstream_port}"]')
    return text
