"""Hostile configuration files: hypothesis-generated YAML structures (the
real keys with values of every type, random keys, random text), YAML bombs
(billion laughs, self-referencing aliases), odd encodings.

What must hold: ``ooidx.config.parse`` either returns a config or raises
one ConfigError whose text is one line naming the file, never another
exception and never after more than a second or two; and `twistd -n ooidx`
with such a file exits non-zero with that one line and no traceback.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ooidx.config import Config, ConfigError, load, parse
from tests.reliability.results import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ooidx"))
from twistd_helpers import run_twistd  # noqa: E402

EXAMPLES = 400
FILENAME = "/etc/ooidx/hostile.yaml"

COMPONENTS = ["attribute_store", "cache", "controller", "csv", "fetcher", "notification",
              "persister", "proxyng", "pub_sub", "user_notification", "user_pub_sub", "web"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["memory://", "amqp://guest:guest@127.0.0.1:5672/", "amqp://", "amqps://[::1]:0/x",
                     "postgresql://x", "http://127.0.0.1/", "0", "-1", "1e999", "nan", "inline", "child",
                     "quorum", "classic", "json", "text", "debug", "../../etc", "/", "\x00", "~", "*.example.org",
                     "127.0.0.1:99999", "[::1]:80", "a" * 300]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.text(max_size=12) | st.sampled_from(["instances", "process", "url",
                                                                              "max_bytes", "max_age", "timeout",
                                                                              "port", "interface"]),
                                      inner, max_size=4), max_leaves=12)
component_entry = st.one_of(st.none(), values, st.fixed_dictionaries({}, optional={
    "instances": values, "process": values, "url": values, "max_bytes": values, "max_age": values,
    "timeout": values, "max_redirects": values, "port": values, "interface": values, "options": values}))
documents = st.fixed_dictionaries({}, optional={
    "node": values, "broker": values, "data_dir": values,
    "components": st.one_of(values, st.dictionaries(st.sampled_from(COMPONENTS) | st.text(max_size=10),
                                                    component_entry, max_size=5)),
    "http": st.one_of(values, st.fixed_dictionaries({}, optional={"proxy_port": values, "web_port": values,
                                                                   "interface": values})),
    "timeouts": st.one_of(values, st.dictionaries(st.sampled_from(["rpc", "send", "shutdown", "connect",
                                                                   "heartbeat", "x"]), values, max_size=5)),
    "retries": st.one_of(values, st.fixed_dictionaries({}, optional={"limit": values})),
    "prefetch": values, "queue_type": values,
    "security": st.one_of(values, st.fixed_dictionaries({}, optional={"token": values, "allow_hosts": values,
                                                                       "allow_private": values,
                                                                       "read_token": values})),
    "logging": st.one_of(values, st.fixed_dictionaries({}, optional={"format": values, "level": values})),
    "extra_key": values,
})


def check_parse(text: str, counts: Dict[str, int], limit: float = 2.0) -> None:
    started = time.monotonic()
    try:
        result = parse(text, FILENAME, environ={})
    except ConfigError as e:
        line = str(e)
        assert "\n" not in line and line.startswith(FILENAME + ":"), line
        assert len(line) < 2000, line[:300]
        counts["refused"] += 1
    else:
        assert isinstance(result, Config)
        counts["valid"] += 1
    took = time.monotonic() - started
    assert took < limit, f"parse took {took:.1f} s on {text[:200]!r}"


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True, sort_keys=False)


def test_generated_structures() -> None:
    counts = {"refused": 0, "valid": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(documents)
    def run(document: Dict[str, Any]) -> None:
        check_parse(_dump(document), counts)

    run()
    record("hostile", "config-generated-structures", inputs_tried=sum(counts.values()), errors=0,
           notes=f"hypothesis YAML documents over the real keys: {counts['refused']} ConfigError (one line), "
                 f"{counts['valid']} valid")


def test_generated_text() -> None:
    counts = {"refused": 0, "valid": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=300) | st.builds(lambda a, b: a + ":\n  " + b,
                                             st.sampled_from(["components", "http", "security", "broker",
                                                              "timeouts", "logging"]), st.text(max_size=100)))
    def run(text: str) -> None:
        check_parse(text, counts)

    run()
    record("hostile", "config-generated-text", inputs_tried=sum(counts.values()), errors=0,
           notes=f"hypothesis text: {counts['refused']} ConfigError, {counts['valid']} valid")


BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                 [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)] +
                 ["components: *i"])

HANDWRITTEN: List[str] = [
    BOMB,
    BOMB.replace("components: *i", "security:\n  allow_hosts: *i"),
    BOMB.replace("components: *i", "node: *i"),
    "components: &c\n  fetcher: *c\n",
    "x: &x [*x]\nsecurity: {allow_hosts: *x}\n",
    "security: &s {allow_hosts: [], token: *s}\n",
    "node: !!python/object/apply:os.system ['true']\n",
    "node: !!binary aGVsbG8=\n",
    "node: !!set {a, b}\n",
    "node: 2001-12-14t21:59:43.10-05:00\n",
    "components: {fetcher: {instances: 1e999}}\n",
    "components: {fetcher: {instances: .nan}}\n",
    "components: {fetcher: {instances: 100000000000000000000000000}}\n",
    "timeouts: {rpc: .inf}\n",
    "timeouts: {rpc: -.inf}\n",
    "http: {proxy_port: 65536}\n",
    "http: {proxy_port: true}\n",
    "prefetch: 0x7fffffffffffffff\n",
    "data_dir: \"\\0/etc\"\n",
    "data_dir: " + "a/" * 5000 + "\n",
    "broker: \"amqp://user:secret@[::1\"\n",
    "broker: [\"amqp://a\", \"memory://\"]\n",
    "broker: []\n",
    "[" * 5000 + "]" * 5000 + "\n",
    "{" * 5000 + "}" * 5000 + "\n",
    "a:\n" + "".join("  " * i + "- \n" for i in range(1, 2000)),
    "node: x\nnode: y\n",
    "? [a, b]\n: c\n",
    "node: \"\\uD800\"\n",
    "\ufeffnode: bom\n",
    "%YAML 9.9\n---\nnode: x\n",
    "--- a\n--- b\n",
    "security: {allow_hosts: [\"*\", \"*.*\", \"0/0\", \"::/0\", \"\"]}\n",
    "components: {web: {port: -1, interface: \"0.0.0.0\\nX\"}}\n",
    "logging: {level: 'CRITICAL\\nforged line'}\n",
]


@pytest.mark.parametrize("text", HANDWRITTEN, ids=[f"case{i}" for i in range(len(HANDWRITTEN))])
def test_handwritten(text: str) -> None:
    check_parse(text, {"refused": 0, "valid": 0}, limit=5.0)


def test_handwritten_recorded() -> None:
    counts = {"refused": 0, "valid": 0}
    for text in HANDWRITTEN:
        check_parse(text, counts, limit=5.0)
    record("hostile", "config-handwritten", inputs_tried=len(HANDWRITTEN), errors=0,
           notes=f"YAML bombs, recursive aliases, python tags, huge numbers, deep nesting: "
                 f"{counts['refused']} ConfigError, {counts['valid']} valid")


def test_undecodable_files(tmp_path: Path) -> None:
    for i, raw in enumerate([b"\xff\xfe\x00n\x00o", b"node: \xc3\x28\n", b"\x00" * 100, b""]):
        path = tmp_path / f"bad{i}.yaml"
        path.write_bytes(raw)
        try:
            load(str(path), environ={})
        except ConfigError as e:
            assert "\n" not in str(e)
    with pytest.raises(ConfigError):
        load(str(tmp_path / "missing.yaml"), environ={})
    with pytest.raises(ConfigError):
        load(str(tmp_path), environ={})


@pytest.mark.parametrize("index", [0, 4, 6, 10, 23, 30])
def test_twistd_says_one_line(tmp_path: Path, index: int) -> None:
    """The daemon itself: exit non-zero, the error in one line, no traceback."""
    config = tmp_path / "dx.yaml"
    config.write_text(HANDWRITTEN[index] if index != 30 else "node: x\ncomponents: {fetcher: {instances: four}}\n")
    started = time.monotonic()
    done = run_twistd(config, timeout=60)
    output = done.stdout + done.stderr
    if index == 30 or "ConfigError" in output or done.returncode != 0:
        assert done.returncode != 0, output[-2000:]
        assert "Traceback" not in output, output[-3000:]
        assert str(config) in output or "dx.yaml" in output, output[-2000:]
    assert time.monotonic() - started < 30
