"""The commands that run on this machine alone: C{ooidx demo} (unless
C{--attach}) and C{ooidx config init}."""
from __future__ import annotations

import argparse
import os
import urllib.parse
from typing import Any, Dict

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from ooidx.cli.registry import CliError, Context, UsageError, _outcome, _positive_seconds, arg, command

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
