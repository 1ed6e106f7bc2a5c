"""ooidx.config, the parts that bind ports or run git and systemd-analyze; the
rest is in the fast tier, tests/fast/core/test_config.py."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ooidx.config import ConfigError, check_ports_free, parse

ROOT = Path(__file__).resolve().parents[2]
ETC = ROOT / "etc"
UNIT = ETC / "systemd" / "ooidx@.service"
AMQP = "amqp://guest@127.0.0.1:5672/"


# --------------------------------------------------------------------------- #
# Ports


def listening_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_port_in_use():
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        cfg = parse(f"http: {{proxy_port: {port}, web_port: 0}}\n", "etc/dx.yaml", environ={})
        with pytest.raises(ConfigError) as info:
            check_ports_free(cfg)
    assert str(info.value) == f"etc/dx.yaml: http.proxy_port: port {port} on 127.0.0.1 is in use"


def test_port_in_use_names_the_component_key_it_came_from():
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        cfg = parse(
            f"components: {{web: {{port: {port}}}}}\n", "etc/dx.yaml", environ={}
        )
        with pytest.raises(ConfigError) as info:
            check_ports_free(cfg)
    assert str(info.value) == (
        f"etc/dx.yaml: components.web.port: port {port} on 127.0.0.1 is in use"
    )


def test_ports_of_components_not_on_this_node_are_not_checked():
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        cfg = parse(
            f"broker: {AMQP}\nhttp: {{proxy_port: {port}, web_port: {port}}}\n"
            "components: {fetcher: {}}\n",
            "etc/dx.yaml",
            environ={},
        )
        check_ports_free(cfg)  # no proxyng, no web: nothing to bind


def test_free_ports_pass():
    with listening_socket() as probe:
        free = probe.getsockname()[1]
    cfg = parse(f"http: {{proxy_port: {free}, web_port: 0}}\n", "etc/dx.yaml", environ={})
    check_ports_free(cfg)


def test_interface_that_is_not_ours():
    cfg = parse(
        "http: {interface: 192.0.2.1, proxy_port: 18100, web_port: 0}\n", "etc/dx.yaml", environ={}
    )
    with pytest.raises(ConfigError) as info:
        check_ports_free(cfg)
    assert str(info.value) == (
        "etc/dx.yaml: http.proxy_port: 192.0.2.1 is not an address of this host"
    )


# --------------------------------------------------------------------------- #
# The example files


def test_var_is_gitignored():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "-q", "var/ooidx/token"], cwd=ROOT, capture_output=True
    )
    assert result.returncode == 0, "var/ (the example data_dir) must be in .gitignore"


# --------------------------------------------------------------------------- #
# The systemd unit


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed here; the unit is checked where it exists",
)
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point it at one that does
    text = UNIT.read_text().replace("/opt/ooidx/venv/bin/twistd", sys.executable)
    assert sys.executable in text
    for name in ("ooidx@.service", "ooidx@edge.service"):
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", str(tmp_path / name)],
            capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
        )
        # verify exits 0 on unknown keys and bad values, warning on stderr: fail on those too
        complaints = [line for line in result.stderr.splitlines() if "ooidx@" in line]
        assert result.returncode == 0 and not complaints, result.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_does_catch_a_broken_unit(tmp_path):
    broken = tmp_path / "ooidx@.service"
    broken.write_text(
        UNIT.read_text()
        .replace("/opt/ooidx/venv/bin/twistd", sys.executable)
        .replace("Restart=on-failure", "Restart=sometimes")
    )
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(broken)], capture_output=True, text=True
    )
    assert "ooidx@" in result.stderr and "sometimes" in result.stderr
