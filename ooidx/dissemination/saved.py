"""The saved versions of datasets on disk: their names, their manifests, and
the blocking work of writing one atomically and reading them back
(docs/dissemination.md, "persister").

Everything here blocks: the persister (L{ooidx.dissemination.persister})
runs it in its own disk threads. The layout, the atomic write (a C{.tmp-}
directory renamed into place) and the manifest are described in the
persister's docstring.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from magnet.errors import Refusal

from ooidx import dap
from ooidx.dissemination import changes
from ooidx.dissemination.netcdf import DecodeError, to_netcdf

__all__ = ["DATASETS", "MANIFEST", "TEMP_PREFIX", "PART_PREFIX", "VERSION", "LATEST", "InvalidVersion",
           "UnknownVersion", "valid_version", "version_name", "read_manifest", "list_versions",
           "SAVED_PARTS", "saved_headers"]

DATASETS = "datasets"
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
PART_PREFIX = ".part-"
_CHUNK_WRITE = 1024 * 1024
#: What a version's name looks like (L{version_name}).
VERSION = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}\Z")
#: The name that means a dataset's last saved version.
LATEST = "latest"
#: The files of a version served by name (C{persister.open_version}): suffix -> (Content-Type, Content-Description).
SAVED_PARTS = {
    ".das": ("text/plain; charset=utf-8", "dods_das"),
    ".dds": ("text/plain; charset=utf-8", "dods_dds"),
    ".dods": ("application/octet-stream", "dods_data"),
    ".nc": ("application/x-netcdf", None),
}


class InvalidVersion(Refusal):
    """Not a version name (C{YYYYmmddTHHMMSSZ-SHA12} or C{latest}): 400."""


class UnknownVersion(Refusal):
    """No such version of the dataset is saved: 404."""


def valid_version(version: object) -> bool:
    """Whether C{version} may name a version: L{VERSION}'s form or L{LATEST}."""
    return isinstance(version, str) and (version == LATEST or VERSION.match(version) is not None)


def version_name(saved: float, sha256: str) -> str:
    """C{YYYYmmddTHHMMSSZ-SHA12}: the UTC save time and the .dods's short sha256."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(saved)) + "-" + sha256[:12]


def read_manifest(version_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(version_dir, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def list_versions(dataset_dir: str) -> List[str]:
    """The version directory names under a dataset's directory (no temporaries), sorted."""
    try:
        names = os.listdir(dataset_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(dataset_dir, n)))


# --------------------------------------------------------------------------- #
# blocking disk work (in the persister's threads)


def _prepare(root: str) -> int:
    """Make the datasets directory; remove temporary versions of processes gone. How many removed."""
    os.makedirs(root, exist_ok=True)
    removed = 0
    for dataset in os.listdir(root):
        dataset_dir = os.path.join(root, dataset)
        if not os.path.isdir(dataset_dir):
            continue
        for entry in os.listdir(dataset_dir):
            if entry.startswith(TEMP_PREFIX) and not _writer_alive(entry):
                shutil.rmtree(os.path.join(dataset_dir, entry), ignore_errors=True)
                removed += 1
    return removed


def _writer_alive(temp_name: str) -> bool:
    try:
        pid = int(temp_name[len(TEMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_temp(dataset_dir: str) -> str:
    os.makedirs(dataset_dir, exist_ok=True)
    temp = os.path.join(dataset_dir, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    os.mkdir(temp)
    return temp


def _open_part(directory: str, name: str) -> int:
    return os.open(os.path.join(directory, PART_PREFIX + name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK_WRITE])
        view = view[written:]


def _close_part(fd: int, directory: str, name: str) -> None:
    """fsync and close a part file, and rename it to its name."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(os.path.join(directory, PART_PREFIX + name), os.path.join(directory, name))


def _write_file(directory: str, name: str, data: bytes) -> None:
    fd = _open_part(directory, name)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    _close_part(fd, directory, name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cleanup(fd: Optional[int], temp: Optional[str]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    if temp is not None:
        shutil.rmtree(temp)


def _digest(path: str) -> Tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1024 * 1024)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def _finish_version(fd: int, temp: str, dataset_dir: str, version: str, name: str, manifest: Dict[str, Any],
                    das: Optional[str], convert: bool, dds: Optional[str] = None,
                    previous: Optional[str] = None) -> Dict[str, Any]:
    """Close the .dods, write the .nc and the manifest (with the change summary
    from version C{previous}), and rename the version into place."""
    _close_part(fd, temp, name + ".dods")
    nc_name = name + ".nc"
    if not convert:
        netcdf: Dict[str, Any] = {"error": "the .dods is larger than the persister converts to netCDF"}
    else:
        part = os.path.join(temp, PART_PREFIX + nc_name)
        try:
            netcdf = to_netcdf(os.path.join(temp, name + ".dods"), part, das)
        except DecodeError as e:
            netcdf = {"error": str(e)[:1000]}
            if os.path.exists(part):
                os.unlink(part)
        else:
            nc_fd = os.open(part, os.O_RDONLY)
            _close_part(nc_fd, temp, nc_name)
    files = {}
    for file in sorted(os.listdir(temp)):
        if file.startswith(PART_PREFIX):
            continue
        size, sha = _digest(os.path.join(temp, file))
        files[file] = {"bytes": size, "sha256": sha}
    coverage = netcdf.pop("coverage", None) or {}
    summary = _summary(name, version, das, dds, coverage, files,
                       os.path.join(dataset_dir, previous) if previous else None)
    manifest = dict(manifest, files=files, netcdf=netcdf, coverage=coverage, changes=summary)
    _write_file(temp, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))
    _fsync_dir(temp)
    target = os.path.join(dataset_dir, version)
    if os.path.exists(target):
        raise FileExistsError(errno.EEXIST, f"version {version} exists already")
    os.rename(temp, target)
    _fsync_dir(dataset_dir)
    return {"files": files, "netcdf": netcdf, "versions": len(list_versions(dataset_dir)), "changes": summary}


def _summary(name: str, version: str, das: Optional[str], dds: Optional[str], coverage: Dict[str, Any],
             files: Dict[str, Any], previous_dir: Optional[str]) -> Dict[str, Any]:
    """The change summary of a new version; a summary that cannot be made
    says why instead (the version is saved either way)."""
    try:
        before = changes.profile_of(previous_dir, name) if previous_dir else None
        return changes.summarize(before, changes.profile(name, version, das, dds, coverage, files))
    except Exception as e:  # noqa: BLE001 - a summary is a report, not part of the version
        return {"from": os.path.basename(previous_dir) if previous_dir else None, "to": version,
                "error": _describe(e)[:500], "text": "the change summary could not be made"}


def _last_saved(dataset_dir: str, name: str) -> Tuple[int, str, str]:
    best: Tuple[int, float, str, str] = (0, 0.0, "", "")
    for version in list_versions(dataset_dir):
        manifest = read_manifest(os.path.join(dataset_dir, version))
        if manifest is None:
            continue
        sequence = manifest.get("sequence")
        saved = manifest.get("saved")
        sha = ((manifest.get("files") or {}).get(name + ".dods") or {}).get("sha256")
        if isinstance(sequence, int) and isinstance(sha, str):
            key = (sequence, saved if isinstance(saved, (int, float)) else 0.0, sha, version)
            if key[:2] > best[:2]:
                best = key
    return best[0], best[2], best[3]


def _manifests(dataset_dir: str) -> List[Dict[str, Any]]:
    out = []
    for version in list_versions(dataset_dir):
        manifest = read_manifest(os.path.join(dataset_dir, version))
        if manifest is not None:
            out.append(manifest)
    out.sort(key=lambda m: (m.get("sequence") or 0, m.get("saved") or 0))
    return out


def _one_manifest(dataset_dir: str, name: str, version: str) -> Dict[str, Any]:
    if version == LATEST:
        manifests = _manifests(dataset_dir)
        if not manifests:
            raise UnknownVersion(f"no version of {name} is saved")
        return manifests[-1]
    manifest = read_manifest(os.path.join(dataset_dir, version))
    if manifest is None:
        raise UnknownVersion(f"no version {version} of {name} is saved")
    return manifest


def saved_headers(part: str, version: str, latest: bool) -> List[List[str]]:
    """The HTTP header fields of a saved file served as C{part}: what a DAP
    client reads it by (C{Content-Description}), and which version it is."""
    content_type, description = SAVED_PARTS[part]
    headers = [["Content-Type", content_type], ["X-Ooidx-Version", version],
               ["Cache-Control", "no-cache" if latest else "public, max-age=86400"]]
    if description is not None:
        headers += [["Content-Description", description], ["XDODS-Server", "dods/2.0"]]
    return headers


def _open_saved(dataset_dir: str, name: str, version: str, part: str) -> Tuple[str, Any, int]:
    """Open the file C{part} of a saved version (L{LATEST}: the last saved):
    (the version's name, the open file, its size). L{UnknownVersion} when the
    version, or that file of it (a .nc pydap could not make), is not saved."""
    manifest = _one_manifest(dataset_dir, name, version)
    resolved = manifest.get("version") if version == LATEST else version
    if not isinstance(resolved, str) or not VERSION.match(resolved):
        raise UnknownVersion(f"the last version of {name} has no valid name in its manifest")
    path = os.path.join(dataset_dir, resolved, name + part)
    try:
        f = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError):
        raise UnknownVersion(f"version {resolved} of {name} has no {part} saved") from None
    try:
        size = os.fstat(f.fileno()).st_size
    except BaseException:
        f.close()
        raise
    return resolved, f, size


def _diff(dataset_dir: str, name: str, before: str, after: str, limit: int) -> Dict[str, Any]:
    dirs = []
    for version in (before, after):
        manifest = _one_manifest(dataset_dir, name, version)
        dirs.append(os.path.join(dataset_dir, str(manifest.get("version") or version)))
    return changes.summarize(changes.profile_of(dirs[0], name), changes.profile_of(dirs[1], name), limit)


def _check_name(name: object) -> None:
    if not dap.valid_name(name):
        raise ValueError(f"not a dataset name: {str(name)[:80]!r}")


def _check_version(version: object) -> None:
    if not valid_version(version):
        raise InvalidVersion(f"not a version: {str(version)[:80]!r} (YYYYmmddTHHMMSSZ-SHA12, or {LATEST})")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
