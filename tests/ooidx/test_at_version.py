"""Saved versions through the proxy, end to end: C{/datasets/NAME@VERSION}.

A `twistd -n ooidx` node (memory:// bus: attribute_store, controller,
fetcher, pub_sub, notification, persister, proxyng, web) mirrors a pydap
upstream whose file this test rewrites between two refreshes (three time
steps, then five and a variable C{salt}). Then ncdump, a real DAP client,
opens C{http://HOST:PORT/datasets/typed@V1} and sees version 1, and
C{@latest} version 2; the .das/.dds/.dods/.nc served are byte for byte the
files saved on disk; an unknown version is a DAP error ncdump prints, and a
constraint on a saved .dods (what C{ncdump -v} asks for) is refused with one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dap_upstream import Upstream  # noqa: E402
from twistd_helpers import Daemon, direct_environment, free_port, write_config  # noqa: E402

from tests.fast.dissemination.pydap_answers import make_typed  # noqa: E402
from tests.support.node import api_call, http_get  # noqa: E402

TOKEN = "at-version-" + uuid.uuid4().hex
NCDUMP = shutil.which("ncdump") or "/usr/bin/ncdump"
UNSAVED = "20000101T000000Z-0123456789ab"


def ncdump(*args: str, home: str) -> subprocess.CompletedProcess:
    return subprocess.run([NCDUMP, *args], capture_output=True, timeout=60, env=direct_environment(HOME=home))


def publish(directory: Path, **options: Any) -> None:
    staging = directory.parent / f"staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    os.replace(make_typed(staging / "typed.nc", **options), directory / "typed.nc")
    shutil.rmtree(staging)


def saved_versions(web: str) -> List[str]:
    return [m["version"] for m in api_call(web, TOKEN, "persister", "versions", name="typed")]


def refresh(web: str, count: int, daemon: Daemon) -> List[str]:
    """Ask for the dataset; the saved versions once there are C{count} (bounded wait)."""
    api_call(web, TOKEN, "controller", "get_dataset", name="typed")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        versions = saved_versions(web)
        if len(versions) >= count:
            return versions
        time.sleep(0.2)
    raise AssertionError(f"no version {count} saved in 60 s\n{daemon.describe()}")


@pytest.fixture
def node(tmp_path: Path) -> Any:
    directory = tmp_path / "upstream"
    directory.mkdir()
    make_typed(directory / "typed.nc", times=3)
    with Upstream(directory) as upstream:
        proxy_port, web_port = free_port(), free_port()
        config = write_config(
            tmp_path / "dx.yaml", node="dx", broker="memory://", data_dir=str(tmp_path / "data"),
            components={"attribute_store": None, "controller": None, "fetcher": {"timeout": 10},
                        "pub_sub": None, "notification": None, "persister": None, "proxyng": None, "web": None},
            http={"proxy_port": proxy_port, "web_port": web_port}, timeouts={"shutdown": 3, "rpc": 10},
            security={"token": TOKEN, "allow_private": True, "allow_hosts": ["127.0.0.1"]})
        daemon = Daemon(config)
        try:
            daemon.wait_log("node dx started", 60)
            web = f"http://127.0.0.1:{web_port}"
            api_call(web, TOKEN, "controller", "register", name="typed", url=upstream.url("typed.nc"))
            yield {"proxy": f"http://127.0.0.1:{proxy_port}", "web": web, "daemon": daemon,
                   "upstream": directory, "data": tmp_path / "data" / "datasets" / "typed"}
        finally:
            daemon.terminate()
            try:
                daemon.wait_exit(20)
            finally:
                daemon.kill()


def test_old_versions_through_the_proxy(node: Dict[str, Any], tmp_path: Path) -> None:
    proxy, web, daemon, data = node["proxy"], node["web"], node["daemon"], node["data"]
    (v1,) = refresh(web, 1, daemon)
    publish(node["upstream"], times=5, extra=True)
    versions = refresh(web, 2, daemon)
    assert versions[0] == v1 and len(versions) == 2
    v2 = versions[1]
    home = str(tmp_path)

    # ncdump, a real DAP client, sees each version as it was saved
    one = ncdump("-h", f"{proxy}/datasets/typed@{v1}", home=home)
    assert one.returncode == 0, (one.stderr, daemon.describe())
    assert b"time = 3 ;" in one.stdout and b"salt" not in one.stdout, one.stdout
    latest = ncdump("-h", f"{proxy}/datasets/typed@latest", home=home)
    assert latest.returncode == 0, (latest.stderr, daemon.describe())
    assert b"time = 5 ;" in latest.stdout and b"salt" in latest.stdout, latest.stdout
    # reading values asks for a constrained .dods, which cannot be applied to what is on disk: ncdump says so
    values = ncdump("-v", "time", f"{proxy}/datasets/typed@{v1}", home=home)
    assert values.returncode != 0 and b"not supported on saved versions" in values.stderr, values.stderr

    # byte for byte what was saved, with what DAP clients read it by
    for version, name in ((v1, v1), (v2, "latest"), (v2, v2)):
        for suffix, description in ((".das", "dods_das"), (".dds", "dods_dds"), (".dods", "dods_data"),
                                    (".nc", None)):
            status, headers, body = http_get(f"{proxy}/datasets/typed@{name}{suffix}")
            assert status == 200, (name, suffix, body[:300])
            assert body == (data / version / f"typed{suffix}").read_bytes(), (name, suffix)
            assert headers.get("Content-Description") == description
            assert headers.get("X-Ooidx-Version") == version

    # an unknown version: 404 with a DAP error body, which ncdump prints
    status, headers, body = http_get(f"{proxy}/datasets/typed@{UNSAVED}.dds")
    assert status == 404 and headers.get("Content-Description") == "dods_error", (status, body)
    assert body.startswith(b"Error {") and b"code = 404;" in body and b"UnknownVersion" in body, body
    unknown = ncdump("-h", f"{proxy}/datasets/typed@{UNSAVED}", home=home)
    # netCDF-C reads a 404 as a missing file
    assert unknown.returncode != 0 and b"NetCDF: file not found" in unknown.stderr, unknown.stderr
    status, _, body = http_get(f"{proxy}/datasets/nosuch@latest.das")
    assert status == 404 and b"UnknownVersion" in body
    # a constraint cannot be applied to what is on disk
    status, headers, body = http_get(f"{proxy}/datasets/typed@{v1}.dods?time")
    assert status == 400 and body.startswith(b"Error {") and b"not supported on saved versions" in body
    status, _, body = http_get(f"{proxy}/datasets/typed@not-a-version.das")
    assert status == 400 and b"InvalidVersion" in body
