"""What each component is given (L{ooidx.config}): its typed arguments, read
from a checked L{Config}."""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple


from ooidx.config.model import (CacheOptions, Config, ControllerOptions, CsvOptions, FetcherOptions, PersisterOptions,
                                ProxyOptions, WebhookOptions)




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
        # a miss is fetched where its body is stored: the fetcher's options and the security policy
        fetcher = config.components.get("fetcher")
        return {"options": options or CacheOptions(), "directory": os.path.join(config.data_dir, "cache"),
                "security": config.security,
                "fetch_options": (fetcher.options if fetcher is not None else None) or FetcherOptions()}
    if name == "controller":
        return {"security": config.security, "options": options or ControllerOptions()}
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
                "access_log": config.logging.access, "shutdown_timeout": config.timeouts.shutdown}
    if name == "web":
        port, interface = listen_of(config, name)
        proxy_port, proxy_interface = listen_of(config, "proxyng")
        return {"port": port, "interface": interface, "allowed_hosts": config.http.allowed_hosts,
                "read_token": config.security.read_token, "access_log": config.logging.access,
                "proxy_port": proxy_port, "proxy_interface": proxy_interface}
    return {}
