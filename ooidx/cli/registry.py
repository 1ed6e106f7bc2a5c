"""The subcommand registry of the C{ooidx} command, and what every command
shares: its exit statuses and errors, its defaults, and the L{Context} a
command runs with."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from twisted.internet.defer import Deferred

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon or a component answered with an error
EXIT_USAGE = 2  # argparse's own
EXIT_UNREACHABLE = 3  # no daemon (or broker) answered at all

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = os.path.join("etc", "dx.yaml")
URL_ENV = "OOIDX_URL"
CONFIG_ENV = "OOIDX_CONFIG"
DEFAULT_PROXY = "http://127.0.0.1:8100"
PROXY_ENV = "OOIDX_PROXY"
TOKEN_ENV = "OOIDX_TOKEN"
#: How much longer than the call's own timeout the HTTP client waits for the daemon's answer.
HTTP_GRACE = 5.0


# --------------------------------------------------------------------------- #
# errors


class CliError(Exception):
    """Ends the command with C{code}; C{str()} is printed after C{error: }."""

    code = EXIT_ERROR


class UsageError(CliError):
    code = EXIT_USAGE


class Unreachable(CliError):
    code = EXIT_UNREACHABLE


class RemoteFailure(CliError):
    """The daemon or a component answered with an error."""

    code = EXIT_ERROR

    def __init__(self, kind: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status


# --------------------------------------------------------------------------- #
# the subcommand registry


@dataclass
class Command:
    name: str
    help: str
    run: Callable[["Context"], Any]
    arguments: Tuple[Tuple[tuple, dict], ...] = ()


#: Every subcommand, by name, in the order registered.
COMMANDS: Dict[str, Command] = {}


def arg(*flags: str, **options: Any) -> Tuple[tuple, dict]:
    """One argument of a subcommand: what C{ArgumentParser.add_argument} takes."""
    return flags, options


def command(name: str, help: str, *arguments: Tuple[tuple, dict]) -> Callable[[Callable], Callable]:
    """Register C{function(ctx)} as the subcommand C{name}. It returns a
    Deferred (write it with C{@inlineCallbacks}) and talks to the daemon
    through C{ctx.client}; raise L{CliError} (or let the client's raise) to
    fail with its exit status."""

    def register(function: Callable[["Context"], Any]) -> Callable[["Context"], Any]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        COMMANDS[name] = Command(name, help, function, tuple(arguments))
        return function

    return register


@dataclass
class Context:
    """What a subcommand gets: its arguments, a client, where to write."""

    args: argparse.Namespace
    client: Any
    stdout: TextIO
    stderr: TextIO
    environ: Dict[str, str] = field(default_factory=dict)
    #: the exchange's proxy: --proxy, else OOIDX_PROXY, else the config's http.proxy_port, else the default
    proxy: str = DEFAULT_PROXY
    #: the config file that was read (--config, or etc/dx.yaml when it exists), if any
    config_path: Optional[str] = None

    def print(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def print_json(self, value: Any) -> None:
        self.print(json.dumps(value, indent=2, ensure_ascii=False))

    def print_result(self, value: Any) -> None:
        """A call's result: JSON pretty-printed; bytes as they are."""
        if isinstance(value, (bytes, bytearray)):
            self.stdout.flush()
            out = getattr(self.stdout, "buffer", None)
            if out is not None:
                out.write(value)
                out.flush()
            else:  # a text-only stream (tests): show the bytes readably
                self.stdout.write(bytes(value).decode("utf-8", "backslashreplace"))
            return
        self.print_json(value)


def _outcome(d: Deferred) -> Any:
    """The result (or Failure) of a Deferred that has already fired: an HTTP command's."""
    outcome: List[Any] = []
    d.addBoth(outcome.append)
    if not outcome:  # pragma: no cover - an HTTP command waited on something that is not the client
        raise CliError("the command did not finish")
    return outcome[0]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value
