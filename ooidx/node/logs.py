"""The daemon's logging: one line per event, text or JSON, and never a secret.

    observer = make_observer(config, sys.stdout)               # ILogObserver
    globalLogBeginner.beginLoggingTo([observer])               # or let twistd do it

Every line names the node and the component that logged it: the event's
C{component} field (components pass C{component=self.name}), else the
process's own component (a child process runs one), else the short form of
the logging namespace (C{magnet.amqp}, C{ooidx.node.daemon}).

Text::

    2024-05-01T12:00:00.123Z info     edge-1 fetcher: fetcher started on edge-1 (2 instance(s))

JSON lines: one object a line with C{time}, C{level}, C{node}, C{component},
C{namespace}, C{message} (and C{traceback} when a failure is logged).

No secret reaches the output: every line is passed through L{Redactor},
which masks the password of any C{scheme://user:password@} URL, the value of
a C{?ticket=} query parameter (a person's stream ticket; the web edge masks
it in its access log already) and every literal secret it knows (the broker
passwords, the operator token; code that learns a new secret, such as a
generated token, calls L{add_secret}).
"""
from __future__ import annotations

import json
import re
import time
from typing import IO, Any, Callable, Iterable, List, Optional, Set
from urllib.parse import unquote, urlsplit

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
                            PredicateResult, formatEvent)
from zope.interface import implementer

__all__ = ["Redactor", "LineObserver", "make_observer", "add_secret", "secrets_of", "redactor",
           "LEVELS", "OutOfFilesDigest"]

#: The config's level names -> twisted.logger levels.
LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

#: scheme://user:password@  ->  scheme://user:***@
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):(?P<password>[^\s@/]*)@")
MASK = "***"
#: the user name of a URL whose password is masked already
_MASKED_USER = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?P<user>[^\s:/@]*):\*\*\*@")
#: ?ticket=VALUE / &ticket=VALUE  ->  ?ticket=***
_TICKET_QUERY = re.compile(r"(?P<head>[?&;]ticket=)(?P<value>[^\s&;#\"'<>]+)", re.IGNORECASE)

#: The namespace under which the daemon's L{ooidx.node.daemon.ChildProcesses}
#: logs its children's output: their stdout lines are already formatted,
#: filtered and redacted log lines, and are relayed as they are.
CHILD_OUTPUT_NAMESPACE = "ooidx.node.daemon.ChildProcesses"


class Redactor:
    """Masks URL passwords and the literal secrets it has been told about."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: Set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: Optional[str]) -> None:
        """Never show C{secret} (too short a string is ignored: masking it would
        mangle ordinary words)."""
        if secret and len(secret) >= 4 and secret != MASK:
            self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + ":" + MASK + "@", text)
        text = _TICKET_QUERY.sub(lambda m: m.group("head") + MASK, text)
        # A URL's user name shows as it is, its password as ***, whatever they
        # are: the literal secrets are masked everywhere but in the user name
        # (so guest:guest reads guest:*** like guest:wrong, not ***:***).
        parts = []
        at = 0
        for m in _MASKED_USER.finditer(text):
            parts.append(self._literal(text[at:m.start("user")]))
            parts.append(m.group("user"))
            at = m.end("user")
        parts.append(self._literal(text[at:]))
        return "".join(parts)

    def _literal(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):  # longest first
            if secret in text:
                text = text.replace(secret, MASK)
        return text


#: The process's redactor: every observer made here uses it.
redactor = Redactor()


def add_secret(secret: Optional[str]) -> None:
    """Keep C{secret} (for example a generated operator token) out of every log line."""
    redactor.add(secret)


def secrets_of(config: Any) -> List[str]:
    """The secrets a L{ooidx.config.Config} holds: broker passwords (as written
    and percent-decoded), database passwords, the operator token."""
    found: List[str] = []
    urls = list(getattr(config, "broker", ()) or ())
    store = getattr(config, "components", {}).get("attribute_store") if config is not None else None
    if store is not None and getattr(store, "options", None) is not None:
        urls.append(store.options.url)
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            found += [password, unquote(password)]
    token = getattr(getattr(config, "security", None), "token", None)
    if token:
        found.append(token)
    return found


def _short_namespace(namespace: str) -> str:
    """C{magnet.amqp.AMQPTransport} -> C{magnet.amqp}: the module, not the class."""
    parts = namespace.split(".")
    if len(parts) > 1 and parts[-1][:1].isupper():
        parts = parts[:-1]
    return ".".join(parts) or "-"


def _timestamp(event: dict) -> str:
    t = event.get("log_time") or time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line of text or one JSON object, redacted."""

    def __init__(self, out: IO[str], *, node: str, format: str = "text", component: Optional[str] = None,
                 redact: Optional[Callable[[str], str]] = None) -> None:
        if format not in ("text", "json"):
            raise ValueError(f"log format must be 'text' or 'json', not {format!r}")
        self.out = out
        self.node = node
        self.format = format
        self.component = component
        self.redact = redact if redact is not None else redactor

    def fields(self, event: dict) -> dict:
        level = event.get("log_level")
        namespace = event.get("log_namespace") or "-"
        component = event.get("component") or self.component
        if not component and namespace == CHILD_OUTPUT_NAMESPACE and event.get("tag"):
            component = str(event["tag"]).rsplit(".", 1)[0]  # a child's stderr: fetcher.0 -> fetcher
        if not component:
            component = _short_namespace(namespace)
        message = formatEvent(event) if event.get("log_format") is not None or "log_text" in event else ""
        if not message and "message" in event:  # legacy log.msg
            message = " ".join(str(m) for m in event["message"])
        fields = {
            "time": _timestamp(event),
            "level": level.name if level is not None else "info",
            "node": self.node,
            "component": str(component),
            "namespace": namespace,
            "message": self.redact(message),
        }
        failure = event.get("log_failure")
        if failure is not None:
            try:
                traceback = failure.getTraceback()
            except Exception:  # noqa: BLE001 - a broken failure must not break logging
                traceback = repr(failure)
            fields["traceback"] = self.redact(traceback)
            if not fields["message"]:
                fields["message"] = self.redact(failure.getErrorMessage())
        return fields

    def line(self, event: dict) -> str:
        f = self.fields(event)
        if self.format == "json":
            return json.dumps(f, ensure_ascii=False, default=str)
        text = f"{f['time']} {f['level']:<8} {f['node']} {f['component']}: {f['message']}"
        if "traceback" in f:
            # one event, one line: the traceback follows, its line breaks shown as " | "
            text += " | " + " | ".join(line for line in f["traceback"].splitlines() if line.strip())
        return text.replace("\n", "\\n").replace("\r", "\\r")

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == CHILD_OUTPUT_NAMESPACE and "line" in event:
            line = str(event["line"]).rstrip("\r")
            if not line.strip():  # procmon ends every child's output with an empty line
                return
            if _is_child_line(event):
                self.out.write(self.redact(line) + "\n")
                self.out.flush()
                return
        self.out.write(self.line(event) + "\n")
        self.out.flush()


def _is_child_line(event: dict) -> bool:
    return (event.get("log_namespace") == CHILD_OUTPUT_NAMESPACE and event.get("stream") == "stdout"
            and "line" in event and event.get("log_format") == "[{tag}] {line}")


def _child_lines(event: dict) -> PredicateResult:
    """A child's line passed its own level filter already."""
    return PredicateResult.yes if _is_child_line(event) else PredicateResult.maybe


#: Twisted's listening ports log these, one per connection, when the process is out of open files.
_EMFILE_NAMESPACE = "twisted.internet.tcp"
_EMFILE_CLOSED = "EMFILE recovery: Closed socket"
_ACCEPT_FAILED = "Could not accept new connection"
_OUT_OF_FILES = ("EMFILE", "ENFILE")
#: Seconds between two lines saying connections were closed for want of open files.
EMFILE_DIGEST_SECONDS = 10.0


@implementer(ILogObserver)
class OutOfFilesDigest:
    """Twisted's answer to a process out of open files is to accept each new
    connection and close it at once while it has a descriptor in reserve,
    and else to leave it waiting in the kernel and try again at the next
    turn of the reactor, logging a line each time (measured: 16779 lines in
    15 s with 500 clients and a limit of 300, and 16259 "Could not accept
    new connection (EMFILE)" lines in 18 s in another run). Those lines are
    counted here instead, and one warning says the counts at most every
    L{EMFILE_DIGEST_SECONDS} (the first at once), with what to do
    (ooidx.node.limits)."""

    def __init__(self, observer: ILogObserver, interval: float = EMFILE_DIGEST_SECONDS) -> None:
        self.observer = observer
        self.interval = interval
        self.closed = 0  # connections closed for want of files, since the start
        self.failed = 0  # accept() calls that failed for want of files, since the start
        self._unsaid = [0, 0]
        self._said_at: Optional[float] = None

    def __call__(self, event: dict) -> None:
        fmt = event.get("log_format")
        if not (isinstance(fmt, str) and str(event.get("log_namespace", "")).startswith(_EMFILE_NAMESPACE)):
            self.observer(event)
            return
        if fmt.startswith(_EMFILE_CLOSED):
            self.closed += 1
            self._unsaid[0] += 1
        elif fmt.startswith(_ACCEPT_FAILED) and event.get("acceptError") in _OUT_OF_FILES:
            self.failed += 1
            self._unsaid[1] += 1
        elif fmt.startswith(("EMFILE", "Re-reserving EMFILE")):
            return  # the lines around the closed ones say nothing the count does not
        else:
            self.observer(event)
            return
        now = event.get("log_time") or time.time()
        if self._said_at is not None and now - self._said_at < self.interval:
            return
        self.observer({
            "log_level": LogLevel.warn, "log_namespace": "ooidx.node.limits", "log_time": now,
            "log_format": "out of open files: {closed} new connection(s) accepted and closed at once, {failed} "
                          "accept(s) failed since the last such line ({closed_total} and {failed_total} in all); "
                          "raise the open files limit (ulimit -n, LimitNOFILE=) or spread the clients over more "
                          "nodes",
            "closed": self._unsaid[0], "failed": self._unsaid[1], "closed_total": self.closed,
            "failed_total": self.failed})
        self._unsaid = [0, 0]
        self._said_at = now


def make_observer(config: Any, out: IO[str], *, component: Optional[str] = None,
                  level: Optional[str] = None, format: Optional[str] = None) -> ILogObserver:
    """The observer for a L{ooidx.config.Config}: its format and level, its
    node's name, its secrets kept out of every line."""
    for secret in secrets_of(config):
        redactor.add(secret)
    line = LineObserver(out, node=config.node, format=format or config.logging.format, component=component)
    threshold = LEVELS[level or config.logging.level]
    return OutOfFilesDigest(FilteringLogObserver(
        line, [_child_lines, LogLevelFilterPredicate(defaultLogLevel=threshold)]))
