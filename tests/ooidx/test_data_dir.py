"""The data directory is this user's only: 0700, and the attribute store's
files (webhook URLs, token hashes) 0600, whatever they were before."""
from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from ooidx.config import load
from ooidx.node.daemon import Daemon
from tests.ooidx.twistd_helpers import write_config


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest_twisted.ensureDeferred
async def test_an_open_data_directory_and_store_are_made_private(tmp_path: Path) -> None:
    """The attack: another local user reads attributes.sqlite3 (created 0644 in
    a data directory left 0755) and so every webhook URL with its secret."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    store = data / "attributes.sqlite3"
    store.write_bytes(b"")
    os.chmod(store, 0o644)
    wal = data / "attributes.sqlite3-wal"
    wal.write_bytes(b"")
    os.chmod(wal, 0o644)
    config = load(str(write_config(tmp_path / "node.yaml", node="unit", broker=f"memory://dd-{uuid.uuid4().hex}",
                                   data_dir=str(data), components={"attribute_store": None},
                                   timeouts={"rpc": 5, "shutdown": 2})))
    node = Daemon(config, reactor=reactor)
    node.startService()
    try:
        await node._starting
        assert node.started
        await node.bus.call("attribute_store", "set", key="person:ann", value={"token_sha256": "x"})
        assert mode(data) == 0o700
        for path in (store, wal):
            assert mode(path) == 0o600, path
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_a_new_store_is_private_from_the_start(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        config = load(str(write_config(tmp_path / "node.yaml", node="unit", broker=f"memory://dd-{uuid.uuid4().hex}",
                                       components={"attribute_store": None}, timeouts={"rpc": 5, "shutdown": 2})))
        node = Daemon(config, reactor=reactor)
        node.startService()
        try:
            await node._starting
            await node.bus.call("attribute_store", "set", key="person:ann", value={"token_sha256": "x"})
            data = Path(config.data_dir)
            assert mode(data) == 0o700
            for path in data.iterdir():
                if path.name.startswith("attributes.sqlite3"):
                    assert mode(path) == 0o600, (path, oct(mode(path)))
        finally:
            await node.stopService()
    finally:
        os.umask(old)
