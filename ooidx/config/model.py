"""The frozen configuration: its sections, each component's options, and the
whole L{Config} (L{ooidx.config})."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit


from ooidx.http.listen import parse_listen
from ooidx.wire import COMPONENT_NAMES, LISTENING


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
class ControllerOptions:
    """How the controller checks a registration and watches freshness.

    ``check_timeout`` (default 8 s, at most 9: the web port waits 10 s for the
    controller): how long a registration waits for the upstream's .dds and
    .das, fetched at once; ``check_max_bytes`` (default 1 MiB): the most it
    reads of each; ``freshness_interval`` (default 60 s): how often datasets
    with an ``expect_every`` are looked at for being out of date."""

    check_timeout: float = 8.0
    check_max_bytes: int = 1024 * 1024
    freshness_interval: float = 60.0


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
    #: what the file says that still works but should change (a retired
    #: component named): the daemon logs each when it starts
    warnings: Tuple[str, ...] = field(default=(), compare=False)

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
            if f.name not in ("source", "broker_origin", "warnings")
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
