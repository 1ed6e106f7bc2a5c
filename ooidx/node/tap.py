"""twistd ooidx: the command-line options and the service they make.

    twistd -n ooidx --config etc/dx.yaml [--broker amqp://user:pw@host/vhost]

A config problem (malformed YAML, an unknown key or component, a wrong type,
a port in use) ends twistd with one line on stderr and exit status 1, before
anything starts. A component that fails to start later stops the node and
the process exits with status 1 (see L{exit_status_after_twistd}); after a
clean stop (SIGTERM) the status is 0.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Callable

from twisted.logger import globalLogPublisher
from twisted.python import usage

from ooidx.config import ConfigError, check_ports_free, load
from ooidx.node.daemon import Daemon
from ooidx.node.limits import raise_open_files
from magnet.errors import MagnetError

from ooidx.node.logs import make_observer, redactor

DEFAULT_CONFIG = "etc/dx.yaml"


class Options(usage.Options):
    synopsis = "[--config FILE] [--broker URL]"
    longdesc = ("Run one node of the OOI Data Exchange. The broker URL comes from --broker, "
                "then OOIDX_BROKER in the environment, then the config file.")
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The node's YAML config file."],
        ["broker", "b", None, "The broker URL (overrides OOIDX_BROKER and the file). "
                              "Prefer OOIDX_BROKER for a URL with a password: argv is public."],
    ]


def makeService(options: Options) -> Daemon:
    from twisted.internet import reactor

    try:
        config = load(options["config"], broker_override=options["broker"])
        check_ports_free(config)
    except ConfigError as e:
        # twistd has not started logging yet: this line goes to stderr, status 1
        raise SystemExit(f"ooidx: {e}{missing_config_hint(options['config'])}") from None
    observer = make_observer(config, _log_output(options))
    open_files = raise_open_files()  # said (and warned about when low) in the start log
    try:
        daemon = Daemon(config, reactor=reactor, config_path=options["config"], log_observer=observer,
                        on_fatal=lambda code: reactor.callWhenRunning(reactor.stop), open_files=open_files)
    except MagnetError as e:  # a broker URL the transport cannot use
        raise SystemExit(f"ooidx: {config.source}: broker: {redactor(str(e))}") from None
    reactor.addSystemEventTrigger("after", "shutdown", exit_status_after_twistd,
                                  lambda: daemon.exit_code or 0)
    return daemon


def missing_config_hint(path: str) -> str:
    """What to do when the config file cannot be read: how to make one (an
    installed ooidx has no etc/; the examples ship in the package)."""
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return ""
    from ooidx import examples
    return (f"; make one with `ooidx config init {path}` (a commented example: {examples.path('dx')}), "
            f"or pass --config FILE")


def _log_output(options: Options) -> IO[str]:
    """Where twistd would log: stdout in the foreground (-n) unless --logfile
    names a file, twistd.log when daemonized."""
    server = getattr(options, "parent", None) or {}
    logfile = server.get("logfile") if hasattr(server, "get") else None
    nodaemon = server.get("nodaemon") if hasattr(server, "get") else True
    if logfile == "-" or (not logfile and nodaemon):
        return sys.stdout
    from twisted.python.logfile import LogFile
    return LogFile.fromFullPath(os.path.abspath(logfile or "twistd.log"))  # type: ignore[return-value]


#: The last thing twistd does after its reactor stopped and its pid file is gone.
#: (Logged by twistd's AppLogger or a subclass of it, such as UnixAppLogger.)
_TWISTD_LAST_EVENT = "Server Shut Down."


def exit_status_after_twistd(code: Callable[[], int]) -> None:
    """Make the process exit with C{code()} once twistd is done.

    twistd cannot set an exit status (twisted/twisted#11335): after the reactor
    stops it removes its pid file, logs "Server Shut Down." and returns (or,
    after a signal, kills itself with that signal again, so SIGTERM would
    read as status 143). Called after the reactor's shutdown, so after the
    node's own log observer is in place, this adds an observer that raises
    C{SystemExit(code())} at that final event; the log publisher catches only
    C{Exception}, so the process exits with the status after an orderly
    shutdown, instead of C{os._exit} halfway through it. A requested stop
    (SIGTERM) that went cleanly is status 0; a node that could not start, 1.
    """

    def observer(event: dict) -> None:
        namespace = str(event.get("log_namespace", ""))
        if (event.get("log_format") == _TWISTD_LAST_EVENT and namespace.startswith("twisted.")
                and namespace.endswith("AppLogger")):
            globalLogPublisher.removeObserver(observer)
            raise SystemExit(code())

    globalLogPublisher.addObserver(observer)
