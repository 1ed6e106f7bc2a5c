"""C{ooidx subscriptions}: pub_sub's subscriptions and people's, as tables."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.internet.defer import inlineCallbacks

from ooidx.cli.registry import CliError, Context, Unreachable, arg, command

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
