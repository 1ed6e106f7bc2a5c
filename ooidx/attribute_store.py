"""The attribute store: a persistent key -> JSON value map, served as RPC.

    yield bus.call("attribute_store", "set", key="dataset:sst", value={...})
    record = yield bus.call("attribute_store", "get", key="dataset:sst")   # KeyError if absent
    found = yield bus.call("attribute_store", "query", regex="^dataset:")  # {key: value}
    existed = yield bus.call("attribute_store", "delete", key="dataset:sst")

It holds the dataset registry and its state (docs/data-path.md). Two
backends, both through L{twisted.enterprise.adbapi}, so the database work
runs in a thread pool and never blocks the reactor:

- SQLite (the embedded default): the config's C{url} is an absolute file
  path (by default C{attributes.sqlite3} in the data directory). One
  connection, one thread: SQLite serialises writers anyway.
- PostgreSQL (C{attribute_store: {url: postgresql://...}}): the choice when
  several nodes share the registry. The table is created if missing;
  C{set} is an C{INSERT ... ON CONFLICT DO UPDATE}.

Values are stored as JSON text. Keys are non-empty strings of at most
L{MAX_KEY_BYTES} UTF-8 bytes without NUL. C{query} takes a Python regular
expression (C{re.search} semantics, so anchor it with C{^}) of at most
L{MAX_PATTERN_LENGTH} characters; a literal prefix after C{^} narrows the
scan to a key range, so C{^dataset:} reads only the dataset keys.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from magnet import operation

from ooidx.component import Component

__all__ = ["AttributeStore", "InvalidKey", "InvalidPattern", "InvalidValue", "MAX_KEY_BYTES",
           "MAX_PATTERN_LENGTH", "open_backend"]

MAX_KEY_BYTES = 1024
MAX_PATTERN_LENGTH = 512
DEFAULT_TABLE = "attributes"
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
_METACHARACTERS = set(".^$*+?{}[]\\|()")


class InvalidKey(ValueError):
    """A key that is not a non-empty string of at most MAX_KEY_BYTES bytes without NUL."""


class InvalidPattern(ValueError):
    """A query pattern that is not a string, is too long, or does not compile."""


class InvalidValue(ValueError):
    """A value that is not JSON (an object, NaN, infinity)."""


def check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise InvalidKey(f"a key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKey("a key must not be empty")
    if "\x00" in key:
        raise InvalidKey("a key must not contain NUL")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a key may be at most {MAX_KEY_BYTES} bytes (UTF-8), got {size}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey("a key must be valid Unicode (no lone surrogates)") from None
    return key


def encode_value(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"the value is not JSON: {e}") from None
    except RecursionError:
        raise InvalidValue("the value is nested too deeply") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue("the value holds text that is not valid Unicode (a lone surrogate)") from None
    return text


def compile_pattern(regex: Any) -> "re.Pattern[str]":
    if not isinstance(regex, str):
        raise InvalidPattern(f"a query pattern must be a string, got {type(regex).__name__}")
    if len(regex) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"a query pattern may be at most {MAX_PATTERN_LENGTH} characters, got {len(regex)}")
    try:
        return re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        raise InvalidPattern(f"not a valid regular expression: {regex!r}: {e}") from None


def literal_prefix(regex: str) -> str:
    """The literal text every match must start with, for a pattern anchored
    with C{^} (C{"^dataset:"} -> C{"dataset:"}); empty if there is none."""
    if not regex.startswith("^"):
        return ""
    prefix: List[str] = []
    for i, c in enumerate(regex[1:], 1):
        if c in _METACHARACTERS:
            if c in "*?{" and prefix:  # the last literal is optional or repeated
                prefix.pop()
            elif c == "|":  # an alternative: no common prefix known
                return ""
            break
        prefix.append(c)
    if "|" in regex:  # an alternative further on (outside a group) may start differently
        return ""
    return "".join(prefix)


def prefix_range(prefix: str) -> Optional[Tuple[str, str]]:
    """[low, high) in code point order covering every key that starts with C{prefix}."""
    if not prefix or ord(prefix[-1]) >= 0x10FFFF or 0xD7FF <= ord(prefix[-1]) < 0xE000:
        return None
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _decode_rows(rows: List[Tuple[str, str]], pattern: "re.Pattern[str]") -> Dict[str, Any]:
    return {key: json.loads(value) for key, value in rows if pattern.search(key)}


# --------------------------------------------------------------------------- #
# backends


class Backend:
    """SQL shared by both databases; subclasses say how to connect and the
    parameter style."""

    log = Logger()
    mark = "?"

    def __init__(self, table: str, reactor: Any) -> None:
        if not TABLE_NAME.match(table):
            raise ValueError(f"not a table name: {table!r}")
        self.table = table
        self.reactor = reactor
        self.pool: Optional[adbapi.ConnectionPool] = None

    def describe(self) -> str:
        raise NotImplementedError

    def make_pool(self) -> adbapi.ConnectionPool:
        raise NotImplementedError

    def create_sql(self) -> str:
        raise NotImplementedError

    def upsert_sql(self) -> str:
        t, m = self.table, self.mark
        return (f"INSERT INTO {t} (key, value, updated) VALUES ({m}, {m}, {m}) "
                f"ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated = excluded.updated")

    def open(self) -> Deferred:
        self.pool = self.make_pool()
        d = self.pool.runInteraction(self._create)
        d.addErrback(self._close_on_failure)
        return d

    def _create(self, cursor: Any) -> None:
        cursor.execute(self.create_sql())

    def _close_on_failure(self, failure: Any) -> Any:
        self.close()
        return failure

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    def _pool(self) -> adbapi.ConnectionPool:
        if self.pool is None:
            raise RuntimeError("the attribute store is not open")
        return self.pool

    def get(self, key: str) -> Deferred:
        sql = f"SELECT value FROM {self.table} WHERE key = {self.mark}"
        return self._pool().runQuery(sql, (key,))

    def set(self, key: str, text: str) -> Deferred:
        return self._pool().runOperation(self.upsert_sql(), (key, text, time.time()))

    def delete(self, key: str) -> Deferred:
        sql = f"DELETE FROM {self.table} WHERE key = {self.mark}"
        return self._pool().runInteraction(lambda cursor: (cursor.execute(sql, (key,)), cursor.rowcount)[1] > 0)

    def query(self, pattern: "re.Pattern[str]") -> Deferred:
        """{key: value} for the keys the pattern matches; the filtering and the
        JSON decoding run in the pool's thread too."""
        bounds = prefix_range(literal_prefix(pattern.pattern))
        t, m = self.table, self.mark
        if bounds is None:
            sql, args = f"SELECT key, value FROM {t}", ()
        else:
            sql, args = f"SELECT key, value FROM {t} WHERE key >= {m} AND key < {m}", bounds

        def run(cursor: Any) -> Dict[str, Any]:
            cursor.execute(sql, args)
            return _decode_rows(cursor.fetchall(), pattern)

        return self._pool().runInteraction(run)


log = Logger(namespace="ooidx.attribute_store")


def private_file(path: str) -> None:
    """Make C{path} (and its directory) readable by this user only: the
    directory 0700 and the file 0600 whatever they were before, the file made
    empty with that mode if it is not there yet, and SQLite's own companions
    (C{-wal}, C{-shm}, C{-journal}) tightened too; SQLite makes new ones with
    the database file's mode. The store holds webhook URLs (which may carry a
    person's secret) and token hashes."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _tighten(directory, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.close(fd)
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        _tighten(name, 0o600)


def _tighten(path: str, mode: int) -> None:
    try:
        current = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if current & ~mode & 0o777:
        os.chmod(path, current & mode)
        log.warn("{path} was readable by others (mode {old:o}); made it {new:o}", path=path, old=current,
                 new=current & mode)


class SQLiteBackend(Backend):
    mark = "?"

    def __init__(self, path: str, table: str, reactor: Any) -> None:
        super().__init__(table, reactor)
        if not os.path.isabs(path):
            raise ValueError(f"the sqlite path must be absolute, got {path!r}")
        self.path = path

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def make_pool(self) -> adbapi.ConnectionPool:
        private_file(self.path)

        def opened(connection: Any) -> None:
            connection.execute("PRAGMA busy_timeout = 10000")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")

        # one connection used from one thread: SQLite has one writer anyway
        return adbapi.ConnectionPool("sqlite3", self.path, check_same_thread=False, cp_min=1, cp_max=1,
                                     cp_openfun=opened, cp_reactor=self.reactor)

    def create_sql(self) -> str:
        return (f"CREATE TABLE IF NOT EXISTS {self.table} "
                f"(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL, updated REAL NOT NULL)")


class PostgresBackend(Backend):
    mark = "%s"

    def __init__(self, url: str, table: str, reactor: Any, connections: int = 4) -> None:
        super().__init__(table, reactor)
        self.url = url
        self.connections = connections

    def describe(self) -> str:
        from ooidx.config import redact_url
        return redact_url(self.url)

    def make_pool(self) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool("psycopg2", self.url, cp_min=1, cp_max=self.connections,
                                     cp_reconnect=True, cp_noisy=False, cp_reactor=self.reactor,
                                     connect_timeout=10)

    def create_sql(self) -> str:
        # "C" collation: key ranges in code point order, as the prefix scan assumes
        return (f'CREATE TABLE IF NOT EXISTS {self.table} '
                f'(key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL, updated DOUBLE PRECISION NOT NULL)')

    def _create(self, cursor: Any) -> None:
        import psycopg2
        try:
            cursor.execute(self.create_sql())
        except psycopg2.IntegrityError:
            # two nodes creating the table at once: the other one won
            cursor.connection.rollback()


def open_backend(url: str, table: str, reactor: Any) -> Backend:
    """The backend a store URL names: postgresql:// or an absolute sqlite path."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url, table, reactor)
    return SQLiteBackend(url, table, reactor)


# --------------------------------------------------------------------------- #
# the component


class AttributeStore(Component):
    """get / set / query / delete over the bus, persistent."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, url: str, table: str = DEFAULT_TABLE, **kwargs: Any) -> None:
        super().__init__(name, bus, **kwargs)
        self.url = url
        self.table = table
        self.backend: Optional[Backend] = None

    def _reactor(self) -> Any:
        if hasattr(self.clock, "callInThread") and hasattr(self.clock, "addSystemEventTrigger"):
            return self.clock
        from twisted.internet import reactor
        return reactor

    @inlineCallbacks
    def setUp(self) -> Any:
        backend = open_backend(self.url, self.table, self._reactor())
        yield backend.open()
        self.backend = backend
        self.log.info("{component}: attributes in {where} (table {table})", component=self.name,
                      where=backend.describe(), table=self.table)

    def tearDown(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()

    def _open(self) -> Backend:
        if self.backend is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.backend

    # operations ---------------------------------------------------------------------

    @operation
    def get(self, key: str) -> Deferred:
        """The value stored under C{key}; C{KeyError} if there is none."""
        check_key(key)

        def found(rows: List[Tuple[str]]) -> Any:
            if not rows:
                raise KeyError(key)
            return json.loads(rows[0][0])

        return self._open().get(key).addCallback(found)

    @operation
    def set(self, key: str, value: Any) -> Deferred:
        """Store C{value} (any JSON) under C{key}, replacing what was there."""
        check_key(key)
        text = encode_value(value)
        return self._open().set(key, text).addCallback(lambda _: None)

    @operation
    def query(self, regex: str) -> Deferred:
        """C{{key: value}} for every key C{regex} matches (C{re.search})."""
        pattern = compile_pattern(regex)
        return self._open().query(pattern)

    @operation
    def delete(self, key: str) -> Deferred:
        """Remove C{key}; whether it was there."""
        check_key(key)
        return self._open().delete(key)
