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

from ooidx.config.model import (COMPONENTS, LISTENING_COMPONENTS, BROKER_ENV, DEFAULT_BROKER, GiB,
                                AttributeStoreOptions, CacheOptions, ComponentConfig, Config, ConfigError,
                                ControllerOptions, CsvOptions, FetcherOptions, HttpConfig, ListenOptions, Listener,
                                LoggingConfig, PersisterOptions, ProxyOptions, RetriesConfig, SecurityConfig,
                                TimeoutsConfig, WebhookOptions, redact_url)
from ooidx.config.assembly import cache_max_age, component_arguments, fetch_timeout, listen_of
from ooidx.config.parser import check_ports_free, load, parse

__all__ = [
    "PersisterOptions",
    "GiB",
    "DEFAULT_BROKER",
    "BROKER_ENV",
    "LISTENING_COMPONENTS",
    "COMPONENTS",
    "AttributeStoreOptions",
    "CacheOptions",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "ControllerOptions",
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
