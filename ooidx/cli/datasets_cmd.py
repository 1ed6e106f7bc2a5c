"""C{ooidx datasets}: register, list, purge or refresh the exchange's datasets
(the controller's operations), and read what their saved versions say
changed (C{versions}, through the web port's C{/api/datasets/NAME/versions}
or, with C{--broker}, the persister's worker queue)."""
from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, inlineCallbacks

from ooidx.cli.client import HttpClient
from ooidx.cli.registry import Context, RemoteFailure, UsageError, _positive_seconds, arg, command

#: Versions listed unless --limit says otherwise; the most the web port gives.
DEFAULT_VERSIONS, MAX_VERSIONS = 100, 1000

@command(
    "datasets", "register, list, purge or refresh the exchange's datasets, or read their saved versions",
    arg("action", choices=("register", "list", "show", "purge", "refresh", "versions"),
        help="register NAME URL | list | show NAME | purge NAME | refresh NAME (fetch it now) | "
             "versions NAME (its saved versions and what each changed)"),
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
    arg("--diff", nargs=2, metavar=("V1", "V2"),
        help="versions: what changed from version V1 to V2 (either may be 'latest')"),
    arg("--limit", type=int, metavar="N",
        help=f"versions: the last N versions (default {DEFAULT_VERSIONS}, at most {MAX_VERSIONS})"),
    arg("--json", action="store_true", help="print the answer (the controller's, or the versions') as JSON"),
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
    if (args.diff is not None or args.limit is not None) and args.action != "versions":
        raise UsageError("--diff and --limit go with datasets versions")
    if args.diff is not None and args.limit is not None:
        raise UsageError("--limit goes with the list of versions, not with --diff")
    if args.limit is not None and not 1 <= args.limit <= MAX_VERSIONS:
        raise UsageError(f"--limit is a whole number from 1 to {MAX_VERSIONS}")
    if args.action == "versions":
        if args.diff is not None:
            result = yield _versions_diff(ctx, args.name, args.diff[0], args.diff[1])
            text = format_diff(result)
        else:
            result = yield _versions_list(ctx, args.name, args.limit)
            text = format_versions(result)
    elif args.action == "register":
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


def _web_get(client: HttpClient, path: str) -> Deferred:
    """The JSON answer of a GET on the daemon's web API (errors: the client's)."""
    def parsed(answer: Any) -> Any:
        try:
            return json.loads(answer[1])
        except ValueError:
            raise RemoteFailure("BadReply", f"the answer to {path.split('?')[0]} is not JSON") from None

    return client._request("GET", path, None, authorize=True).addCallback(parsed)


def _quoted(*parts: str) -> str:
    return "/".join(urllib.parse.quote(p, safe="") for p in parts)


@inlineCallbacks
def _versions_list(ctx: Context, name: str, limit: Optional[int]) -> Any:
    """{"dataset", "versions": [manifest, ...]}, oldest first."""
    if isinstance(ctx.client, HttpClient):
        path = f"/api/datasets/{_quoted(name)}/versions"
        if limit is not None:
            path += "?" + urllib.parse.urlencode({"limit": limit})
        answer = yield _web_get(ctx.client, path)
        if not isinstance(answer, dict) or not isinstance(answer.get("versions"), list):
            raise RemoteFailure("BadReply", "the answer has no list of versions")
        return answer
    manifests = yield ctx.client.call("persister", "versions",
                                      {"name": name, "limit": limit or DEFAULT_VERSIONS})
    manifests = list(manifests or [])
    if not manifests:
        yield ctx.client.call("controller", "get", {"name": name})  # UnknownDataset if it is not registered
    return {"dataset": name, "versions": manifests}


@inlineCallbacks
def _versions_diff(ctx: Context, name: str, before: str, after: str) -> Any:
    """{"dataset", "diff": change summary} from version C{before} to C{after}."""
    if isinstance(ctx.client, HttpClient):
        answer = yield _web_get(ctx.client, f"/api/datasets/{_quoted(name)}/versions/{_quoted(before)}/diff/"
                                            f"{_quoted(after)}")
        if not isinstance(answer, dict) or not isinstance(answer.get("diff"), dict):
            raise RemoteFailure("BadReply", "the answer has no diff")
        return answer
    summary = yield ctx.client.call("persister", "diff", {"name": name, "before": before, "after": after})
    return {"dataset": name, "diff": summary}


def _size(n: Any) -> str:
    """Bytes in binary units, as the CLI prints them elsewhere."""
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


def _utc(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def format_versions(answer: Dict[str, Any]) -> str:
    """A dataset's versions, one line each: id, saved (UTC), size of its
    files, and what changed from the version before it."""
    manifests = [m for m in answer.get("versions") or [] if isinstance(m, dict)]
    if not manifests:
        return f"no saved versions of {answer.get('dataset')}"
    rows = []
    for m in manifests:
        files = m.get("files") if isinstance(m.get("files"), dict) else {}
        total = sum(f.get("bytes") or 0 for f in files.values()
                    if isinstance(f, dict) and isinstance(f.get("bytes"), int))
        changes = m.get("changes") if isinstance(m.get("changes"), dict) else {}
        rows.append((str(m.get("version", "?")), _utc(m.get("saved")), _size(total if files else None),
                     _one_line(changes.get("text")) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(r[:3], widths)] + [r[3]]) for r in rows)


def format_diff(answer: Dict[str, Any]) -> str:
    """A diff of two versions: a header line, then each change on a line of
    its own (the summary's text, then the attribute changes it lists)."""
    diff = answer.get("diff") or {}
    lines = [f"{answer.get('dataset')}: {diff.get('from') or '-'} → {diff.get('to') or '-'}"]
    text = _one_line(diff.get("text"))
    lines.extend(f"  {part}" for part in text.split("; ") if part)
    attributes = diff.get("attributes") if isinstance(diff.get("attributes"), dict) else {}
    for kind, sign in (("changed", "~"), ("added", "+"), ("removed", "-")):
        for a in attributes.get(kind) or []:
            if not isinstance(a, dict):
                continue
            where = f"{a.get('variable') or 'global'}.{a.get('name')}"
            if kind == "changed":
                before, after = a.get("before") or {}, a.get("after") or {}
                value = f"{_shown(before)} → {_shown(after)}"
            else:
                value = _shown(a)
            lines.append(f"  {sign} {where}: {value}")
    if attributes.get("more"):
        lines.append(f"  … {attributes['more']} more attribute change(s)")
    return "\n".join(lines)


def _shown(typed: Dict[str, Any]) -> str:
    value = typed.get("value")
    shown = value if isinstance(value, str) else json.dumps(value)
    return _one_line(f"{typed.get('type')} {shown}")[:300]


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
