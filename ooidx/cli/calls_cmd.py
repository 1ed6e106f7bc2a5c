"""C{ooidx call} (one operation of a component, its result printed) and
C{ooidx status} (which components answer, and where)."""
from __future__ import annotations

import json
from typing import Any, Dict, List

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
