"""ooidx: the operator's command line.

    ooidx call fetcher ping
    ooidx call attribute_store get key=datasets/foo
    ooidx status
    ooidx --broker amqp://user:pass@rabbit/ status

It reaches the components through a running daemon's web port (C{--url},
else C{OOIDX_URL}, else C{http.web_port} of the daemon's config, else
http://127.0.0.1:8080) with the operator token (C{--token}, else
C{OOIDX_TOKEN}, else the token file the daemon keeps in the data directory of
its config), or, with C{--broker amqp://...}, straight through the broker.
The config is C{--config}, else C{OOIDX_CONFIG}, else C{etc/dx.yaml} when it
exists. C{ooidx demo} and C{ooidx config init} run on this machine alone.

Exit status: 0 done; 1 the daemon or a component answered with an error;
2 a usage error; 3 the daemon (or broker) cannot be reached.

Adding a subcommand is one function and one registration::

    @command("datasets", "list the registered datasets",
             arg("--pattern", default=".*", help="..."))
    @inlineCallbacks
    def datasets(ctx: Context) -> Any:
        result = yield ctx.client.call("controller", "datasets", {"pattern": ctx.args.pattern})
        ctx.print_json(result)

Commands talk to the daemon only through C{ctx.client}, whose methods return
Deferreds. Over HTTP they are already fired (the client is a plain blocking
urllib one; no reactor runs for a short command); with C{--broker} the
command runs in the reactor under L{twisted.internet.task.react}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.python.failure import Failure

__all__ = ["main", "run", "command", "arg", "Context", "COMMANDS", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_UNREACHABLE"]

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


# --------------------------------------------------------------------------- #
# subcommands


@command(
    "call", "call an operation of a component and print its JSON result",
    arg("service", help="the component, e.g. fetcher, attribute_store"),
    arg("op", help="the operation, e.g. ping"),
    arg("params", nargs="*", metavar="KEY=VALUE",
        help="keyword arguments; a value is JSON if it parses as JSON (1, true, null, [1,2], "
             "'\"text\"'), else a string"),
)
@inlineCallbacks
def call(ctx: Context) -> Any:
    kwargs = parse_params(ctx.args.params)
    result = yield ctx.client.call(ctx.args.service, ctx.args.op, kwargs)
    ctx.print_result(result)


@command(
    "status", "which components answer, and where (node, process)",
    arg("--json", action="store_true", help="print the daemons' status replies as JSON"),
)
@inlineCallbacks
def status(ctx: Context) -> Any:
    nodes = yield ctx.client.status()
    if ctx.args.json:
        ctx.print_json(nodes)
        return
    if not nodes:
        raise CliError("no daemon answered the status request")
    ctx.print(format_status(nodes))


def format_status(nodes: List[Dict[str, Any]]) -> str:
    """The status replies as a table: one row a component a node."""
    rows = [("NODE", "COMPONENT", "STARTED", "INSTANCES", "PROCESS", "PID")]
    for node in nodes:
        components = node.get("components") or {}
        for name in sorted(components):
            info = components[name]
            if not isinstance(info, dict):
                info = {"started": bool(info)}
            instances = info.get("instances")
            if "running" in info and instances is not None:
                instances = f"{info['running']}/{instances}"
            rows.append((str(node.get("node", "?")), name, "yes" if info.get("started") else "NO",
                         "-" if instances is None else str(instances), str(info.get("process") or "-"),
                         str(node.get("pid", "-"))))
        if not components:
            rows.append((str(node.get("node", "?")), "-", "-", "-", "-", str(node.get("pid", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


@command(
    "datasets", "register, list, purge or refresh the exchange's datasets",
    arg("action", choices=("register", "list", "purge", "refresh"),
        help="register NAME URL | list | purge NAME | refresh NAME (fetch it now)"),
    arg("name", nargs="?", help="the dataset's name: 1-64 characters of A-Z a-z 0-9 _ . -"),
    # not "url": that is the top-level --url, which a subcommand's dest would overwrite
    arg("base_url", nargs="?", metavar="URL", help="register: the dataset's base URL (no DAP suffix, no constraint)"),
    arg("--refresh", type=_positive_seconds, metavar="SECONDS",
        help="register: fetch the dataset again every SECONDS"),
    arg("--pattern", help="list: only the names this regular expression matches"),
    arg("--json", action="store_true", help="print the controller's answer as JSON"),
)
@inlineCallbacks
def datasets(ctx: Context) -> Any:
    args = ctx.args
    wants_name = args.action != "list"
    if wants_name and not args.name:
        raise UsageError(f"datasets {args.action} needs a NAME")
    if not wants_name and args.name:
        raise UsageError("datasets list takes no NAME (use --pattern)")
    if (args.action == "register") != (args.base_url is not None):
        raise UsageError("datasets register needs NAME and URL" if args.action == "register"
                         else f"datasets {args.action} takes no URL")
    if args.refresh is not None and args.action != "register":
        raise UsageError("--refresh goes with datasets register")
    if args.pattern is not None and args.action != "list":
        raise UsageError("--pattern goes with datasets list")
    if args.action == "register":
        kwargs: Dict[str, Any] = {"name": args.name, "url": args.base_url}
        if args.refresh is not None:
            kwargs["refresh"] = args.refresh
        result = yield ctx.client.call("controller", "register", kwargs)
        text = f"registered {result.get('name')}: {result.get('url')}"
        if result.get("refresh"):
            text += f" (refresh every {result['refresh']:g} s)"
    elif args.action == "list":
        result = yield ctx.client.call("controller", "list",
                                       {} if args.pattern is None else {"pattern": args.pattern})
        text = format_datasets(result) if result else "no datasets registered"
    elif args.action == "purge":
        result = yield ctx.client.call("controller", "purge", {"name": args.name})
        text = f"purged {result.get('name')}"
    else:
        result = yield ctx.client.call("controller", "get_dataset", {"name": args.name})
        text = f"fetching {result.get('name')} from {result.get('url')}"
    if args.json:
        ctx.print_json(result)
    else:
        ctx.print(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


@command(
    "events", "tail the exchange's events as they happen (Ctrl-C to stop)",
    arg("regex", nargs="?", default="", metavar="REGEX",
        help="only events whose topic this RE2 regex matches, e.g. '^event\\.saved\\.' (default: all)"),
    arg("--recent", type=int, default=0, metavar="N",
        help="first show the N most recent events (from notification; not with --broker)"),
    arg("--count", type=_count, metavar="N", help="stop after N events"),
    arg("--json", action="store_true", help="print each event as one line of JSON"),
)
def events_command(ctx: Context) -> Deferred:
    """Over HTTP: the web port's SSE tail (/api/events/stream), read as it
    comes (blocking, like the HTTP client). With --broker: a queue of its
    own on the notification fanout."""
    if not 0 <= ctx.args.recent <= 1000:
        return fail(UsageError("--recent takes 0 to 1000"))
    if isinstance(ctx.client, BrokerClient):
        return _events_on_broker(ctx)
    try:
        _events_over_http(ctx)
    except CliError as e:
        return fail(e)
    return succeed(None)


def format_event(event: Any) -> str:
    """One line: local time, topic, node, and the other details as JSON."""
    import time as _time

    if not isinstance(event, dict):
        return json.dumps(event)
    t = event.get("time")
    when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t)) if isinstance(t, (int, float)) else "-"
    details = {k: v for k, v in event.items() if k not in ("time", "topic", "kind", "dataset", "node")}
    line = f"{when}  {event.get('topic', '?')}  {event.get('node', '-')}"
    return line + ("  " + json.dumps(details, ensure_ascii=False, sort_keys=True) if details else "")


def _show_event(ctx: Context, event: Any) -> None:
    ctx.print(json.dumps(event, ensure_ascii=False) if ctx.args.json else format_event(event))
    ctx.stdout.flush()


def _events_over_http(ctx: Context) -> None:
    client = ctx.client
    query = {"regex": ctx.args.regex}
    if ctx.args.recent:
        query["recent"] = str(ctx.args.recent)
    url = f"{client.url}/api/events/stream?{urllib.parse.urlencode(query)}"
    headers = {"Accept": "text/event-stream", "User-Agent": "ooidx-cli"}
    if client.token:
        headers["Authorization"] = f"Bearer {client.token}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        # keep-alive comments come every 15 s; 60 s of silence means the daemon is gone
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=60.0)
    except urllib.error.HTTPError as e:
        try:
            raise client._http_error(e, True) from None
        finally:
            e.close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Unreachable(f"cannot reach the daemon at {client.url}: {getattr(e, 'reason', e)}"
                          f"{client.where_hint()}") from None
    seen = 0
    data: List[str] = []
    with response:
        while True:
            try:
                raw = response.readline(1024 * 1024)
            except (OSError, ValueError) as e:
                raise Unreachable(f"the event stream from {client.url} broke: {e}") from None
            if not raw:
                raise Unreachable(f"the daemon at {client.url} closed the event stream")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                text, data = "\n".join(data), []
                try:
                    event = json.loads(text)
                except ValueError:
                    continue
                _show_event(ctx, event)
                seen += 1
                if ctx.args.count is not None and seen >= ctx.args.count:
                    return


def _events_on_broker(ctx: Context) -> Deferred:
    from ooidx import events as dx_events

    if ctx.args.recent:
        return fail(UsageError("--recent needs the web port (leave out --broker)"))
    done: Deferred = Deferred()
    seen = [0]

    def handler(event: Any) -> None:
        if done.called:
            return
        _show_event(ctx, event)
        seen[0] += 1
        if ctx.args.count is not None and seen[0] >= ctx.args.count:
            done.callback(None)

    def subscribed(subscription: Any) -> Deferred:
        return done.addBoth(lambda result: subscription.cancel().addCallback(lambda _: result))

    def refused(failure: Failure) -> Any:
        from ooidx.errors import InvalidRegex
        if failure.check(InvalidRegex):
            raise UsageError(str(failure.value))
        return failure

    d = ctx.client.bus.when_connected()
    d.addCallback(lambda _: dx_events.subscribe(ctx.client.bus, ctx.args.regex or ".", handler))
    return d.addCallbacks(subscribed, refused)


def format_datasets(records: List[Dict[str, Any]]) -> str:
    """Dataset records as a table: one row a dataset."""
    import time as _time

    def when(t: Any) -> str:
        if not isinstance(t, (int, float)):
            return "-"
        return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t))

    rows = [("NAME", "STATUS", "URL", "REFRESH", "LAST FETCH", "HITS", "MISSES")]
    for r in records:
        refresh = r.get("refresh")
        rows.append((str(r.get("name", "?")), str(r.get("status", "?")), str(r.get("url", "?")),
                     f"{refresh:g}s" if isinstance(refresh, (int, float)) else "-", when(r.get("last_fetch")),
                     str(r.get("hits", 0)), str(r.get("misses", 0))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


@command(
    "subscriptions", "list pub_sub's subscriptions (regex -> address), and people's",
    arg("--no-people", action="store_true",
        help="only pub_sub's, not people's subscriptions (user_pub_sub, user_notification)"),
    arg("--json", action="store_true",
        help='print {"pub_sub": [...], "people": [...]} as JSON'),
)
@inlineCallbacks
def subscriptions(ctx: Context) -> Any:
    subs = yield ctx.client.call("pub_sub", "list", {})
    people: List[Dict[str, Any]] = []
    if not ctx.args.no_people:
        for service in ("user_pub_sub", "user_notification"):
            try:
                found = yield ctx.client.call(service, "list", {})
            except Unreachable:
                raise
            except CliError as e:  # that service is not running, or has no such operation
                ctx.stderr.write(f"note: {service}: {e}\n")
                continue
            people.extend(r for r in found or [] if isinstance(r, dict))
    if ctx.args.json:
        ctx.print_json({"pub_sub": subs, "people": people})
        return
    ctx.print(format_subscriptions(subs) if subs else "no pub_sub subscriptions")
    if people:
        ctx.print()
        ctx.print(format_people_subscriptions(people))


def _table(rows: List[Tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_subscriptions(subs: List[Dict[str, Any]]) -> str:
    """pub_sub's subscriptions as a table: one row a subscription."""
    rows = [("NAME", "REGEX", "ADDRESS")]
    rows.extend((str(s.get("name", "?")), str(s.get("regex", "?")), str(s.get("address", "?"))) for s in subs)
    return _table(rows)


def format_people_subscriptions(records: List[Dict[str, Any]]) -> str:
    """People's subscriptions as a table."""
    rows = [("PERSON", "ID", "KIND", "REGEX", "WEBHOOK")]
    rows.extend((str(r.get("person", "?")), str(r.get("id", "?")), str(r.get("kind", "?")), str(r.get("regex", "?")),
                 str(r.get("webhook") or "-")) for r in records)
    return _table(rows)


def parse_params(params: List[str]) -> Dict[str, Any]:
    """C{["key=value", ...]} as keyword arguments: each value JSON if it parses, else a string."""
    kwargs: Dict[str, Any] = {}
    for param in params:
        key, sep, raw = param.partition("=")
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, got {param!r}")
        if key in kwargs:
            raise UsageError(f"{key} given twice")
        try:
            kwargs[key] = json.loads(raw, parse_constant=_no_constant)
        except ValueError:
            kwargs[key] = raw
    return kwargs


def _no_constant(name: str) -> Any:
    raise ValueError(name)



@command(
    "get", "download a URL through the exchange's proxy into a file, with a progress bar",
    arg("target", metavar="URL",
        help="/datasets/NAME.SUFFIX?CONSTRAINT, the exchange's own http://HOST:PORT/datasets/... URL, "
             "or any other http(s):// URL (asked of the proxy as a forward proxy)"),
    arg("-o", "--output", required=True, metavar="FILE",
        help="the file to write (a temporary file beside it, renamed once complete); - for stdout"),
    arg("--proxy", metavar="URL", help=f"the exchange's proxy (default: ${PROXY_ENV}, else http.proxy_port of "
                                       f"--config, else {DEFAULT_PROXY})"),
    arg("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal"),
)
def get(ctx: Context) -> Deferred:
    """Blocking, like the HTTP client: the download runs to its end before the Deferred fires."""
    try:
        size, path = download(ctx)
    except CliError as e:
        return fail(e)
    ctx.stderr.write(f"{size} bytes -> {path}\n")
    return succeed(None)


def download(ctx: Context) -> Tuple[int, str]:
    """Stream the target through the proxy into the output file; (bytes, path)."""
    import http.client
    import tempfile
    import time

    args = ctx.args
    proxy = args.proxy or ctx.environ.get(PROXY_ENV) or ctx.proxy
    parts = urllib.parse.urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"--proxy must be an http:// URL, got {proxy!r}")
    target = args.target
    own = _own_url(target, proxy)
    if own is not None:  # the exchange's own URL (http://127.0.0.1:8100/datasets/NAME.dods): asked of it directly
        proxy, target = own
        parts = urllib.parse.urlsplit(proxy)
    if target.startswith("/"):
        request_target = target
    elif target.startswith(("http://", "https://")):
        request_target = target  # absolute-URI: the proxy serves it as a forward proxy
    else:
        raise UsageError(f"URL must be http://..., https://... or /datasets/NAME.SUFFIX, got {target!r}")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in request_target):
        raise UsageError("URL has characters that must be percent-encoded")
    wait = args.timeout if args.timeout is not None else 60.0
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=wait)
    to_stdout = args.output == "-"
    tmp: Any = None
    received = 0
    try:
        try:
            conn.putrequest("GET", request_target, skip_host=True, skip_accept_encoding=True)
            host = urllib.parse.urlsplit(target).netloc if not target.startswith("/") else parts.netloc
            conn.putheader("Host", host)
            conn.putheader("User-Agent", "ooidx-get")
            conn.endheaders()
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"cannot reach the proxy at {proxy}: {e}") from None
        if response.status != 200:
            text = response.read(4096).decode("utf-8", "replace").strip()
            kind = response.getheader("X-Ooidx-Error") or f"HTTP {response.status}"
            raise RemoteFailure(kind, text or response.reason, response.status)
        length = response.getheader("Content-Length")
        total = int(length) if length and length.isdigit() else None
        show = args.progress or (hasattr(ctx.stderr, "isatty") and ctx.stderr.isatty())
        if to_stdout:
            out = getattr(ctx.stdout, "buffer", None)
            if out is None:
                raise UsageError("-o - needs a binary stdout")
        else:
            directory = os.path.dirname(os.path.abspath(args.output))
            tmp = tempfile.NamedTemporaryFile(dir=directory, prefix="." + os.path.basename(args.output) + ".",
                                              suffix=".part", delete=False)
            out = tmp
        started = last = time.monotonic()
        while True:
            try:
                chunk = response.read(64 * 1024)
            except (OSError, http.client.HTTPException) as e:
                raise CliError(f"transfer failed after {received} bytes: {type(e).__name__}: {e}") from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            now = time.monotonic()
            if show and now - last >= 0.1:
                last = now
                ctx.stderr.write("\r" + progress_bar(received, total, now - started))
                ctx.stderr.flush()
        if total is not None and received != total:
            raise CliError(f"transfer failed: {received} of {total} bytes arrived")
        if show:
            ctx.stderr.write("\r" + progress_bar(received, total, time.monotonic() - started) + "\n")
        if tmp is not None:
            tmp.flush()
            os.fsync(tmp.fileno())
            tmp.close()
            os.replace(tmp.name, args.output)
            tmp = None
        else:
            out.flush()
        return received, args.output
    finally:
        conn.close()
        if tmp is not None:
            tmp.close()
            try:
                os.unlink(tmp.name)
            except OSError:
                pass


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _own_url(target: str, proxy: str) -> Optional[Tuple[str, str]]:
    """(proxy, /datasets/... path) when C{target} is an URL of an exchange's
    proxy itself, else None: such a URL is not forwarded, it is the request.
    An URL under /datasets/ is one when it names the proxy's host (or both
    are loopback) and port, or any loopback port (an exchange on other ports
    than the config's: forwarding to loopback would be refused anyway)."""
    if not target.startswith("http://"):
        return None
    try:
        t, p = urllib.parse.urlsplit(target), urllib.parse.urlsplit(proxy)
        t_port, p_port = t.port or 80, p.port or 80
    except ValueError:
        return None
    if not t.path.startswith("/datasets/") or not t.hostname or not p.hostname:
        return None
    same = t_port == p_port and t.hostname.lower() == p.hostname.lower()
    if not (same or _is_loopback(t.hostname)):
        return None
    return f"http://{t.netloc}", t.path + (f"?{t.query}" if t.query else "")


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def progress_bar(done: int, total: Optional[int], elapsed: float, width: int = 30) -> str:
    """One line: a bar when the total is known, bytes and rate either way."""
    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
            n /= 1024
        return f"{n:.1f} GiB"

    rate = f"{size(done / elapsed)}/s" if elapsed > 0 else ""
    if total:
        filled = min(width, int(width * done / total))
        return f"[{'#' * filled}{' ' * (width - filled)}] {size(done)} / {size(total)} {100 * done // total:3d}% {rate}"
    return f"{size(done)} {rate}"


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


@command(
    "demo", "serve sample datasets from a DAP upstream on loopback and put them through an exchange",
    arg("--dir", default="ooidx-demo", metavar="DIR",
        help="where the demo keeps its config (demo.yaml), data and log (default: ./ooidx-demo)"),
    arg("--attach", action="store_true",
        help="register with the daemon already running (--url/--config) instead of starting one; its config "
             "must allow the upstream: security.allow_hosts: [\"127.0.0.1:PORT\"]"),
    arg("--upstream-port", type=_port, default=8099, metavar="PORT", help="the demo upstream's port (8099)"),
    arg("--web-port", type=_port, default=8080, metavar="PORT", help="the demo daemon's web port (8080)"),
    arg("--proxy-port", type=_port, default=8100, metavar="PORT", help="the demo daemon's proxy port (8100)"),
    arg("--every", type=_positive_seconds, default=60.0, metavar="SECONDS",
        help="refresh period, and how often the sample files get new values (60)"),
)
def demo(ctx: Context) -> Deferred:
    """Runs the reactor until Ctrl-C (ooidx.demo.run); its Deferred fires after."""
    from ooidx.demo.run import DemoOptions, main as demo_main

    args = ctx.args
    if args.every < 1:
        return fail(UsageError("--every takes 1 second or more (the shortest refresh period)"))
    options = DemoOptions(directory=args.dir, upstream_port=args.upstream_port, web_port=args.web_port,
                          proxy_port=args.proxy_port, every=args.every)
    if args.attach:
        client = ctx.client

        def blocking_call(service: str, op: str, kwargs: Dict[str, Any]) -> Any:
            outcome = _outcome(client.call(service, op, kwargs))
            if isinstance(outcome, Failure):
                outcome.raiseException()
            return outcome

        options.attach = blocking_call
        options.config_hint = ctx.config_path or ""
        web, proxy = urllib.parse.urlsplit(client.url), urllib.parse.urlsplit(ctx.proxy)
        options.web_port, options.proxy_port = web.port or 80, proxy.port or 80
    problem = demo_main(options, ctx.stdout)
    return fail(CliError(problem)) if problem else succeed(None)


@command(
    "config", "write an example config, commented key by key",
    arg("action", choices=("init",), help="init PATH: write the example config to PATH"),
    arg("path", metavar="PATH", help="the file to write (its directory is made; an existing file is kept)"),
    arg("--example", default="dx", metavar="NAME",
        help="which example: dx (one node, embedded bus; the default), dx-rabbitmq, node-edge, node-worker"),
    arg("--force", action="store_true", help="overwrite PATH if it exists"),
)
def config_command(ctx: Context) -> Deferred:
    from ooidx import examples

    args = ctx.args
    try:
        text = examples.init_text(args.example)
    except KeyError:
        return fail(UsageError(f"no example config {args.example!r}; there are {', '.join(examples.NAMES)}"))
    if os.path.exists(args.path) and not args.force:
        return fail(CliError(f"{args.path} exists; keeping it (--force overwrites it)"))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.path)), exist_ok=True)
        with open(args.path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        return fail(CliError(f"cannot write {args.path}: {e.strerror or e}"))
    ctx.print(f"wrote {args.path} (the {args.example} example); start with: twistd -n ooidx --config {args.path}")
    return succeed(None)


# --------------------------------------------------------------------------- #
# clients


class HttpClient:
    """The daemon's web API, with a blocking urllib client. Its methods
    return already-fired Deferreds, so commands run without a reactor."""

    def __init__(self, url: str, token: Optional[str], timeout: Optional[float] = None,
                 config_path: Optional[str] = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        #: the config this command read (its ports, its token): named in errors that say to edit a config
        self.config_path = config_path
        #: whether C{url} is the config's web port (not --url or OOIDX_URL)
        self.url_from_config = False

    def call(self, service: str, op: str, kwargs: Dict[str, Any]) -> Deferred:
        path = "/api/call/{}/{}".format(urllib.parse.quote(service, safe=""), urllib.parse.quote(op, safe=""))
        if self.timeout is not None:
            path += "?" + urllib.parse.urlencode({"timeout": f"{self.timeout:g}"})
        body = json.dumps(kwargs).encode("utf-8")
        return self._request("POST", path, body, authorize=True).addCallback(self._result)

    def status(self) -> Deferred:
        def nodes(answer: Tuple[str, bytes]) -> Any:
            value = _json_of(answer[1], "/api/status")
            if not isinstance(value, dict) or not isinstance(value.get("nodes"), list):
                raise RemoteFailure("BadReply", "the status answer has no list of nodes")
            return value["nodes"]

        return self._request("GET", "/api/status", None, authorize=False).addCallback(nodes)

    def _result(self, answer: Tuple[str, bytes]) -> Any:
        content_type, body = answer
        if content_type.split(";")[0].strip() == "application/octet-stream":
            return body
        value = _json_of(body, "the call")
        if not isinstance(value, dict) or "result" not in value:
            raise RemoteFailure("BadReply", "the answer has no result")
        return value["result"]

    def _request(self, method: str, path: str, body: Optional[bytes], *, authorize: bool) -> Deferred:
        """(content type, body) of a 200 answer, as a fired Deferred."""
        headers = {"Accept": "application/json", "User-Agent": "ooidx-cli"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if authorize and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + path
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        wait = None if self.timeout is None else self.timeout + HTTP_GRACE
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        try:
            with opener.open(request, timeout=wait if wait is not None else 60.0) as response:
                return succeed((response.headers.get("Content-Type", ""), response.read()))
        except urllib.error.HTTPError as e:
            try:
                return fail(self._http_error(e, authorize))
            finally:
                e.close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, socket.timeout) or isinstance(e, socket.timeout):
                reason = f"no answer within {wait or 60.0:g} s"
            return fail(Unreachable(f"cannot reach the daemon at {self.url}: {reason}{self.where_hint()}"))

    def where_hint(self) -> str:
        """Why this URL: what to check when no daemon answers there."""
        if self.config_path and self.url_from_config:
            return (f" (the web port of {self.config_path}; is that daemon running? "
                    f"twistd -n ooidx --config {self.config_path})")
        return (" (is a daemon running? `twistd -n ooidx --config FILE` or `ooidx demo` starts one; "
                "--config FILE or --url tell where it listens)")

    def _http_error(self, e: urllib.error.HTTPError, authorize: bool) -> CliError:
        try:
            info = json.loads(e.read(64 * 1024))["error"]
            kind, message = str(info["type"]), str(info["message"])
        except (ValueError, KeyError, TypeError, OSError):
            kind, message = f"HTTP {e.code}", str(e.reason)
        if "security.allow_hosts" in message and self.config_path:
            message += f" (the config this command read: {os.path.abspath(self.config_path)})"
        if e.code == 401 and authorize and not self.token:
            message += (f" (no token found: set {TOKEN_ENV}, pass --token, or run on the daemon's machine "
                        "with --config pointing at its config)")
        return RemoteFailure(kind, message, e.code)


def _json_of(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteFailure("BadReply", f"the answer to {what} is not JSON") from None


class BrokerClient:
    """Straight through the broker with magnet: for RabbitMQ, where the bus
    does not live inside one daemon."""

    def __init__(self, bus: Any, timeout: Optional[float] = None, status_timeout: float = 1.5) -> None:
        self.bus = bus
        self.timeout = timeout
        self.status_timeout = status_timeout

    def call(self, service: str, op: str, kwargs: Dict[str, Any]) -> Deferred:
        from ooidx.wire import operations_address
        return self.bus.call_with(operations_address(service), op, kwargs,
                                  timeout=self.timeout).addErrback(self._translate)

    def status(self) -> Deferred:
        from ooidx.node.daemon import cluster_status
        return cluster_status(self.bus, self.status_timeout).addErrback(self._translate)

    @staticmethod
    def _translate(failure: Failure) -> Any:
        import magnet
        exc = failure.value
        if isinstance(exc, magnet.RemoteError):
            raise RemoteFailure(exc.remote_type, exc.message)
        if isinstance(exc, (magnet.NotConnected, magnet.ConnectionLost)):
            raise Unreachable(f"cannot reach the broker: {exc}")
        if isinstance(exc, magnet.MagnetError):
            raise RemoteFailure(type(exc).__name__, str(exc))
        if isinstance(exc, TypeError):
            raise UsageError(str(exc))
        return failure


# --------------------------------------------------------------------------- #
# the parser and the run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ooidx", description="Operate a Data Exchange: call its components, see what runs where.",
        epilog="exit status: 0 done, 1 an error answer, 2 usage, 3 the daemon or broker cannot be reached")
    p.add_argument("--url", help=f"the daemon's web port (default: ${URL_ENV}, else http.web_port of --config, "
                                 f"else {DEFAULT_URL})")
    p.add_argument("--token", help=f"the operator token (default: ${TOKEN_ENV}, else the token file "
                                   "in the data directory of --config)")
    p.add_argument("--config", help=f"the daemon's config: its web and proxy ports and its token file "
                                    f"(default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--broker", metavar="AMQP_URL",
                   help="go straight to this amqp:// broker instead of through the web port")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS",
                   help="how long a call may take (default: the daemon's RPC timeout)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, options in cmd.arguments:
            sp.add_argument(*flags, **options)
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def config_path_of(args: argparse.Namespace, environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    """--config, else OOIDX_CONFIG, else etc/dx.yaml when it exists (run from a checkout), else None."""
    if args.config is not None:
        return args.config
    if environ and environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def load_cli_config(path: Optional[str], environ: Dict[str, str]) -> Any:
    """The daemon's config, for its ports and data directory; None without one."""
    if path is None:
        return None
    from ooidx.config import ConfigError, load
    try:
        return load(path, environ=environ)
    except ConfigError as e:
        hint = ""
        if not os.path.exists(path):
            hint = (f" (the daemon's config, for its ports and token: pass --config FILE, or make one with "
                    f"`ooidx config init {path}`)")
        raise UsageError(f"{e}{hint}") from None


def _http_host(interface: str) -> str:
    """Where to reach a port that listens on C{interface}."""
    if interface in ("", "0.0.0.0"):
        return "127.0.0.1"
    if interface == "::":
        return "[::1]"
    return f"[{interface}]" if ":" in interface else interface


def endpoints(args: argparse.Namespace, environ: Dict[str, str], config: Any) -> Tuple[str, str]:
    """(web URL, proxy URL): --url / --proxy, else OOIDX_URL / OOIDX_PROXY,
    else the config's http.web_port / http.proxy_port, else the defaults."""
    web, proxy = DEFAULT_URL, DEFAULT_PROXY
    if config is not None:
        host = _http_host(config.http.interface)
        web, proxy = f"http://{host}:{config.http.web_port}", f"http://{host}:{config.http.proxy_port}"
    url = args.url or environ.get(URL_ENV) or web
    return url, environ.get(PROXY_ENV) or proxy


def find_cli_token(args: argparse.Namespace, environ: Dict[str, str],
                   config_path: Optional[str] = None) -> Optional[str]:
    """--token, else OOIDX_TOKEN, else the daemon's token file (via --config or etc/dx.yaml)."""
    if args.token:
        return args.token
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    if config_path is None:
        config_path = config_path_of(args, environ)
    if config_path is None:
        return None
    from ooidx.config import ConfigError
    from ooidx.node.token import TokenError, find_token
    try:
        return find_token(config_path)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except TokenError as e:
        raise CliError(str(e)) from None


def run(argv: Optional[List[str]] = None, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
        environ: Optional[Dict[str, str]] = None) -> int:
    """Run one command; its exit status."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    environ = dict(os.environ if environ is None else environ)
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    cmd = COMMANDS[args.command]
    try:
        if args.broker and cmd.name in LOCAL_COMMANDS:
            raise UsageError(f"{cmd.name} does not go through --broker; leave it out")
        if cmd.name in LOCAL_COMMANDS and not _needs_daemon(args):
            ctx = Context(args, None, stdout, stderr, environ, config_path=args.config)
            return _exit_status(_outcome(cmd.run(ctx)), stderr)
        if args.broker:
            return _run_on_broker(cmd, args, stdout, stderr, environ)
        config_path = config_path_of(args, environ)
        config = load_cli_config(config_path, environ)
        url, proxy = endpoints(args, environ, config)
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--url must be an http:// or https:// URL, got {url!r}")
        token = find_cli_token(args, environ, config_path) if _needs_token(cmd) else None
        client = HttpClient(url, token, args.timeout, config_path)
        client.url_from_config = config is not None and not (args.url or environ.get(URL_ENV))
        ctx = Context(args, client, stdout, stderr, environ, proxy=proxy, config_path=config_path)
        return _exit_status(_outcome(cmd.run(ctx)), stderr)
    except CliError as e:
        return _report(e, stderr)
    except KeyboardInterrupt:
        return 130


#: Commands that run on this machine (no daemon to reach, unless _needs_daemon says so).
LOCAL_COMMANDS = ("config", "demo")


def _needs_daemon(args: argparse.Namespace) -> bool:
    return args.command == "demo" and bool(getattr(args, "attach", False))


def _outcome(d: Deferred) -> Any:
    outcome: List[Any] = []
    d.addBoth(outcome.append)
    if not outcome:  # pragma: no cover - an HTTP command waited on something that is not the client
        raise CliError("the command did not finish")
    return outcome[0]


def _needs_token(cmd: Command) -> bool:
    # Reading (status) is open; anything else asks for the token, and the
    # token file is only looked for when it is needed.
    return cmd.name not in ("status", "get")


def _run_on_broker(cmd: Command, args: argparse.Namespace, stdout: TextIO, stderr: TextIO,
                   environ: Dict[str, str]) -> int:
    scheme = args.broker.split("://", 1)[0].lower() if "://" in args.broker else ""
    if scheme not in ("amqp", "amqps"):
        raise UsageError("--broker takes an amqp:// or amqps:// URL; a memory:// bus lives inside its daemon, "
                         "reach it with --url")
    from twisted.internet import task

    import magnet

    codes: List[int] = []

    @inlineCallbacks
    def main(reactor: Any) -> Any:
        options: Dict[str, Any] = {"node": "ooidx-cli"}
        if args.timeout is not None:
            options.update(rpc_timeout=args.timeout, connect_timeout=args.timeout)
        try:
            bus = magnet.connect(args.broker, reactor, **options)
        except magnet.BadURL as e:
            codes.append(_report(UsageError(str(e)), stderr))
            return
        bus.startService()
        try:
            try:
                yield bus.when_connected(args.timeout if args.timeout is not None else 10.0)
            except magnet.MagnetError as e:
                raise Unreachable(f"cannot reach the broker: {e}") from None
            ctx = Context(args, BrokerClient(bus, args.timeout), stdout, stderr, environ)
            yield cmd.run(ctx)
            codes.append(EXIT_OK)
        except CliError as e:
            codes.append(_report(e, stderr))
        except Exception:
            codes.append(_exit_status(Failure(), stderr))
        finally:
            yield bus.stopService()

    try:
        task.react(main)
    except SystemExit as e:
        if not codes:
            return int(e.code or 0) or EXIT_ERROR
    return codes[0] if codes else EXIT_ERROR


def _exit_status(outcome: Any, stderr: TextIO) -> int:
    if not isinstance(outcome, Failure):
        return EXIT_OK
    if outcome.check(CliError):
        return _report(outcome.value, stderr)
    stderr.write(f"error: unexpected {outcome.type.__name__}: {outcome.getErrorMessage()}\n")
    return EXIT_ERROR


def _report(error: CliError, stderr: TextIO) -> int:
    stderr.write(f"error: {error}\n")
    return error.code


def main(argv: Optional[List[str]] = None) -> None:
    """The C{ooidx} console script."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
