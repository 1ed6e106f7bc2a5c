"""C{ooidx events}: tail the exchange's events as they happen, over the web
port's SSE stream or, with C{--broker}, on a queue of its own."""
from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, List

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from ooidx.cli.client import BrokerClient
from ooidx.cli.registry import CliError, Context, Unreachable, UsageError, arg, command

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
