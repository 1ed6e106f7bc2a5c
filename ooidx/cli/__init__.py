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

Adding a subcommand is one function and one registration, in a C{*_cmd}
module that this package imports::

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

The package: this module has the parser, the config and token look-up and
the run; L{ooidx.cli.registry} the registry, errors and L{Context};
L{ooidx.cli.client} the HTTP and broker clients; one C{*_cmd} module a
command (or a few close ones).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, TextIO, Tuple

from twisted.internet.defer import inlineCallbacks
from twisted.python.failure import Failure

from ooidx.cli.client import BrokerClient, HttpClient
from ooidx.cli.registry import (COMMANDS, CONFIG_ENV, DEFAULT_CONFIG, DEFAULT_PROXY, DEFAULT_URL, EXIT_ERROR,
                                EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, PROXY_ENV, TOKEN_ENV, URL_ENV, CliError,
                                Command, Context, Unreachable, UsageError, _outcome, arg, command)

# The commands register themselves on import, in this order (the order --help lists them in).
# Their functions are re-exported here, as ooidx.cli.NAME, for the callers that knew the one module.
from ooidx.cli.calls_cmd import call, format_status, parse_params, status  # noqa: F401
from ooidx.cli.datasets_cmd import datasets, format_datasets  # noqa: F401
from ooidx.cli.events_cmd import events_command, format_event  # noqa: F401
from ooidx.cli.subscriptions_cmd import (format_people_subscriptions, format_subscriptions,  # noqa: F401
                                         subscriptions)
from ooidx.cli.get_cmd import _own_url, download, get, progress_bar  # noqa: F401
from ooidx.cli.local_cmd import config_command, demo  # noqa: F401
from ooidx.cli.client import _json_of  # noqa: F401
from ooidx.cli.registry import HTTP_GRACE, RemoteFailure, _positive_seconds  # noqa: F401

__all__ = ["main", "run", "command", "arg", "Context", "COMMANDS", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_UNREACHABLE"]


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


_positive = _positive_seconds


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
