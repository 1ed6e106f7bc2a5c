"""Reading and checking a config file (L{ooidx.config}): YAML into a frozen
L{Config}, every problem one line."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import socket
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

import yaml

from ooidx.config.model import (_SUBSCRIPTION_NAME, BROKER_ENV, BROKER_SCHEMES, COMPONENTS, DEFAULT_BROKER,
                                HOST_NAME, LISTENING_COMPONENTS, MAX_INTEGER, MAX_PREFETCH, MIN_TOKEN_LENGTH,
                                NODE_NAME, _allow_host_entry, AttributeStoreOptions, CacheOptions,
                                ComponentConfig, Config, ConfigError, ControllerOptions, CsvOptions, FetcherOptions, GiB,
                                HttpConfig, Listener, ListenOptions, LoggingConfig, PersisterOptions,
                                ProxyOptions, redact_url, RetriesConfig, SecurityConfig, TimeoutsConfig,
                                WebhookOptions)

from ooidx.http.listen import BadEndpoint, parse_listen
from ooidx.wire import RETIRED_COMPONENTS



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
        self.warnings: list = []

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
        if self.warnings:
            config = dataclasses.replace(config, warnings=tuple(self.warnings))
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
        retired = [name for name in value if name in RETIRED_COMPONENTS]
        for name in retired:
            self.warnings.append(f"{self.filename}: {_join('components', name)}: deprecated: the {name} "
                                 f"component is retired and is ignored: {RETIRED_COMPONENTS[name]}")
        if retired and len(retired) == len(value):
            raise self.error("components", f"no components but retired ones ({', '.join(retired)}): "
                             f"{RETIRED_COMPONENTS[retired[0]]}; name the ones this node runs, "
                             "or leave the key out to run all")
        for name in value:
            if name in RETIRED_COMPONENTS:
                continue
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
        elif name == "controller":
            specific = {
                "check_timeout": (8.0, self.number),
                "check_max_bytes": (1024 * 1024, lambda v, p: self.integer(v, p, 1024, 64 * 1024 * 1024)),
                "freshness_interval": (60.0, self.number),
            }
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
        elif name == "controller":
            if settings["check_timeout"] > 9:
                raise self.error(f"{path}.check_timeout", "expected at most 9 seconds (the web port waits 10 s for "
                                 f"the controller), got {settings['check_timeout']:g}")
            options = ControllerOptions(**settings)
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
