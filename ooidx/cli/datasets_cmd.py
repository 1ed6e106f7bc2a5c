"""C{ooidx datasets}: register, list, purge or refresh the exchange's datasets
(the controller's operations)."""
from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import inlineCallbacks

from ooidx.cli.registry import Context, UsageError, _positive_seconds, arg, command

@command(
    "datasets", "register, list, purge or refresh the exchange's datasets",
    arg("action", choices=("register", "list", "show", "purge", "refresh"),
        help="register NAME URL | list | show NAME | purge NAME | refresh NAME (fetch it now)"),
    arg("name", nargs="?", help="the dataset's name: 1-64 characters of A-Z a-z 0-9 _ . -"),
    # not "url": that is the top-level --url, which a subcommand's dest would overwrite
    arg("base_url", nargs="?", metavar="URL", help="register: the dataset's base URL (no DAP suffix, no constraint)"),
    arg("--refresh", type=_positive_seconds, metavar="SECONDS",
        help="register: fetch the dataset again every SECONDS"),
    arg("--no-check", dest="no_check", action="store_true",
        help="register: do not fetch the .dds and .das first (an upstream that is down for now)"),
    arg("--replace", action="store_true", help="register: move a registered NAME to another URL"),
    arg("--expect-every", dest="expect_every", type=_positive_seconds, metavar="SECONDS",
        help="register: the dataset updates every SECONDS; flagged stale after 1.5x that with no new version"),
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
    if (args.no_check or args.replace or args.expect_every is not None) and args.action != "register":
        raise UsageError("--no-check, --replace and --expect-every go with datasets register")
    if args.pattern is not None and args.action != "list":
        raise UsageError("--pattern goes with datasets list")
    if args.action == "register":
        kwargs: Dict[str, Any] = {"name": args.name, "url": args.base_url}
        if args.refresh is not None:
            kwargs["refresh"] = args.refresh
        if args.expect_every is not None:
            kwargs["expect_every"] = args.expect_every
        if args.no_check:
            kwargs["check"] = False
        if args.replace:
            kwargs["replace"] = True
        result = yield ctx.client.call("controller", "register", kwargs)
        text = f"registered {result.get('name')}: {result.get('url')}"
        if result.get("refresh"):
            text += f" (refresh every {result['refresh']:g} s)"
        if result.get("replaced"):
            text += f" (replaced {result['replaced']})"
    elif args.action == "show":
        result = yield ctx.client.call("controller", "get", {"name": args.name})
        text = format_record(result)
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


def format_datasets(records: List[Dict[str, Any]]) -> str:
    """Dataset records as a table: one row a dataset."""
    import time as _time

    def when(t: Any) -> str:
        if not isinstance(t, (int, float)):
            return "-"
        return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t))

    rows = [("NAME", "STATUS", "URL", "REFRESH", "LAST FETCH", "HITS", "MISSES", "LAST ERROR")]
    for r in records:
        refresh = r.get("refresh")
        status = str(r.get("status", "?")) + (" (stale)" if r.get("stale") else "")
        rows.append((str(r.get("name", "?")), status, str(r.get("url", "?")),
                     f"{refresh:g}s" if isinstance(refresh, (int, float)) else "-", when(r.get("last_fetch")),
                     str(r.get("hits", 0)), str(r.get("misses", 0)), last_error(r, when)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)



def last_error(record: Dict[str, Any], when: Any = None) -> str:
    """The record's last_error as one line: "TIME REASON", or "-"."""
    error = record.get("last_error")
    if not isinstance(error, dict) or not error.get("reason"):
        return "-"
    reason = " ".join(str(error["reason"]).split())[:200]
    stamp = when(error.get("time")) if when is not None else ""
    return f"{stamp} {reason}".strip()


def format_record(record: Dict[str, Any]) -> str:
    """One dataset record, a field a line (C{datasets show})."""
    import time as _time

    def when(t: Any) -> str:
        if not isinstance(t, (int, float)):
            return "-"
        return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t))

    lines = [f"name: {record.get('name')}", f"url: {record.get('url')}",
             f"status: {record.get('status')}" + (" (stale: no new version in time)" if record.get("stale") else ""),
             f"last fetch: {when(record.get('last_fetch'))}", f"versions: {record.get('versions', 0)}",
             f"size: {record.get('size', 0)}"]
    for key in ("refresh", "expect_every"):
        if isinstance(record.get(key), (int, float)):
            lines.append(f"{key.replace('_', ' ')}: {record[key]:g} s")
    lines.append(f"last error: {last_error(record, when)}")
    return "\n".join(lines)
