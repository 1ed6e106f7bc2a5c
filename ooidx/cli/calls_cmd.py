"""C{ooidx call} (one operation of a component, its result printed) and
C{ooidx status} (which components answer, and where)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

from twisted.internet.defer import inlineCallbacks

from ooidx.cli.registry import CliError, Context, UsageError, arg, command

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
    try:
        nodes = yield ctx.client.status()
    except CliError:
        # The status request goes over the bus: when the daemon cannot reach its
        # broker, its /healthz says why and since when; say that instead.
        line = broker_line(health_of(ctx.client))
        if line is None:
            raise
        raise CliError(line) from None
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


#: How long C{ooidx status} waits for /healthz after a failed status request.
HEALTH_TIMEOUT = 5.0


def health_of(client: Any) -> Optional[Dict[str, Any]]:
    """The daemon's /healthz body (a 503 answers one too), or None: a client
    over the bus (no web URL), no answer, or not a JSON object."""
    url = getattr(client, "url", None)
    if not isinstance(url, str):
        return None
    request = urllib.request.Request(url.rstrip("/") + "/healthz", headers={"Accept": "application/json",
                                                                           "User-Agent": "ooidx-cli"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(request, timeout=HEALTH_TIMEOUT) as response:
            body = response.read(64 * 1024)
    except urllib.error.HTTPError as e:
        try:
            body = e.read(64 * 1024)
        finally:
            e.close()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def broker_line(health: Optional[Dict[str, Any]]) -> Optional[str]:
    """One line on a daemon that cannot reach its broker (from its health:
    C{broker_error}, C{broker_down_since}), or None when its broker is up."""
    if not health or ("broker_error" not in health and "broker_down_since" not in health):
        return None
    since = health.get("broker_down_since")
    line = "broker unreachable" + (f" since {since}" if since else "")
    error = health.get("broker_error")
    return line + (f": {error}" if error else "") + " (the daemon's web port answers; its components wait for the broker)"


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
