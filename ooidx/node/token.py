"""The operator token: what the web API asks of callers, and where it lives.

The token comes from the config (C{security.token}) when set there. Otherwise
the daemon makes one at its first start and keeps it in
C{DATA_DIR/operator-token}, readable by the daemon's own user only (0600, in
a data directory made 0700), and reuses it at every later start. The log
says where the token is, never what it is. The C{ooidx} command finds it
there when run on the same machine (L{find_token}).
"""
from __future__ import annotations

import os
import secrets
import stat
from typing import Any, Optional

from twisted.logger import Logger

__all__ = ["TOKEN_FILE", "TokenError", "ensure_token", "find_token", "token_path", "read_token_file",
           "private_directory"]

#: The token file's name inside the data directory.
TOKEN_FILE = "operator-token"
#: Shortest token accepted from a file (the config enforces the same).
MIN_LENGTH = 16

_log = Logger()


class TokenError(Exception):
    """The token file cannot be read, written or used; the message names the file (never the token)."""


def token_path(data_dir: str) -> str:
    return os.path.join(data_dir, TOKEN_FILE)


def read_token_file(path: str) -> Optional[str]:
    """The token kept in C{path}, or None if there is no such file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TokenError(f"{path}: cannot read the operator token: {e.strerror or e}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"{path}: the operator token file is not ASCII text") from None
    if len(token) < MIN_LENGTH or any(c.isspace() for c in token):
        raise TokenError(f"{path}: the operator token file does not hold a token "
                         f"({MIN_LENGTH}+ characters, no spaces); delete it to have a new one made")
    return token


def ensure_token(config: Any, log: Optional[Logger] = None) -> str:
    """The operator token: C{config.security.token}, else the one in the data
    directory, else a new one written there (0600). Raises L{TokenError}."""
    log = log or _log
    configured = getattr(getattr(config, "security", None), "token", None)
    if configured:
        log.info("web API: using the operator token from the config ({source}: security.token)",
                 source=getattr(config, "source", "config"))
        return configured
    data_dir = config.data_dir
    path = token_path(data_dir)
    token = read_token_file(path)
    if token is not None:
        _tighten(path, log)
        log.info("web API: using the operator token kept in {path}", path=path)
        return token
    token = _create(data_dir, path)
    if token is None:  # another process made it between our read and our write
        token = read_token_file(path)
        if token is None:
            raise TokenError(f"{path}: the operator token file vanished while it was being made")
    else:
        log.info("web API: made a new operator token in {path} (readable by this user only); "
                 "`ooidx` finds it there, or export OOIDX_TOKEN=\"$(cat {path})\"", path=path)
    return token


def find_token(config_path: Optional[str] = None, data_dir: Optional[str] = None) -> Optional[str]:
    """The operator token as the C{ooidx} command finds it on the daemon's
    machine: the token file in C{data_dir}, or else the config file's
    C{security.token} or the token file in its data directory. None if none is
    found. Raises L{ooidx.config.ConfigError} for a bad config file and
    L{TokenError} for an unreadable token file."""
    if data_dir is not None:
        return read_token_file(token_path(data_dir))
    if config_path is None:
        return None
    from ooidx.config import load
    config = load(config_path)
    if config.security.token:
        return config.security.token
    return read_token_file(token_path(config.data_dir))


def _create(data_dir: str, path: str) -> Optional[str]:
    """Write a new token to C{path} atomically (complete or absent, never
    half-written) with mode 0600; None if C{path} appeared meanwhile."""
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise TokenError(f"{data_dir}: cannot make the data directory for the operator token: "
                         f"{e.strerror or e}") from None
    token = secrets.token_urlsafe(32)
    temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # atomic, and fails if the file exists
        except FileExistsError:
            return None
        except OSError:
            # No hard links on this file system: create the file itself exclusively.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            except FileExistsError:
                return None
            try:
                os.write(fd, token.encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise TokenError(f"{path}: cannot write the operator token: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(temp)
        except OSError:
            pass
    return token


def _tighten(path: str, log: Logger) -> None:
    """Make a token file others can read private again, and say so."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warn("{path} was readable by others (mode {mode:o}); made it 0600", path=path, mode=mode)
    except OSError as e:
        log.warn("cannot check the permissions of {path}: {reason}", path=path, reason=e.strerror or e)


def private_directory(path: str, log: Optional[Logger] = None) -> None:
    """Make the data directory C{path} this user's only (0700), whatever it
    was before: it holds the operator token, the attribute store (webhook URLs,
    token hashes) and the cache. Logs what it changed; a directory it cannot
    make or change is logged, not raised (the component that needs it says why)."""
    log = log or _log
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
            log.warn("the data directory {path} was open to others (mode {mode:o}); made it {new:o}", path=path,
                     mode=mode, new=mode & 0o700)
    except OSError as e:
        log.warn("cannot make the data directory {path} private: {reason}", path=path, reason=e.strerror or e)
