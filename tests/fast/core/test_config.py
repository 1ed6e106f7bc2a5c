"""ooidx.config: every error is one line naming file, key and problem.
(Moved from tests/ooidx/test_config.py; the tests that bind ports, run git
or systemd-analyze stay there.)"""

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any, List

import yaml

from ooidx import config
from ooidx.config import COMPONENTS, ConfigError, load, parse

from tests.fast.core.support import FastCase, cases, expand

ROOT = Path(__file__).resolve().parents[3]
ETC = ROOT / "etc"
UNIT = ETC / "systemd" / "ooidx@.service"
AMQP = "amqp://guest@127.0.0.1:5672/"


def error_of(text, filename="etc/dx.yaml", **kwargs):
    kwargs.setdefault("environ", {})
    try:
        parse(text, filename, **kwargs)
    except ConfigError as e:
        message = str(e)
    else:
        raise AssertionError("no ConfigError for %r" % (text,))
    assert "\n" not in message
    return message


def write(tmp_path, text, name="dx.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


EXAMPLES = sorted(path.name for path in ETC.glob("*.yaml"))

# Inputs the fuzzer (fuzz/fuzz_config.py) found: each raised something other
# than ConfigError (or a ConfigError on two lines).
HUGE_HEX = "0x" + "f" * 4000  # YAML reads it; repr() of it raises ValueError (> 4300 digits)


@expand
class ConfigTests(FastCase):
    def test_empty_file_gives_all_defaults(self):
        tmp_path = self.tmp_path()
        cfg = load(write(tmp_path, ""), environ={})
        assert cfg.node == socket.gethostname()
        assert cfg.broker == ("memory://",)
        assert cfg.broker_origin == "default"
        assert cfg.is_memory
        assert tuple(cfg.components) == COMPONENTS
        for name, component in cfg.components.items():
            assert component.name == name
            assert component.instances == 1
            assert component.process == "inline"
        assert cfg.http == config.HttpConfig(8100, 8080, "127.0.0.1")
        assert cfg.data_dir == str(tmp_path / "var" / "ooidx")
        assert cfg.timeouts == config.TimeoutsConfig(30.0, 30.0, 10.0, 10.0, 10.0)
        assert cfg.retries.limit == 3
        assert cfg.prefetch == 10
        assert cfg.queue_type == "classic"
        assert cfg.security == config.SecurityConfig(None, (), False)
        assert cfg.logging == config.LoggingConfig("text", "info")
        assert cfg.logging.access is False  # the access log is off unless switched on

    def test_comment_only_file_is_empty(self):
        assert parse("# nothing here\n", "x.yaml", environ={}).broker == ("memory://",)

    def test_component_options_defaults(self):
        tmp_path = self.tmp_path()
        cfg = load(write(tmp_path, ""), environ={})
        opts = {name: c.options for name, c in cfg.components.items()}
        assert opts["cache"] == config.CacheOptions(max_bytes=1 << 30, max_age=300.0)
        assert opts["fetcher"] == config.FetcherOptions(
            max_redirects=5, max_bytes=10 << 30, timeout=60.0
        )
        assert opts["attribute_store"].url == str(tmp_path / "var" / "ooidx" / "attributes.sqlite3")
        assert opts["web"] == config.ListenOptions(None, None)
        assert opts["proxyng"] == config.ProxyOptions(None, None, max_per_client=100, stall_timeout=5.0)
        assert opts["persister"] == config.PersisterOptions("persister", 60.0, 900.0)
        assert opts["controller"] == config.ControllerOptions(8.0, 1 << 20, 60.0)

    def test_persister_options(self):
        cfg = parse("components: {persister: {subscription: west-coast.1, retry_after: 5, retry_max: 5}}\n",
                    "x.yaml", environ={})
        assert cfg.components["persister"].options == config.PersisterOptions("west-coast.1", 5.0, 5.0)

    def test_component_null_and_empty_mean_defaults(self):
        cfg = parse("components: {fetcher: null, cache: {}}\n", "x.yaml", environ={})
        assert list(cfg.components) == ["cache", "fetcher"]
        assert cfg.components["fetcher"].instances == 1
        assert cfg.components["cache"].options == config.CacheOptions()
        assert cfg.runs("fetcher") and not cfg.runs("web")

    def test_components_listed_run_in_stable_order_with_settings(self):
        cfg = parse(
            "broker: amqp://rabbit/\n"
            "components:\n"
            "  web: {port: 9000, interface: '0.0.0.0'}\n"
            "  fetcher: {instances: 4, process: child, timeout: 5, max_redirects: 0}\n"
            "  attribute_store: {url: 'postgresql://dx:pw@db/dx'}\n",
            "x.yaml",
            environ={},
        )
        assert list(cfg.components) == ["attribute_store", "fetcher", "web"]
        fetcher = cfg.components["fetcher"]
        assert (fetcher.instances, fetcher.process) == (4, "child")
        assert fetcher.options == config.FetcherOptions(
            max_redirects=0, max_bytes=10 << 30, timeout=5.0
        )
        assert cfg.components["attribute_store"].options.url == "postgresql://dx:pw@db/dx"
        assert cfg.listeners() == (config.Listener("web", "0.0.0.0", 9000, "components.web.port"),)

    def test_config_is_frozen(self):
        cfg = parse("", "x.yaml", environ={})
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.prefetch = 3
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.http.web_port = 1
        with self.assertRaises(TypeError):
            cfg.components["web"] = None

    def test_data_dir_resolves_against_the_config_files_directory(self):
        tmp_path = self.tmp_path()
        monkeypatch = self.monkeypatch()
        (tmp_path / "etc").mkdir()
        path = write(
            tmp_path / "etc", "data_dir: ../state\ncomponents: {attribute_store: {url: a.db}}\n"
        )
        monkeypatch.chdir("/")
        cfg = load(path, environ={})
        assert cfg.data_dir == str(tmp_path / "state")
        assert cfg.components["attribute_store"].options.url == str(tmp_path / "state" / "a.db")
        assert parse("data_dir: /var/lib/ooidx\n", "x.yaml", environ={}).data_dir == "/var/lib/ooidx"

    def test_full_file_round_trips_through_to_dict(self):
        cfg = load(str(ETC / "dx.yaml"), environ={})
        text = yaml.safe_dump(cfg.to_dict(redact=False))
        again = parse(text, str(ETC / "dx.yaml"), environ={})
        assert again == cfg

    def test_broker_precedence_override_beats_env_beats_file(self):
        text = "broker: amqp://file-host/\n"
        assert parse(text, "x.yaml", environ={}).broker == ("amqp://file-host/",)
        env = {"OOIDX_BROKER": "amqp://env-host/"}
        cfg = parse(text, "x.yaml", environ=env)
        assert (cfg.broker, cfg.broker_origin) == (("amqp://env-host/",), "OOIDX_BROKER")
        cfg = parse(text, "x.yaml", environ=env, broker_override="amqps://cli-host:5671/")
        assert (cfg.broker, cfg.broker_origin) == (("amqps://cli-host:5671/",), "--broker")
        # an empty variable does not count
        assert parse(text, "x.yaml", environ={"OOIDX_BROKER": ""}).broker_origin == "file"

    def test_broker_env_is_read_from_os_environ_by_default(self):
        monkeypatch = self.monkeypatch()
        monkeypatch.setenv("OOIDX_BROKER", "amqp://from-os-environ/")
        assert parse("", "x.yaml").broker == ("amqp://from-os-environ/",)

    def test_broker_cluster_list_and_comma_override(self):
        cfg = parse("broker: [amqp://a:5672/, amqp://b:5672/]\n", "x.yaml", environ={})
        assert cfg.broker == ("amqp://a:5672/", "amqp://b:5672/")
        cfg = parse("", "x.yaml", environ={"OOIDX_BROKER": "amqp://a/, amqp://b/"})
        assert cfg.broker == ("amqp://a/", "amqp://b/")

    @cases(
        "url, problem",
        [
            ("http://host/", "expected a memory://, amqp:// or amqps:// URL, got 'http://host/'"),
            ("rabbit", "expected a memory://, amqp:// or amqps:// URL, got 'rabbit'"),
            ("amqp://host:abc/", "the port must be an integer 1-65535, got 'amqp://host:abc/'"),
            ("amqp://host:99999/", "the port must be an integer 1-65535"),
            ("amqp:///vhost", "no host in the URL"),
            ("memory://x:5672", "memory:// takes at most a name"),
        ],
    )
    def test_bad_broker_url(self, url, problem):
        message = error_of(f"broker: '{url}'\n")
        assert message.startswith("etc/dx.yaml: broker: ")
        assert problem in message

    def test_bad_broker_type_and_memory_in_cluster(self):
        assert error_of("broker: 5672\n") == (
            "etc/dx.yaml: broker: expected a broker URL such as amqp://host:5672/, got 5672"
        )
        assert "broker[1]: expected a memory://" in error_of("broker: [amqp://a/, ftp://b/]\n")
        assert "memory:// stands alone" in error_of("broker: [amqp://a/, memory://]\n")
        assert error_of("broker: []\n").startswith("etc/dx.yaml: broker: expected a broker URL")

    def test_bad_broker_from_env_and_override_say_where_it_came_from(self):
        message = error_of("", environ={"OOIDX_BROKER": "rabbit:5672"})
        assert message.startswith("etc/dx.yaml: broker (from OOIDX_BROKER): ")
        message = error_of("", broker_override="amqp://h:port/")
        assert message.startswith("etc/dx.yaml: broker (from --broker): the port must be")

    def test_bad_broker_url_error_never_shows_the_password(self):
        message = error_of("broker: 'amqp://dx:hunter2@host:notaport/'\n")
        assert "hunter2" not in message
        assert "amqp://dx:***@host:notaport/" in message
        message = error_of("", broker_override="http://dx:hunter2@host/")
        assert "hunter2" not in message

    def test_redacted_broker(self):
        cfg = parse("", "x.yaml", environ={}, broker_override="amqp://dx:s3cret@rabbit:5672/dx")
        assert cfg.redacted_broker() == "amqp://dx:***@rabbit:5672/dx"
        assert cfg.broker == ("amqp://dx:s3cret@rabbit:5672/dx",)  # the real one is kept
        cluster = parse(
            "broker: ['amqps://u:p1@a:5671/', 'amqps://u:p2@b:5671/']\n", "x.yaml", environ={}
        )
        assert cluster.redacted_broker() == "amqps://u:***@a:5671/, amqps://u:***@b:5671/"
        assert parse(f"broker: {AMQP}\n", "x.yaml", environ={}).redacted_broker() == AMQP
        assert parse("", "x.yaml", environ={}).redacted_broker() == "memory://"

    def test_to_dict_redacts_secrets_unless_asked(self):
        cfg = parse(
            "security: {token: abcdefghijklmnopqrstuvwxyz}\n"
            "components: {attribute_store: {url: 'postgresql://dx:dbpass@db/dx'}}\n",
            "x.yaml",
            environ={},
            broker_override="amqp://dx:s3cret@rabbit/",
        )
        shown = repr(cfg.to_dict())
        for secret in ("s3cret", "dbpass", "abcdefghijklmnopqrstuvwxyz"):
            assert secret not in shown
        assert cfg.to_dict()["broker"] == "amqp://dx:***@rabbit/"
        full = cfg.to_dict(redact=False)
        assert full["broker"] == "amqp://dx:s3cret@rabbit/"
        assert full["security"]["token"] == "abcdefghijklmnopqrstuvwxyz"

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as info:
            load("etc/x.yaml", environ={})
        assert str(info.exception) == "etc/x.yaml: cannot read config: No such file or directory"

    def test_directory_instead_of_file(self):
        tmp_path = self.tmp_path()
        with self.assertRaises(ConfigError) as info:
            load(str(tmp_path), environ={})
        assert str(info.exception) == f"{tmp_path}: cannot read config: Is a directory"

    def test_not_utf8(self):
        tmp_path = self.tmp_path()
        path = tmp_path / "dx.yaml"
        path.write_bytes(b"node: \xff\n")
        with self.assertRaises(ConfigError) as info:
            load(str(path), environ={})
        assert str(info.exception) == f"{path}: not UTF-8 text (byte 6)"

    def test_malformed_yaml(self):
        text = "node: a\nhttp:\n  web_port: 1: 2\n"
        assert error_of(text) == (
            "etc/dx.yaml: line 3, column 14: not valid YAML (mapping values are not allowed here)"
        )

    def test_malformed_yaml_unclosed_bracket(self):
        message = error_of("components: [fetcher\n")
        assert message.startswith("etc/dx.yaml: line 2, column 1: not valid YAML (")

    def test_duplicate_key_is_an_error(self):
        text = "components:\n  fetcher: {}\n  cache:\n  fetcher: {instances: 2}\n"
        assert error_of(text) == (
            "etc/dx.yaml: line 4, column 3: duplicate key 'fetcher' (first at line 2)"
        )

    def test_yaml_tags_for_python_objects_are_refused(self):
        message = error_of("node: !!python/object/apply:os.system ['true']\n")
        assert "not valid YAML" in message

    @cases(
        "text, what",
        [("- a\n- b\n", "a list"), ("just a string\n", "'just a string'"), ("42\n", "42")],
    )
    def test_top_level_must_be_a_mapping(self, text, what):
        assert error_of(text) == (
            f"etc/dx.yaml: the top level must be a mapping of keys to values, got {what}"
        )

    def test_unknown_top_level_key(self):
        assert error_of("brokr: amqp://x/\n") == "etc/dx.yaml: brokr: unknown key"

    def test_unknown_nested_key(self):
        assert error_of("http: {web_prot: 80}\n") == (
            "etc/dx.yaml: http.web_prot: unknown key (known: proxy_port, web_port, interface, allowed_hosts, metrics_datasets)"
        )
        assert error_of("components: {controller: {port: 1}}\n") == (
            "etc/dx.yaml: components.controller.port: unknown key (known: instances, process, check_timeout, "
            "check_max_bytes, freshness_interval)"
        )
        assert error_of("components: {cache: {max_redirects: 1}}\n").startswith(
            "etc/dx.yaml: components.cache.max_redirects: unknown key (known: instances, process, "
            "max_bytes, max_age)"
        )

    def test_unknown_component(self):
        assert error_of("components: {fetchr: {}}\n") == (
            "etc/dx.yaml: components.fetchr: unknown component (known: attribute_store, cache, "
            "controller, csv, fetcher, notification, persister, proxyng, pub_sub, "
            "user_notification, user_pub_sub, web)"
        )

    def test_the_retired_distributor_is_accepted_with_a_warning(self):
        config = parse("components: {fetcher: {}, distributor: {instances: 2}}\n", "etc/dx.yaml", environ={})
        assert set(config.components) == {"fetcher"}
        [warning] = config.warnings
        assert warning.startswith("etc/dx.yaml: components.distributor: deprecated: the distributor component "
                                  "is retired and is ignored: pub_sub delivers")
        assert parse("components: {fetcher: {}}\n", "etc/dx.yaml", environ={}).warnings == ()
        assert error_of("components: {distributor: }\n").startswith(
            "etc/dx.yaml: components: no components but retired ones (distributor)")

    def test_components_shape(self):
        assert error_of("components: [fetcher, cache]\n") == (
            "etc/dx.yaml: components: expected a mapping of component names, got a list"
        )
        assert error_of("components: {}\n").startswith("etc/dx.yaml: components: no components")
        assert error_of("components: {fetcher: 4}\n") == (
            "etc/dx.yaml: components.fetcher: expected a mapping, got 4"
        )

    @cases(
        "text, expected",
        [
            ("components: {fetcher: {instances: four}}",
             "components.fetcher.instances: expected an integer >= 1, got 'four'"),
            ("components: {fetcher: {instances: 0}}",
             "components.fetcher.instances: expected an integer >= 1, got 0"),
            ("components: {fetcher: {instances: true}}",
             "components.fetcher.instances: expected an integer >= 1, got true"),
            ("components: {fetcher: {instances: 2.5}}",
             "components.fetcher.instances: expected an integer >= 1, got 2.5"),
            ("components: {fetcher: {process: fork}}",
             "components.fetcher.process: expected 'inline' or 'child', got 'fork'"),
            ("components: {fetcher: {timeout: 0}}",
             "components.fetcher.timeout: expected a number > 0 (seconds), got 0"),
            ("components: {persister: {subscription: 'west coast'}}",
             "components.persister.subscription: expected a subscription name (1 to 64 of A-Z a-z 0-9 _ . -), "
             "got 'west coast'"),
            ("components: {persister: {subscription: 7}}",
             "components.persister.subscription: expected a subscription name (1 to 64 of A-Z a-z 0-9 _ . -), "
             "got 7"),
            ("components: {persister: {retry_after: -1}}",
             "components.persister.retry_after: expected a number > 0 (seconds), got -1"),
            ("components: {persister: {retry_after: 60, retry_max: 10}}",
             "components.persister.retry_max: expected at least retry_after (60 s), got 10"),
            ("components: {cache: {max_bytes: 1GiB}}",
             "components.cache.max_bytes: expected an integer >= 1, got '1GiB'"),
            ("components: {attribute_store: {url: 'mysql://db/dx'}}",
             "components.attribute_store.url: expected a sqlite file path or a postgresql://host/db "
             "URL, got 'mysql://db/dx'"),
            ("components: {web: {port: 70000}}",
             "components.web.port: expected an integer 0-65535, got 70000"),
            ("components: {proxyng: {instances: 2}}",
             "components.proxyng.instances: proxyng listens on a TCP port and runs one instance "
             "per node, got 2"),
            ("http: {proxy_port: true}", "http.proxy_port: expected a port number 0-65535 or an endpoint string such "
                                         "as tcp:8080:interface=127.0.0.1, got true"),
            ("http: {web_port: -1}", "http.web_port: expected an integer 0-65535, got -1"),
            ("http: {interface: localhost}",
             "http.interface: expected an IP address (or \"\" for all), got 'localhost'"),
            ("http: 8080", "http: expected a mapping, got 8080"),
            ("http: {web_port: 8100}",
             "http.web_port: port 8100 is also proxyng's port (http.proxy_port)"),
            ("node: 'my node'", "node: expected 1-64 characters of A-Z a-z 0-9 _ . -, got 'my node'"),
            ("node: 7", "node: expected 1-64 characters of A-Z a-z 0-9 _ . -, got 7"),
            ("data_dir: ''", "data_dir: expected a non-empty string, got ''"),
            ("timeouts: {rpc: -1}", "timeouts.rpc: expected a number > 0 (seconds), got -1"),
            ("timeouts: {rpc: .inf}", "timeouts.rpc: expected a number > 0 (seconds), got inf"),
            ("timeouts: {heartbeat: -1}",
             "timeouts.heartbeat: expected a number >= 0 (seconds), got -1"),
            ("timeouts: {send: no}", "timeouts.send: expected a number > 0 (seconds), got false"),
            ("retries: {limit: -1}", "retries.limit: expected an integer >= 0, got -1"),
            ("prefetch: 0", "prefetch: expected an integer 1-65535, got 0"),
            ("queue_type: stream", "queue_type: expected 'classic' or 'quorum', got 'stream'"),
            ("security: {allow_private: 'yes'}",
             "security.allow_private: expected true or false, got 'yes'"),
            ("security: {allow_hosts: example.org}",
             "security.allow_hosts: expected a list of host names, got 'example.org'"),
            ("security: {allow_hosts: [ok.example.org, 'bad host']}",
             "security.allow_hosts[1]: expected a host name, *.domain or IP address, optionally with :PORT, got 'bad host'"),
            ("security: {token: 12345}", "security.token: expected a string or null, got 12345"),
            ("logging: {format: xml}", "logging.format: expected 'text' or 'json', got 'xml'"),
            ("logging: {level: verbose}",
             "logging.level: expected 'debug' or 'info' or 'warn' or 'error', got 'verbose'"),
            ("logging: {access: 'on'}", "logging.access: expected true or false, got 'on'"),
        ],
    )
    def test_wrong_type_or_value(self, text, expected):
        assert error_of(text + "\n") == "etc/dx.yaml: " + expected

    def test_short_token_is_refused_without_echoing_it(self):
        message = error_of("security: {token: tiny-secret}\n")
        assert message.startswith("etc/dx.yaml: security.token: expected at least 16 characters")
        assert "tiny-secret" not in message

    def test_valid_values_are_accepted(self):
        cfg = parse(
            "node: dx-1.example_org\n"
            "http: {proxy_port: 0, web_port: 0, interface: '::1'}\n"
            "timeouts: {rpc: 0.5, heartbeat: 0}\n"
            "retries: {limit: 0}\n"
            "queue_type: quorum\n"
            "security: {token: 0123456789abcdef, allow_hosts: ['*.Example.org', data.ooi.org.],"
            " allow_private: yes}\n"
            "logging: {format: json, level: debug}\n",
            "x.yaml",
            environ={},
        )
        assert cfg.node == "dx-1.example_org"
        assert cfg.http == config.HttpConfig(0, 0, "::1")
        assert (cfg.timeouts.rpc, cfg.timeouts.heartbeat) == (0.5, 0.0)
        assert cfg.retries.limit == 0 and cfg.queue_type == "quorum"
        assert cfg.security == config.SecurityConfig(
            "0123456789abcdef", ("*.example.org", "data.ooi.org"), True
        )
        assert cfg.logging == config.LoggingConfig("json", "debug")

    def test_child_process_on_memory_broker_is_an_error(self):
        assert error_of("components: {fetcher: {process: child}}\n") == (
            "etc/dx.yaml: components.fetcher.process: 'child' needs a broker that processes share "
            "(amqp://); memory:// lives inside one process"
        )

    def test_child_process_on_memory_from_override_says_so(self):
        message = error_of(
            f"broker: {AMQP}\ncomponents: {{csv: {{process: child}}}}\n", broker_override="memory://"
        )
        assert message.endswith("memory:// lives inside one process (broker from --broker)")

    def test_child_process_on_amqp_is_fine_and_env_can_supply_the_broker(self):
        text = "components: {fetcher: {process: child, instances: 4}}\n"
        cfg = parse(text, "x.yaml", environ={"OOIDX_BROKER": AMQP})
        assert cfg.components["fetcher"].process == "child"

    def test_the_examples_are_all_there(self):
        assert {"dx.yaml", "dx-rabbitmq.yaml", "node-edge.yaml", "node-worker.yaml"} <= set(EXAMPLES)

    @cases("name", EXAMPLES)
    def test_example_files_load(self, name):
        cfg = load(str(ETC / name), environ={})
        assert cfg.source == str(ETC / name)
        assert cfg.data_dir.startswith(str(ROOT / "var"))

    def test_example_files_say_what_they_promise(self):
        dx = load(str(ETC / "dx.yaml"), environ={})
        assert dx.broker == ("memory://",) and tuple(dx.components) == COMPONENTS
        assert dx == parse("data_dir: ../var/ooidx\n", str(ETC / "dx.yaml"), environ={})
        assert dx.data_dir == str(ROOT / "var" / "ooidx")
        rabbit = load(str(ETC / "dx-rabbitmq.yaml"), environ={})
        assert rabbit.broker == (AMQP,) and tuple(rabbit.components) == COMPONENTS
        edge = load(str(ETC / "node-edge.yaml"), environ={})
        assert set(edge.components) == {
            "proxyng", "controller", "attribute_store", "web", "pub_sub", "notification"
        }
        worker = load(str(ETC / "node-worker.yaml"), environ={})
        assert set(worker.components) == {"fetcher", "cache", "csv", "persister"}
        assert worker.components["fetcher"].instances == 4
        assert worker.components["fetcher"].process == "child"
        assert worker.listeners() == ()
        assert set(edge.components).isdisjoint(worker.components)
        assert set(edge.components) | set(worker.components) == set(COMPONENTS) - {
            "user_notification", "user_pub_sub"
        }

    def test_example_files_on_memory_override_fail_clearly_where_children_are_configured(self):
        message = str(self.assertRaises(
            ConfigError, load, str(ETC / "node-worker.yaml"), environ={}, broker_override="memory://"
        ))
        assert "components.fetcher.process: 'child' needs a broker" in message

    def test_unit_runs_twistd_in_the_foreground_per_instance(self):
        text = UNIT.read_text()
        assert (
            "ExecStart=/opt/ooidx/venv/bin/twistd --nodaemon --pidfile= ooidx "
            "--config /etc/ooidx/%i.yaml"
        ) in text
        for line in (
            "EnvironmentFile=-/etc/ooidx/%i.env", "User=ooidx", "Restart=on-failure", "RestartSec=5",
            "KillSignal=SIGTERM", "TimeoutStopSec=30", "NoNewPrivileges=yes",
            "ProtectSystem=strict", "ReadWritePaths=/var/lib/ooidx", "PrivateTmp=yes",
        ):
            assert line + "\n" in text

    @cases("entry", ["data.example.org", "*.example.org", "127.0.0.1:8080", "10.0.0.5",
                                       "[::1]:8080", "::1", "host.example:443"])
    def test_allow_hosts_accepts_hosts_and_ports(self, entry) -> None:
        config = parse(f"security: {{allow_hosts: ['{entry}']}}\n", "x.yaml")
        assert config.security.allow_hosts == (entry.lower(),)

    @cases("entry", ["host:", "host:0", "host:70000", "host:http", "[::1", "[zz::1]:80",
                                       "a b", "http://host/", "[::1]x"])
    def test_allow_hosts_refuses_bad_entries(self, entry) -> None:
        with self.assertRaises(ConfigError) as info:
            parse(f"security: {{allow_hosts: ['{entry}']}}\n", "x.yaml")
        assert "security.allow_hosts[0]" in str(info.exception)

    @cases("text, expected", [
        # YAML scalars PyYAML resolves to a type and then cannot construct (ValueError, AttributeError)
        ("node: 2001-13-01\n", "line 1, column 7: not valid YAML (cannot read timestamp: month must be in 1..12)"),
        ("node: 2001-02-30\n", "line 1, column 7: not valid YAML (cannot read timestamp: day is out of range"),
        ("node: 2001-01-01 25:00:00\n", "not valid YAML (cannot read timestamp: hour must be in 0..23)"),
        ("node: 2001-01-01t01:00:00+99:00\n", "not valid YAML (cannot read timestamp: offset must be"),
        ("node: !!timestamp x\n", "line 1, column 7: not valid YAML (not a valid timestamp: 'x')"),
        ("prefetch: !!int abc\n", "not valid YAML (cannot read int: invalid literal for int()"),
        ("prefetch: !!float abc\n", "not valid YAML (cannot read float: could not convert"),
        ("prefetch: 1" + "0" * 5000 + "\n", "not valid YAML (cannot read int: Exceeds the limit (4300 digits)"),
        # allow_hosts ports: '²' is a digit to str.isdigit, not to int()
        ("security: {allow_hosts: ['dap.example.org:²']}\n", "security.allow_hosts[0]: expected a host name"),
        ("security: {allow_hosts: ['[::1]:²']}\n", "security.allow_hosts[0]: expected a host name"),
        # integers beyond a float (OverflowError) or beyond repr (ValueError)
        ("timeouts: {rpc: 1" + "0" * 400 + "}\n", "timeouts.rpc: expected a number > 0 (seconds), got 1000"),
        (f"http:\n  proxy_port: {HUGE_HEX}\n", "http.proxy_port: expected an integer 0-65535, got an integer of more than 4300 digits"),
        (f"http:\n  ? {HUGE_HEX}\n  : 1\n", "http.an integer of more than 4300 digits: unknown key"),
        (f"? {HUGE_HEX}\n: 1\n? {HUGE_HEX}\n: 2\n", "duplicate key an integer of more than 4300 digits (first at line 1)"),
        # integers no setting can hold (a YAML hex integer has no length limit), and more than AMQP's prefetch-count
        (f"retries: {{limit: {HUGE_HEX}}}\n", "retries.limit: expected an integer >= 0, got an integer of more than 4300 digits"),
        ("retries: {limit: 0x8000000000000000}\n", "retries.limit: expected an integer >= 0, got 9223372036854775808"),
        ("prefetch: 65536\n", "prefetch: expected an integer 1-65535, got 65536"),
        # paths os.path.expanduser cannot take (ValueError)
        ('data_dir: "~\\0x"\n', "data_dir: a path may not contain a NUL character"),
        ('data_dir: "~\\ud800"\n', "data_dir: not a usable path ("),
        ('components: {attribute_store: {url: "~\\0"}}\n', "components.attribute_store.url: a path may not contain a NUL character"),
        # a postgresql URL urlsplit refuses (ValueError)
        ("components: {attribute_store: {url: 'postgresql://[db/x'}}\n",
         "components.attribute_store.url: not a URL (Invalid IPv6 URL)"),
        # a key with a newline made a ConfigError of two lines
        ('http: {"a\\nb": 1}\n', "http.'a\\nb': unknown key"),
    ])
    def test_fuzzed_inputs_give_one_line_config_errors(self, text, expected):
        message = error_of(text, filename="x.yaml")
        assert message.startswith("x.yaml: ")
        assert expected in message, message


class PortCheckTests(FastCase):
    """check_ports_free's answers for each bind error, with a stand-in socket
    (binding real ports is tests/ooidx/test_config.py's part)."""

    def bind_failing_with(self, code: int) -> List[tuple]:
        import socket as socket_module

        binds: List[tuple] = []

        class Socket:
            def __init__(self, family: int, kind: int) -> None:
                self.family = family

            def setsockopt(self, *args: Any) -> None:
                pass

            def bind(self, address: tuple) -> None:
                binds.append((self.family, address))
                if code:
                    raise OSError(code, os.strerror(code))

            def close(self) -> None:
                pass

        self.patch(socket_module, "socket", Socket)
        return binds

    def test_each_error_is_named(self) -> None:
        import errno

        cfg = parse("http: {proxy_port: 81, web_port: 0}\n", "etc/dx.yaml", environ={})
        for code, what in ((errno.EADDRINUSE, "port 81 on 127.0.0.1 is in use"),
                           (errno.EACCES, "port 81 on 127.0.0.1: permission denied (ports below 1024 need "
                                          "privileges)"),
                           (errno.EADDRNOTAVAIL, "127.0.0.1 is not an address of this host"),
                           (errno.EMFILE, "cannot listen on port 81 on 127.0.0.1: Too many open files")):
            binds = self.bind_failing_with(code)
            with self.assertRaises(ConfigError) as e:
                config.check_ports_free(cfg)
            assert str(e.exception) == f"etc/dx.yaml: http.proxy_port: {what}"
            assert binds == [(socket.AF_INET, ("127.0.0.1", 81))]  # port 0 is never checked

    def test_ipv6_and_all_interfaces(self) -> None:
        binds = self.bind_failing_with(0)
        config.check_ports_free(parse("http: {interface: '::1', proxy_port: 8100, web_port: 8080}\n", "x.yaml",
                                      environ={}))
        assert binds == [(socket.AF_INET6, ("::1", 8100)), (socket.AF_INET6, ("::1", 8080))]
        import errno

        self.bind_failing_with(errno.EADDRINUSE)
        with self.assertRaises(ConfigError) as e:
            config.check_ports_free(parse("http: {interface: '', proxy_port: 8100}\n", "x.yaml", environ={}))
        assert str(e.exception) == "x.yaml: http.proxy_port: port 8100 on all interfaces is in use"
