"""C{ooidx datasets}: register, list, purge or refresh the exchange's datasets
(the controller's operations)."""
from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import inlineCallbacks

from ooidx.cli.registry import Context, UsageError, _positive_seconds, arg, command

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

