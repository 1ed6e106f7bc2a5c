"""The daemon's configuration: a YAML file made into a validated, frozen `Config`.

    config = load("etc/dx.yaml", broker_override=options["broker"])

Every problem raises `ConfigError`, whose ``str()`` is one line naming the file,
the key path and what is wrong::

    etc/dx.yaml: components.fetcher.instances: expected an integer >= 1, got 'four'

Unknown keys are errors, never ignored. The broker URL comes from, in order of
precedence: the ``broker_override`` argument (``--broker``), the ``OOIDX_BROKER``
environment variable, the file, the default ``memory://``. Secrets (the broker
password, the operator token) never appear in an error message, and only appear
in `Config.to_dict` when asked for with ``redact=False``.

Relative paths (``data_dir``) resolve against the directory of the config file,
not the current directory, so a daemon started by systemd from ``/`` and one
started by hand from a checkout read the same files. A relative sqlite path for
the attribute store resolves against ``data_dir``.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import yaml

from ooidx.http.listen import BadEndpoint, parse_listen
from ooidx.wire import COMPONENT_NAMES, LISTENING

__all__ = [
    "COMPONENTS",
    "AttributeStoreOptions",
    "CacheOptions",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "CsvOptions",
    "WebhookOptions",
    "FetcherOptions",
    "HttpConfig",
    "ListenOptions",
    "ProxyOptions",
    "Listener",
    "LoggingConfig",
    "RetriesConfig",
    "SecurityConfig",
    "TimeoutsConfig",
    "cache_max_age",
    "check_ports_free",
    "component_arguments",
    "fetch_timeout",
    "listen_of",
    "load",
    "parse",
    "redact_url",
]

#: Every DX component a node can run, in a stable (alphabetical) order (the
#: component table is L{ooidx.wire.COMPONENTS}).
COMPONENTS: Tuple[str, ...] = COMPONENT_NAMES

#: Components that listen on a TCP port (one instance per node).
LISTENING_COMPONENTS: Tuple[str, ...] = LISTENING

BROKER_ENV = "OOIDX_BROKER"
DEFAULT_BROKER = "memory://"
BROKER_SCHEMES = ("memory", "amqp", "amqps")
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_SUBSCRIPTION_NAME = NODE_NAME  # the same rule as pub_sub's subscription names
HOST_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)
MIN_TOKEN_LENGTH = 16
#: The largest integer any setting takes (a signed 64-bit value).
MAX_INTEGER = (1 << 63) - 1
#: AMQP's basic.qos prefetch-count is an unsigned short.
MAX_PREFETCH = 65535


def _allow_host_entry(entry: str) -> bool:
    """host, *.domain, IPv4, IPv6 (bare or [v6]), each optionally with :PORT."""
    port = ""
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket:
            return False
        host, is_v6 = inside, True
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
    elif entry.count(":") > 1:
        host, is_v6 = entry, True
    else:
        host, _, port = entry.partition(":")
        is_v6 = False
        if ":" in entry and not port:
            return False
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        return False
    if is_v6:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= 253 and bool(HOST_NAME.match(host))
GiB = 1 << 30


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line: ``file: key: what is wrong``."""

    def __init__(self, filename: str, key: Optional[str], message: str) -> None:
        self.filename = filename
        self.key = key or None
        self.message = " ".join(str(message).split())
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key:
            return f"{self.filename}: {self.key}: {self.message}"
        return f"{self.filename}: {self.message}"


# --------------------------------------------------------------------------- #
# The frozen configuration


@dataclass(frozen=True)
class HttpConfig:
    # A port is a number or an endpoint string (ooidx.http.listen): tcp:8080:interface=..., ssl:8443:privateKey=...
    proxy_port: Any = 8100  # the DAP proxy (proxyng)
    web_port: Any = 8080  # the management page, API, /healthz, /metrics (web)
    interface: str = "127.0.0.1"  # "" or "0.0.0.0" listens on every IPv4 address
    # Host names both ports answer for besides loopback and the address reached (DNS rebinding)
    allowed_hosts: Tuple[str, ...] = ()
    # /metrics labels this many datasets (the most requested) by name; the rest are summed under "other"
    metrics_datasets: int = 50


@dataclass(frozen=True)
class TimeoutsConfig:
    rpc: float = 30.0  # an RPC call's reply
    send: float = 30.0  # a publisher confirm
    shutdown: float = 10.0  # graceful stop before giving up on in-flight work
    connect: float = 10.0  # one broker connection attempt
    heartbeat: float = 10.0  # AMQP heartbeat interval; 0 turns heartbeats off


@dataclass(frozen=True)
class RetriesConfig:
    limit: int = 3  # handler retries of one message before it is dead-lettered


@dataclass(frozen=True)
class SecurityConfig:
    token: Optional[str] = None  # operator token; None: made at first start in data_dir
    allow_hosts: Tuple[str, ...] = ()  # hosts the fetcher may reach; empty: any public host
    allow_private: bool = False  # allow fetching from private / loopback addresses
    # reading the management API (/api/datasets, ...) needs the token too; None: unless the web port is on loopback
    read_token: Optional[bool] = None


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"  # "text" or "json" (JSON lines)
    level: str = "info"  # "debug", "info", "warn", "error"
    access: bool = False  # an access log line per HTTP request (web and proxy ports)


@dataclass(frozen=True)
class AttributeStoreOptions:
    url: str  # an absolute sqlite file path, or a postgresql:// URL


@dataclass(frozen=True)
class CacheOptions:
    max_bytes: int = GiB  # total size of the store
    max_age: float = 300.0  # seconds a stored response stays fresh


@dataclass(frozen=True)
class FetcherOptions:
    max_redirects: int = 5
    max_bytes: int = 10 * GiB  # largest response fetched
    timeout: float = 60.0  # seconds without progress before a fetch fails
    # transfers running at once in one fetcher process, whatever the bus prefetch: a fetch
    # request is settled as soon as its transfer starts, so how fast a client reads never
    # holds a message slot; past this many, new requests wait in the queue
    max_transfers: int = 64


@dataclass(frozen=True)
class CsvOptions:
    """How the csv component writes what the upstream sent.

    ``formula_escape`` (default true): a text cell that a spreadsheet would
    read as a formula (it starts with ``= + - @``, a tab or a CR) goes out with
    a ``'`` in front, OWASP's rule for CSV injection; false writes every cell
    exactly as the upstream sent it (ooidx.datapath.csv.escape_cell)."""

    formula_escape: bool = True


@dataclass(frozen=True)
class PersisterOptions:
    """Which pub_sub subscription this persister consumes, and how it asks again
    for a version it could not save (a full disk, a broken stream)."""

    subscription: str = "persister"  # same name: share the work; another name: a full copy of its own
    retry_after: float = 60.0  # seconds before the first new attempt; doubles per failure of a dataset
    retry_max: float = 900.0  # seconds: the longest wait between attempts


@dataclass(frozen=True)
class WebhookOptions:
    """user_notification / user_pub_sub: how people's webhooks are delivered (ooidx.people.webhooks)."""

    webhook_attempts: int = 8  # POSTs of one message before it is given up (backing off 1 s, 2 s, 4 s, ...)
    webhook_disable_after: int = 20  # failed attempts in a row after which a webhook is disabled
    webhook_verify_timeout: float = 5.0  # seconds a callback has to answer its challenge
    webhook_log_size: int = 50  # attempts kept in a webhook's delivery log
    webhook_disabled_ttl: float = 604800.0  # seconds a disabled webhook waits to be verified again, then goes; 0: for ever


@dataclass(frozen=True)
class ListenOptions:
    """proxyng / web: None means "take it from the ``http`` section"."""

    port: Any = None  # a number or an endpoint string
    interface: Optional[str] = None


@dataclass(frozen=True)
class ProxyOptions(ListenOptions):
    """proxyng: where it listens, and how much one client may hold."""

    max_per_client: int = 100  # requests in progress from one client address; more are answered 429
    stall_timeout: float = 5.0  # seconds a client may leave its answer unread before it is cut off


@dataclass(frozen=True)
class ComponentConfig:
    name: str
    instances: int = 1  # consumers (inline) or processes (child)
    process: str = "inline"  # "inline" or "child"
    options: Any = None  # one of the *Options classes above, or None


@dataclass(frozen=True)
class Listener:
    """A TCP port a component on this node will listen on."""

    component: str
    interface: str
    port: int
    key: str  # the key path the port came from, for error messages


@dataclass(frozen=True)
class Config:
    source: str = field(compare=False)  # the config file's name, as given (for errors)
    node: str
    broker: Tuple[str, ...]  # one URL, or several amqp(s) URLs of one cluster
    broker_origin: str = field(compare=False)  # "--broker", "OOIDX_BROKER", "file", "default"
    components: Mapping[str, ComponentConfig]  # the components this node runs
    data_dir: str  # absolute
    http: HttpConfig = field(default_factory=HttpConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    prefetch: int = 10
    queue_type: str = "classic"  # "classic" or "quorum"
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    __hash__ = None  # type: ignore[assignment]  # components is a read-only mapping

    @property
    def is_memory(self) -> bool:
        return self.broker[0].startswith("memory:")

    def runs(self, component: str) -> bool:
        return component in self.components

    def redacted_broker(self) -> str:
        """The broker URL(s), password replaced by ``***``, comma-separated: for logs."""
        return ", ".join(redact_url(url) for url in self.broker)

    def listeners(self) -> Tuple[Listener, ...]:
        """The TCP ports this node's components listen on."""
        found = []
        for name, port_key in (("proxyng", "proxy_port"), ("web", "web_port")):
            component = self.components.get(name)
            if component is None:
                continue
            options: ListenOptions = component.options
            if options.port is not None:
                port, key = options.port, f"components.{name}.port"
            else:
                port, key = getattr(self.http, port_key), f"http.{port_key}"
            interface = options.interface if options.interface is not None else self.http.interface
            spec = parse_listen(port, interface, read_files=False)
            found.append(Listener(name, spec.interface, spec.port, key))
        return tuple(found)

    def to_dict(self, *, redact: bool = True) -> Dict[str, Any]:
        """Plain data in the config file's own shape (JSON / YAML friendly): with
        ``redact=False``, `parse` of its YAML gives back an equal Config. Secrets (broker
        and database passwords, the token) are ``***`` unless ``redact=False``."""

        def plain(value: Any) -> Any:
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        out = {
            f.name: plain(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("source", "broker_origin")
        }
        for settings in out["components"].values():  # the file's flat shape
            del settings["name"]
            settings.update(settings.pop("options") or {})
        out["broker"] = out["broker"][0] if len(out["broker"]) == 1 else out["broker"]
        if redact:
            out["broker"] = (
                [redact_url(u) for u in out["broker"]]
                if isinstance(out["broker"], list)
                else redact_url(out["broker"])
            )
            if out["security"]["token"] is not None:
                out["security"]["token"] = "***"
            store = out["components"].get("attribute_store")
            if store:
                store["url"] = redact_url(store["url"])
        return out


# What each component is given ------------------------------------------------------------
#
# Read and validate apart from assembling (as Tahoe-LAFS does): the loader
# above makes a checked Config; the node builds each component from the
# typed arguments below. A component never holds the whole config: it gets
# its own section's options and the few shared facts it needs, by name.


def listen_of(config: Config, name: str) -> Tuple[Any, str]:
    """(port or endpoint string, interface) where edge C{name} listens: its own
    options if set, else the C{http} section."""
    port_key = {"proxyng": "proxy_port", "web": "web_port"}[name]
    component = config.components.get(name)
    options = component.options if component is not None else None
    port = getattr(options, "port", None)
    if port is None:
        port = getattr(config.http, port_key)
    interface = getattr(options, "interface", None)
    if interface is None:
        interface = config.http.interface
    return port, interface


def fetch_timeout(config: Config) -> float:
    """The fetcher's no-progress timeout, as configured (the answer timeouts of
    the proxy and the csv component follow it); the default where no fetcher
    is configured here."""
    component = config.components.get("fetcher")
    options = component.options if component is not None else None
    return (options or FetcherOptions()).timeout


def cache_max_age(config: Config) -> float:
    """How long the cache keeps an answer fresh (the proxy holds none longer)."""
    component = config.components.get("cache")
    options = component.options if component is not None else None
    return (options or CacheOptions()).max_age


def component_arguments(config: Config, name: str) -> Dict[str, Any]:
    """The typed keyword arguments component C{name} is built with.

    Each names what it is: C{options} (the component's own section, one of
    the *Options classes), C{security} (L{SecurityConfig}), a directory, a
    timeout, where an edge listens. The component table (L{ooidx.wire}) says
    which class takes them."""
    component = config.components.get(name)
    options = component.options if component is not None else None
    if name == "attribute_store":
        url = options.url if options is not None else os.path.join(config.data_dir, "attributes.sqlite3")
        return {"url": url}
    if name == "cache":
        return {"options": options or CacheOptions(), "directory": os.path.join(config.data_dir, "cache")}
    if name == "controller":
        return {"security": config.security}
    if name in ("user_pub_sub", "user_notification"):
        return {"options": options or WebhookOptions(), "security": config.security}
    if name == "csv":
        return {"options": options or CsvOptions(), "fetch_timeout": fetch_timeout(config)}
    if name == "fetcher":
        return {"options": options or FetcherOptions(), "security": config.security,
                "shutdown_timeout": config.timeouts.shutdown}
    if name == "persister":
        return {"options": options or PersisterOptions(), "data_dir": config.data_dir}
    if name == "proxyng":
        port, interface = listen_of(config, name)
        return {"options": options or ProxyOptions(), "port": port, "interface": interface,
                "allowed_hosts": config.http.allowed_hosts, "fetch_timeout": fetch_timeout(config),
                "rpc_timeout": config.timeouts.rpc, "cache_max_age": cache_max_age(config),
                "access_log": config.logging.access}
    if name == "web":
        port, interface = listen_of(config, name)
        return {"port": port, "interface": interface, "allowed_hosts": config.http.allowed_hosts,
                "read_token": config.security.read_token, "access_log": config.logging.access}
    return {}


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


# --------------------------------------------------------------------------- #
# Loading and parsing


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no arbitrary objects) that also refuses duplicate keys,
    which plain safe_load silently resolves to the last value."""


def _construct_mapping(loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: Dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # unhashable key: let the base constructor report it
            break
        if first is not None:
            raise _DuplicateKey(
                None,
                None,
                f"duplicate key {_repr(key)} (first at line {first.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _construct_object(loader: _SafeLoader, node: yaml.Node, deep: bool = False) -> Any:
    """SafeLoader's, with a scalar that does not make a value of its type (the
    date 2001-13-01, ``!!int abc``, ``!!timestamp x``) reported as a YAML error at
    its line, not as the ValueError (or AttributeError) PyYAML lets out."""
    try:
        return yaml.SafeLoader.construct_object(loader, node, deep=deep)
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        kind = node.tag.rpartition(":")[2] or "value"
        if isinstance(e, ValueError):
            what = f"cannot read {kind}: {e}"
        else:  # !!timestamp x: PyYAML's regex finds nothing and it calls None.groupdict()
            what = f"not a valid {kind}: {_repr(node.value)}"
        raise yaml.constructor.ConstructorError(None, None, what, node.start_mark) from None


_SafeLoader.construct_object = _construct_object  # type: ignore[method-assign]


def load(
    path: str,
    *,
    environ: Mapping[str, str] = os.environ,
    broker_override: Optional[str] = None,
) -> Config:
    """Read and validate the config file at ``path``; raise `ConfigError`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start})") from None
    return parse(text, path, environ=environ, broker_override=broker_override)


def parse(
    text: str,
    filename: str,
    *,
    environ: Mapping[str, str] = os.environ,
    broker_override: Optional[str] = None,
) -> Config:
    """Validate YAML ``text``; ``filename`` names it in errors and anchors relative paths."""
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = e.problem or e.context or "syntax error"
        if isinstance(e, _DuplicateKey):
            raise ConfigError(filename, None, f"{where}{what}") from None
        raise ConfigError(filename, None, f"{where}not valid YAML ({what})") from None
    except yaml.YAMLError as e:
        raise ConfigError(filename, None, f"not valid YAML ({e})") from None
    except RecursionError:
        raise ConfigError(filename, None, "not valid YAML (nested too deeply)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            filename,
            None,
            f"the top level must be a mapping of keys to values, got {_describe(data)}",
        )
    try:
        return _Parser(filename, environ, broker_override).config(data)
    except RecursionError:  # a value that contains itself (YAML aliases), or nested beyond reason
        raise ConfigError(filename, None, "a value is nested too deeply (or contains itself)") from None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown)
    if isinstance(value, (int, float)):
        return _repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _repr(value: Any, limit: int = 60) -> str:
    """repr(value) cut to C{limit} characters; an integer too long for repr
    (more than 4300 digits) is described instead."""
    try:
        shown = repr(value)
    except ValueError:
        return "an integer of more than 4300 digits"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _join(path: str, key: Any) -> str:
    # a key as it is when it is printable text (so messages stay one line), else its repr
    key = key if isinstance(key, str) and key.isprintable() else _repr(key)
    return f"{path}.{key}" if path else key


class _Parser:
    def __init__(
        self, filename: str, environ: Mapping[str, str], broker_override: Optional[str]
    ) -> None:
        self.filename = filename
        self.base_dir = os.path.dirname(os.path.abspath(filename))
        self.environ = environ
        self.broker_override = broker_override

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.filename, key, message)

    # -- generic checks ---------------------------------------------------- #

    def mapping(self, value: Any, path: str, allowed: Tuple[str, ...]) -> dict:
        """A mapping with only ``allowed`` keys; null means an empty one."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {_describe(value)}")
        for key in value:
            if key not in allowed:
                known = ", ".join(allowed) if allowed else "none"
                raise self.error(_join(path, key), f"unknown key (known: {known})")
        return value

    def integer(self, value: Any, path: str, low: int, high: Optional[int] = None) -> int:
        """An integer C{low}..C{high}; without C{high}, at most 2**63 - 1 (any
        count or size in bytes fits; YAML's hex and octal integers have no length limit)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < low or value > (
            MAX_INTEGER if high is None else high
        ):
            want = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"
            raise self.error(path, f"expected {want}, got {_describe(value)}")
        return value

    def number(self, value: Any, path: str, *, allow_zero: bool = False) -> float:
        try:
            as_float = float(value) if isinstance(value, int) else value
        except OverflowError:  # an integer beyond any float
            as_float = math.inf
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(as_float)
            and (value >= 0 if allow_zero else value > 0)
        )
        if not ok:
            want = "a number >= 0" if allow_zero else "a number > 0"
            raise self.error(path, f"expected {want} (seconds), got {_describe(value)}")
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {_describe(value)}")
        return value

    def choice(self, value: Any, path: str, choices: Tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            options = " or ".join(repr(c) for c in choices)
            raise self.error(path, f"expected {options}, got {_describe(value)}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {_describe(value)}")
        return value

    def subscription_name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _SUBSCRIPTION_NAME.match(value):
            raise self.error(path, f"expected a subscription name (1 to 64 of A-Z a-z 0-9 _ . -), "
                             f"got {_describe(value)}")
        return value

    def interface(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected an IP address string, got {_describe(value)}")
        if value != "":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise self.error(
                    path, f"expected an IP address (or \"\" for all), got {_describe(value)}"
                ) from None
        return value

    def listen_port(self, value: Any, path: str, component: str) -> Any:
        """A port number 0-65535, or an endpoint string (ooidx.http.listen: tcp:, tcp6:, ssl:)."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(path, f"expected a port number 0-65535 or an endpoint string such as "
                             f"tcp:8080:interface=127.0.0.1, got {_describe(value)}")
        if isinstance(value, int):
            return self.integer(value, path, 0, 65535)
        try:
            parse_listen(value, "127.0.0.1")
        except BadEndpoint as e:
            raise self.error(path, str(e)) from None
        return value

    def allowed_hosts(self, value: Any, path: str) -> Tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of host names, got {_describe(value)}")
        out = []
        for i, host in enumerate(value):
            ok = isinstance(host, str) and len(host) <= 253
            if ok:
                try:
                    ipaddress.ip_address(host.strip("[]"))
                except ValueError:
                    ok = bool(HOST_NAME.match(host))
            if not ok:
                raise self.error(f"{path}[{i}]", f"expected a host name, *.domain or IP address (no port), "
                                 f"got {_describe(host)}")
            out.append(host.lower().rstrip("."))
        return tuple(out)

    def fields(self, data: dict, path: str, spec: Dict[str, Tuple[Any, Callable]]) -> dict:
        """Check ``data`` against ``{key: (default, check)}``; null means the default."""
        data = self.mapping(data, path, tuple(spec))
        out = {}
        for key, (default, check) in spec.items():
            value = data.get(key)
            out[key] = default if value is None else check(value, _join(path, key))
        return out

    # -- the sections ------------------------------------------------------ #

    def config(self, data: dict) -> Config:
        top = (
            "node", "broker", "components", "http", "data_dir", "timeouts", "retries",
            "prefetch", "queue_type", "security", "logging",
        )
        for key in data:
            if key not in top:
                raise self.error(_join("", key), "unknown key")
        broker, origin = self.broker(data.get("broker"))
        http = HttpConfig(**self.fields(data.get("http"), "http", {
            "proxy_port": (8100, lambda v, p: self.listen_port(v, p, "proxyng")),
            "web_port": (8080, lambda v, p: self.listen_port(v, p, "web")),
            "interface": ("127.0.0.1", self.interface),
            "allowed_hosts": ((), self.allowed_hosts),
            "metrics_datasets": (50, lambda v, p: self.integer(v, p, 0, 1000)),
        }))
        data_dir = self.data_dir(data.get("data_dir"))
        components = self.components(data.get("components"), broker, origin, data_dir)
        config = Config(
            source=self.filename,
            node=self.node(data.get("node")),
            broker=broker,
            broker_origin=origin,
            components=components,
            data_dir=data_dir,
            http=http,
            timeouts=TimeoutsConfig(**self.fields(data.get("timeouts"), "timeouts", {
                "rpc": (30.0, self.number),
                "send": (30.0, self.number),
                "shutdown": (10.0, self.number),
                "connect": (10.0, self.number),
                "heartbeat": (10.0, lambda v, p: self.number(v, p, allow_zero=True)),
            })),
            retries=RetriesConfig(**self.fields(data.get("retries"), "retries", {
                "limit": (3, lambda v, p: self.integer(v, p, 0)),
            })),
            prefetch=(
                10 if data.get("prefetch") is None
                else self.integer(data["prefetch"], "prefetch", 1, MAX_PREFETCH)
            ),
            queue_type=(
                "classic" if data.get("queue_type") is None
                else self.choice(data["queue_type"], "queue_type", ("classic", "quorum"))
            ),
            security=self.security(data.get("security")),
            logging=LoggingConfig(**self.fields(data.get("logging"), "logging", {
                "format": ("text", lambda v, p: self.choice(v, p, ("text", "json"))),
                "level": ("info", lambda v, p: self.choice(
                    v, p, ("debug", "info", "warn", "error"))),
                "access": (False, self.boolean),
            })),
        )
        self.check_listeners(config)
        return config

    def node(self, value: Any) -> str:
        if value is None:
            name = socket.gethostname()
            if not NODE_NAME.match(name):
                raise self.error(
                    "node",
                    f"the host name {name!r} is not a valid node name; "
                    "set node to 1-64 characters of A-Z a-z 0-9 _ . -",
                )
            return name
        if not isinstance(value, str) or not NODE_NAME.match(value):
            raise self.error(
                "node", f"expected 1-64 characters of A-Z a-z 0-9 _ . -, got {_describe(value)}"
            )
        return value

    def broker(self, value: Any) -> Tuple[Tuple[str, ...], str]:
        if self.broker_override:
            return self.broker_urls(self.broker_override, "broker (from --broker)"), "--broker"
        from_env = self.environ.get(BROKER_ENV)
        if from_env:
            return self.broker_urls(from_env, f"broker (from {BROKER_ENV})"), BROKER_ENV
        if value is None:
            return (DEFAULT_BROKER,), "default"
        return self.broker_urls(value, "broker"), "file"

    def broker_urls(self, value: Any, path: str) -> Tuple[str, ...]:
        """A URL, a list of URLs, or (from the command line / environment) a comma list."""
        if isinstance(value, str) and "," in value:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, str):
            return (self.broker_url(value, path),)
        if isinstance(value, list):
            if not value:
                raise self.error(path, "expected a broker URL or a non-empty list of them, got []")
            urls = tuple(self.broker_url(url, f"{path}[{i}]") for i, url in enumerate(value))
            if len(urls) > 1 and any(url.startswith("memory:") for url in urls):
                raise self.error(
                    path, "a list of brokers is a cluster of amqp:// or amqps:// URLs; "
                    "memory:// stands alone",
                )
            return urls
        raise self.error(
            path, f"expected a broker URL such as amqp://host:5672/, got {_describe(value)}"
        )

    def broker_url(self, url: Any, path: str) -> str:
        if not isinstance(url, str):
            raise self.error(path, f"expected a broker URL, got {_describe(url)}")
        shown = _describe(redact_url(url))
        try:
            parts = urlsplit(url)
        except ValueError as e:
            raise self.error(path, f"not a URL ({e}), got {shown}") from None
        if parts.scheme not in BROKER_SCHEMES:
            raise self.error(
                path, f"expected a memory://, amqp:// or amqps:// URL, got {shown}"
            )
        try:
            port = parts.port
        except ValueError:
            raise self.error(path, f"the port must be an integer 1-65535, got {shown}") from None
        if parts.scheme == "memory":
            if port is not None or parts.username or parts.password or parts.query:
                raise self.error(
                    path, f"memory:// takes at most a name (memory://NAME), got {shown}"
                )
            return url
        if not parts.hostname:
            raise self.error(path, f"no host in the URL, got {shown}")
        if port == 0:
            raise self.error(path, f"the port must be an integer 1-65535, got {shown}")
        return url

    def data_dir(self, value: Any) -> str:
        if value is None:
            value = "var/ooidx"
        value = self.string(value, "data_dir")
        return os.path.normpath(os.path.join(self.base_dir, self.expanduser(value, "data_dir")))

    def expanduser(self, value: str, path: str) -> str:
        if "\x00" in value:
            raise self.error(path, "a path may not contain a NUL character")
        try:
            return os.path.expanduser(value)
        except ValueError as e:  # "~" and a user name the system cannot look up
            raise self.error(path, f"not a usable path ({e}), got {_describe(value)}") from None

    def security(self, value: Any) -> SecurityConfig:
        def token(v: Any, p: str) -> str:
            if not isinstance(v, str):
                raise self.error(p, f"expected a string or null, got {_describe(v)}")
            if len(v) < MIN_TOKEN_LENGTH or any(c.isspace() for c in v):
                # never echo the token itself
                raise self.error(
                    p, f"expected at least {MIN_TOKEN_LENGTH} characters without spaces "
                    "(or null to have one generated)",
                )
            return v

        def hosts(v: Any, p: str) -> Tuple[str, ...]:
            if not isinstance(v, list):
                raise self.error(p, f"expected a list of host names, got {_describe(v)}")
            for i, host in enumerate(v):
                if not isinstance(host, str) or len(host) > 260 or not _allow_host_entry(host):
                    raise self.error(f"{p}[{i}]", "expected a host name, *.domain or IP address, "
                                     f"optionally with :PORT, got {_describe(host)}")
            return tuple(h.lower().rstrip(".") for h in v)

        return SecurityConfig(**self.fields(value, "security", {
            "token": (None, token),
            "allow_hosts": ((), hosts),
            "allow_private": (False, self.boolean),
            "read_token": (None, self.boolean),
        }))

    def components(
        self, value: Any, broker: Tuple[str, ...], origin: str, data_dir: str
    ) -> Mapping[str, ComponentConfig]:
        if value is None:
            value = {name: None for name in COMPONENTS}
        elif not isinstance(value, dict):
            raise self.error(
                "components", f"expected a mapping of component names, got {_describe(value)}"
            )
        elif not value:
            raise self.error(
                "components",
                "no components: name the ones this node runs, or leave the key out to run all",
            )
        for name in value:
            if name not in COMPONENTS:
                raise self.error(
                    _join("components", name),
                    f"unknown component (known: {', '.join(COMPONENTS)})",
                )
        out = {}
        for name in COMPONENTS:  # a stable order, whatever the file's
            if name in value:
                out[name] = self.component(name, value[name], broker, origin, data_dir)
        return MappingProxyType(out)

    def component(
        self, name: str, value: Any, broker: Tuple[str, ...], origin: str, data_dir: str
    ) -> ComponentConfig:
        path = f"components.{name}"
        common: Dict[str, Tuple[Any, Callable]] = {
            "instances": (1, lambda v, p: self.integer(v, p, 1)),
            "process": ("inline", lambda v, p: self.choice(v, p, ("inline", "child"))),
        }
        specific: Dict[str, Tuple[Any, Callable]] = {}
        if name == "attribute_store":
            specific = {"url": (None, self.store_url)}
        elif name == "cache":
            specific = {
                "max_bytes": (GiB, lambda v, p: self.integer(v, p, 1)),
                "max_age": (300.0, lambda v, p: self.number(v, p, allow_zero=True)),
            }
        elif name == "fetcher":
            specific = {
                "max_redirects": (5, lambda v, p: self.integer(v, p, 0)),
                "max_bytes": (10 * GiB, lambda v, p: self.integer(v, p, 1)),
                "timeout": (60.0, self.number),
            }
        elif name == "csv":
            specific = {"formula_escape": (True, self.boolean)}
        elif name == "persister":
            specific = {
                "subscription": ("persister", self.subscription_name),
                "retry_after": (60.0, self.number),
                "retry_max": (900.0, self.number),
            }
        elif name in ("user_notification", "user_pub_sub"):
            specific = {
                "webhook_attempts": (8, lambda v, p: self.integer(v, p, 1, 100)),
                "webhook_disable_after": (20, lambda v, p: self.integer(v, p, 1, 10_000)),
                "webhook_verify_timeout": (5.0, self.number),
                "webhook_log_size": (50, lambda v, p: self.integer(v, p, 1, 1000)),
                "webhook_disabled_ttl": (604800.0, lambda v, p: self.number(v, p, allow_zero=True)),
            }
        elif name in LISTENING_COMPONENTS:
            specific = {
                "port": (None, lambda v, p: self.listen_port(v, p, name)),
                "interface": (None, self.interface),
            }
        if name == "fetcher":
            specific["max_transfers"] = (64, lambda v, p: self.integer(v, p, 1, 100_000))
        elif name == "proxyng":
            specific["max_per_client"] = (100, lambda v, p: self.integer(v, p, 1, 100_000))
            specific["stall_timeout"] = (5.0, self.number)
        settings = self.fields(value, path, {**common, **specific})
        instances, process = settings.pop("instances"), settings.pop("process")

        if process == "child" and broker[0].startswith("memory:"):
            via = "" if origin in ("file", "default") else f" (broker from {origin})"
            raise self.error(
                f"{path}.process",
                "'child' needs a broker that processes share (amqp://); "
                f"memory:// lives inside one process{via}",
            )
        if name in LISTENING_COMPONENTS and instances != 1:
            raise self.error(
                f"{path}.instances",
                f"{name} listens on a TCP port and runs one instance per node, got {instances}",
            )

        options: Any = None
        if name == "attribute_store":
            url = settings["url"] or "attributes.sqlite3"
            if not url.startswith(("postgresql://", "postgres://")):
                url = os.path.normpath(os.path.join(data_dir, self.expanduser(url, f"{path}.url")))
            options = AttributeStoreOptions(url=url)
        elif name == "cache":
            options = CacheOptions(**settings)
        elif name == "fetcher":
            options = FetcherOptions(**settings)
        elif name == "csv":
            options = CsvOptions(**settings)
        elif name == "persister":
            if settings["retry_max"] < settings["retry_after"]:
                raise self.error(f"{path}.retry_max", f"expected at least retry_after ({settings['retry_after']:g} s), "
                                 f"got {settings['retry_max']:g}")
            options = PersisterOptions(**settings)
        elif name == "proxyng":
            options = ProxyOptions(**settings)
        elif name in ("user_notification", "user_pub_sub"):
            if settings["webhook_verify_timeout"] > 30:
                raise self.error(f"{path}.webhook_verify_timeout", "expected at most 30 seconds (the web edge waits "
                                 f"for the challenge), got {settings['webhook_verify_timeout']:g}")
            options = WebhookOptions(**settings)
        elif name in LISTENING_COMPONENTS:
            options = ListenOptions(**settings)
        return ComponentConfig(name=name, instances=instances, process=process, options=options)

    def store_url(self, value: Any, path: str) -> str:
        value = self.string(value, path)
        if "://" in value:
            try:
                parts = urlsplit(value)
            except ValueError as e:  # postgresql://[db/x: "Invalid IPv6 URL"
                raise self.error(path, f"not a URL ({e}), got {_describe(redact_url(value))}") from None
            if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
                raise self.error(
                    path,
                    "expected a sqlite file path or a postgresql://host/db URL, "
                    f"got {_describe(redact_url(value))}",
                )
        return value

    def check_listeners(self, config: Config) -> None:
        seen: Dict[Tuple[str, int], Listener] = {}
        for listener in config.listeners():
            if listener.port == 0:
                continue
            for (interface, port), other in seen.items():
                wildcard = ("", "0.0.0.0", "::")
                overlap = (
                    interface == listener.interface
                    or interface in wildcard
                    or listener.interface in wildcard
                )
                if port == listener.port and overlap:
                    raise self.error(
                        listener.key,
                        f"port {port} is also {other.component}'s port ({other.key})",
                    )
            seen[(listener.interface, listener.port)] = listener


# --------------------------------------------------------------------------- #
# Ports


def check_ports_free(config: Config) -> None:
    """Bind each port this node will listen on, briefly; raise `ConfigError` if one
    is taken (or not ours to take). Port 0 (any free port) is never checked."""
    for listener in config.listeners():
        if listener.port == 0:
            continue
        interface = listener.interface
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        where = interface or "all interfaces"
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # as Twisted's listenTCP does, so a port in TIME_WAIT is not "in use"
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((interface, listener.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                what = f"port {listener.port} on {where} is in use"
            elif e.errno in (errno.EACCES, errno.EPERM):
                what = (
                    f"port {listener.port} on {where}: permission denied "
                    "(ports below 1024 need privileges)"
                )
            elif e.errno == errno.EADDRNOTAVAIL:
                what = f"{where} is not an address of this host"
            else:
                what = f"cannot listen on port {listener.port} on {where}: {e.strerror or e}"
            raise ConfigError(config.source, listener.key, what) from None
        finally:
            sock.close()
