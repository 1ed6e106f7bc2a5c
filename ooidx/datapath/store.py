"""The cache's disk store: HTTP responses kept under ``DATA_DIR/cache``.

No bus and no reactor here: plain blocking file operations, safe to call from
several threads at once (the cache component runs them in a small thread
pool) and from several processes sharing one directory.

Layout (one flat directory)::

    KEY.json                 the entry's metadata (url, status, reason, headers,
                             validators, stored, size, dataset, last_access, body)
    KEY-TOKEN.body           its body; TOKEN changes with every write
    .tmp-PID-RANDOM          a write in progress (PID: the writing process)
    .lock                    flock'd while entries are committed, evicted, scanned

``KEY`` is the SHA-256 of the URL in hex: no file name is ever made from what
a client sends, so no URL can place a file outside the directory.

Atomicity: a body is written to a temporary file chunk by chunk (bounded
memory; a large one with O_DIRECT, a staging buffer at a time:
L{DIRECT_STAGE}), fsync'd, renamed to ``KEY-TOKEN.body``; then the metadata
is written the same way and renamed over ``KEY.json``. The rename of the metadata is the
moment the entry (or its new version) becomes visible; readers open the body
the metadata names, so a reader never pairs one write's metadata with
another's body, and a reader that has the body open keeps reading it even if
a newer write or an eviction unlinks it. Concurrent writers of one URL: the
last to commit wins, whole. A crash leaves temporary files (removed at the
next start when their process is gone) or an unreferenced body (removed by
the start-up scan); never a visible half entry.

Size: the total of bodies and metadata stays under ``max_bytes``, and the
number of entries under ``max_entries`` (the index in memory costs about
300 bytes an entry); committing evicts the least recently used entries first. Access times live in memory
and reach the metadata files lazily (L{DiskStore.flush}), so a read costs no
write.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from twisted.logger import Logger

__all__ = ["Body", "DiskStore", "Entry", "FromPipe", "Writer", "StoreError", "EntryTooLarge", "key_for"]

TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
META_SUFFIX = ".json"
BODY_SUFFIX = ".body"
_KEY_LENGTH = 64
#: The most buffers one writev takes.
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 16
#: A body of at least this many bytes (or of unknown length) is written with
#: O_DIRECT, through a staging buffer of this size: the bytes go from the buffer
#: to the disk, not into the page cache first (docs/benchmarks.md, "The stored copy
#: without the page cache": on a VM whose free memory the host takes back, filling the page cache
#: with a new body cost 1-2 CPU seconds a GiB, O_DIRECT from a reused buffer 0.1).
#: The last piece (under a block) is written the ordinary way at the commit.
DIRECT_STAGE = 2 * 1024 * 1024
#: Staging buffers kept for the next writer (each one DIRECT_STAGE of resident
#: memory for good). None by default: a new one costs a few milliseconds a body.
DIRECT_SPARE = 0
#: Direct writes of one body in flight at once, each in a thread of the store's
#: own: the disk takes a full stage while the writer's thread fills the next.
#: One at a time, from the thread that fills them, O_DIRECT 2 MiB writes went
#: at 0.95-1.08 GB/s here, and the stored copy of a spliced miss was held to
#: that pace; two in flight, 1.35 (docs/benchmarks.md, "Socket to socket").
#: 0 writes each stage in the caller's thread.
DIRECT_INFLIGHT = 2
#: The threads of all the store's writers' direct writes.
DIRECT_THREADS = 4
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_BODY_LENGTH = _KEY_LENGTH + 1 + 32 + len(BODY_SUFFIX)  # KEY-TOKEN.body, TOKEN a uuid4 in hex
_TOKEN = re.compile("[0-9a-f]{32}")


class StoreError(Exception):
    """The store cannot take this entry (disk full, read-only, truncated body)."""


class EntryTooLarge(StoreError):
    """The body is larger than the whole store may hold."""


def key_for(url: str) -> str:
    """The file-name key of a URL: its SHA-256 in hex."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Entry:
    """One stored response, as its metadata file describes it."""

    url: str
    status: int
    reason: str
    headers: List[List[str]]
    validators: Dict[str, Optional[str]]
    stored: float
    size: int
    body: str  # the body file's name, inside the store directory
    dataset: Optional[str] = None
    last_access: float = 0.0
    meta_size: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        return key_for(self.url)

    @property
    def footprint(self) -> int:
        """Bytes this entry takes on disk (body and metadata)."""
        return self.size + self.meta_size

    def to_json(self) -> bytes:
        data = asdict(self)
        del data["meta_size"]
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "Entry":
        """An entry from its metadata file; ValueError if it is not a sound one."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("metadata is not an object")
        entry = cls(
            url=_typed(data, "url", str), status=_typed(data, "status", int), reason=_typed(data, "reason", str),
            headers=_headers(data.get("headers")), validators=_validators(data.get("validators")),
            stored=float(_typed(data, "stored", (int, float))), size=_typed(data, "size", int),
            body=_typed(data, "body", str), dataset=data.get("dataset"),
            last_access=float(data.get("last_access") or 0.0), meta_size=len(raw))
        key = entry.key
        if not (entry.body.startswith(key + "-") and entry.body.endswith(BODY_SUFFIX) and "/" not in entry.body):
            raise ValueError(f"body name {entry.body!r} does not belong to this entry")
        if entry.size < 0 or not (100 <= entry.status <= 599):
            raise ValueError("size or status out of range")
        if entry.dataset is not None and not isinstance(entry.dataset, str):
            raise ValueError("dataset is not a string")
        return entry


class _Known:
    """What the in-memory index keeps of an entry: enough for the LRU order,
    the size bound, eviction and purges, not its headers or validators
    (L{DiskStore.get} reads those from the metadata file every time).

    A whole L{Entry} took about 3 KB of memory (a soak of the exchange, 30
    minutes of fresh misses: RSS +44 MB for 15,000 cached answers); a record
    of url, body name, dataset, footprint and last access about 590 bytes
    with its key (the second soak: +12.5 MB for 18,374 entries); this one
    about 250-300 (tracemalloc, 10,000 entries). It keeps nothing that can be
    derived or shared: the index is keyed by the SHA-256's 32 bytes, not its
    64 hex digits, in a plain dict, not an OrderedDict; the body's name is
    C{KEY-TOKEN.body} and only TOKEN is kept, as an int (44 bytes, not a
    102-character string); the dataset is interned (one string per dataset,
    not one per entry); the URL is kept only for entries with no dataset,
    the only ones a purge matches by URL (L{_belongs}). Behaviour is the
    same; the metadata file still has everything."""

    __slots__ = ("url", "token", "dataset", "footprint", "last_access")

    def __init__(self, entry: Entry) -> None:
        dataset = entry.dataset
        self.dataset = sys.intern(str(dataset)) if dataset is not None else None
        self.url = entry.url if dataset is None else None
        body = entry.body
        token = body[_KEY_LENGTH + 1:-len(BODY_SUFFIX)]
        if (len(body) == _BODY_LENGTH and _TOKEN.fullmatch(token)
                and body.startswith(entry.key + "-") and body.endswith(BODY_SUFFIX)):
            self.token: Any = int(token, 16)  # the name is made again from it, exactly
        else:
            self.token = body  # a name this store did not make: kept whole
        self.footprint = entry.footprint
        self.last_access = entry.last_access

    def body(self, key: str) -> str:
        """The name of the body file this record knows, C{key} being its entry's key."""
        if isinstance(self.token, int):
            return f"{key}-{self.token:032x}{BODY_SUFFIX}"
        return self.token


def _ik(key: str) -> bytes:
    """The index's key for a file-name key (64 hex digits): its 32 bytes."""
    return bytes.fromhex(key)


def _typed(data: Dict[str, Any], name: str, kind: Any) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{name}: expected {kind}, got {type(value).__name__}")
    return value


def _headers(value: Any) -> List[List[str]]:
    """HTTP headers as a list of [name, value] pairs; ValueError otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("headers: expected a list of pairs")
    out = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError(f"headers: not a [name, value] pair of strings: {pair!r}")
        out.append([pair[0], pair[1]])
    return out


def _validators(value: Any) -> Dict[str, Optional[str]]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if k in ("etag", "last_modified") and isinstance(v, str)}


def validators_of(headers: List[List[str]], given: Any = None) -> Dict[str, Optional[str]]:
    """The revalidation validators of a response: those given, else its ETag and Last-Modified headers."""
    found = _validators(given)
    for name, value in headers:
        lower = name.lower()
        if lower == "etag":
            found.setdefault("etag", value)
        elif lower == "last-modified":
            found.setdefault("last_modified", value)
    return found


#: Most entries a store keeps, whatever their bytes: its in-memory index costs about 300 bytes an
#: entry (tracemalloc), and a byte bound alone lets a store of small answers (1 GiB of 137-byte .dods)
#: index over a million of them (the soak, docs/reliability.md#soak). At this bound the index is
#: about 30 MB.
MAX_ENTRIES = 100_000


class DiskStore:
    """Responses on disk under C{root}, at most C{max_bytes} of them and at most C{max_entries}."""

    log = Logger()

    def __init__(self, root: str, max_bytes: int, *, now: Callable[[], float] = time.time,
                 max_entries: int = MAX_ENTRIES, direct: bool = True) -> None:
        """C{direct}: write large bodies with O_DIRECT (L{DIRECT_STAGE}) where the
        file system takes it; otherwise (or with C{direct=False}) through the page cache."""
        self.root = os.path.abspath(root)
        self.direct = bool(direct and _O_DIRECT)
        self._spare_stages: List[mmap.mmap] = []
        self._direct_pool: Optional[ThreadPoolExecutor] = None
        self._stage_lock = threading.Lock()
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.now = now
        self.evictions = 0
        self._lock = threading.RLock()
        self._lock_fd: Optional[int] = None
        # least recently used first: a plain dict keeps insertion order, and every use pops the
        # key and puts it back at the end (an OrderedDict costs about 50 bytes more an entry)
        # keyed by the URL's SHA-256 as 32 bytes (65 bytes of memory, the hex key 113)
        self._index: Dict[bytes, _Known] = {}
        self._dirty: Set[str] = set()  # keys whose last access is not on disk yet
        self._bytes = 0

    # opening and closing -----------------------------------------------------------

    def open(self) -> None:
        """Make the directory if need be, remove what crashed writes left, build the index."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._locked():
            self._scan()

    def close(self) -> None:
        """Write the access times out and let go of the lock file (and of the
        direct writes' threads: every writer is over by now)."""
        try:
            self.flush()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            with self._stage_lock:
                pool, self._direct_pool = self._direct_pool, None
            if pool is not None:
                pool.shutdown(wait=True)

    def _direct_writes(self) -> ThreadPoolExecutor:
        with self._stage_lock:
            if self._direct_pool is None:
                self._direct_pool = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="ooidx-store-direct")
            return self._direct_pool

    def _scan(self) -> None:
        entries: List[Entry] = []
        bodies: Set[str] = set()
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.startswith(TEMP_PREFIX):
                if not _writer_alive(name):
                    self.log.info("removing {name}, left by a write that did not finish", name=name, component="cache")
                    _unlink(path)
            elif name.endswith(BODY_SUFFIX):
                bodies.add(name)
            elif name.endswith(META_SUFFIX) and len(name) == _KEY_LENGTH + len(META_SUFFIX):
                entry = self._read_meta(name[:_KEY_LENGTH])
                if entry is None:
                    continue
                try:
                    size = os.stat(os.path.join(self.root, entry.body)).st_size
                except FileNotFoundError:
                    size = -1
                if size != entry.size:
                    self.log.warn("removing the entry for {url}: its body is missing or of the wrong size",
                                  url=entry.url, component="cache")
                    _unlink(path)
                    continue
                entries.append(entry)
        referenced = {e.body for e in entries}
        for name in bodies - referenced:
            _unlink(os.path.join(self.root, name))
        entries.sort(key=lambda e: e.last_access)
        self._index.clear()
        self._bytes = 0
        for entry in entries:
            self._index[_ik(entry.key)] = _Known(entry)
            self._bytes += entry.footprint
        self._evict(0)
        self.log.info("cache store at {root}: {count} entries, {bytes} bytes", root=self.root,
                      count=len(self._index), bytes=self._bytes, component="cache")

    # reading -------------------------------------------------------------------------

    def get(self, url: str, *, touch: bool = True) -> Optional[Entry]:
        """The entry for C{url}, as its metadata file has it now, or None.

        C{touch} counts this as a use for the least-recently-used order."""
        key = key_for(url)
        entry = self._read_meta(key)
        with self._lock:
            known = self._index.pop(_ik(key), None)
            if known is not None:
                self._bytes -= known.footprint
            if entry is None or entry.url != url:
                self._dirty.discard(key)
                return None
            if known is not None:
                entry.last_access = max(entry.last_access, known.last_access)
            if touch:
                entry.last_access = self.now()
                self._dirty.add(key)
            self._index[_ik(key)] = _Known(entry)
            self._bytes += entry.footprint
            return replace(entry)

    def open_body(self, entry: Entry) -> Any:
        """The entry's body, open for reading (binary, unbuffered); FileNotFoundError if it has gone."""
        return open(os.path.join(self.root, entry.body), "rb", buffering=0)

    def __contains__(self, url: str) -> bool:
        with self._lock:
            return _ik(key_for(url)) in self._index

    def entries(self) -> List[Entry]:
        """The entries this process knows, least recently used first (their metadata read from disk)."""
        with self._lock:
            known = [(key.hex(), k.last_access) for key, k in self._index.items()]
        out = []
        for key, last_access in known:
            entry = self._read_meta(key)
            if entry is not None:
                entry.last_access = max(entry.last_access, last_access)
                out.append(entry)
        return out

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"entries": len(self._index), "bytes": self._bytes, "evictions": self.evictions,
                    "max_bytes": self.max_bytes}

    # writing -------------------------------------------------------------------------

    def writer(self, url: str, *, status: int, reason: str, headers: Any, validators: Any = None,
               dataset: Optional[str] = None, length: Optional[int] = None) -> "Writer":
        """Begin storing a response; write its body to the writer, then commit or abort.

        Raises L{EntryTooLarge} at once when C{length} says it cannot fit,
        L{StoreError} when the temporary file cannot be made."""
        if not isinstance(url, str) or not url:
            raise StoreError("no URL to store under")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise StoreError(f"not an HTTP status: {status!r}")
        try:
            pairs = _headers(headers)
        except ValueError as e:
            raise StoreError(str(e)) from None
        if length is not None and length > self.max_bytes:
            raise EntryTooLarge(f"{length} bytes will not fit in a store of {self.max_bytes}")
        entry = Entry(url=url, status=status, reason=str(reason or ""), headers=pairs,
                      validators=validators_of(pairs, validators), stored=0.0, size=0, body="",
                      dataset=dataset if isinstance(dataset, str) else None)
        return Writer(self, entry, length)

    def _commit(self, entry: Entry, temp_path: str) -> Entry:
        key = entry.key
        entry.body = f"{key}-{uuid.uuid4().hex}{BODY_SUFFIX}"
        entry.stored = entry.last_access = self.now()
        raw = entry.to_json()
        entry.meta_size = len(raw)
        if entry.footprint > self.max_bytes:
            raise EntryTooLarge(f"{entry.footprint} bytes will not fit in a store of {self.max_bytes}")
        meta_temp = _write_temp(self.root, raw)
        try:
            with self._locked():
                self._evict(entry.footprint, keep=key)
                old = self._read_meta(key)
                body_path = os.path.join(self.root, entry.body)
                os.rename(temp_path, body_path)
                try:
                    os.rename(meta_temp, os.path.join(self.root, key + META_SUFFIX))
                except BaseException:
                    _unlink(body_path)
                    raise
                if old is not None and old.body != entry.body:
                    _unlink(os.path.join(self.root, old.body))
                known = self._index.pop(_ik(key), None)
                if known is not None:
                    self._bytes -= known.footprint
                self._index[_ik(key)] = _Known(entry)
                self._bytes += entry.footprint
                self._dirty.discard(key)
        except BaseException:
            _unlink(meta_temp)
            raise
        # the renames made durable outside the lock: a lookup (get) never waits for this fsync
        _fsync_dir(self.root)
        return replace(entry)

    def refresh(self, url: str) -> Optional[Entry]:
        """Mark C{url}'s entry as stored just now (the upstream said 304); None if it has gone."""
        return self._rewrite(url, lambda e: setattr(e, "stored", self.now()) or setattr(e, "last_access", self.now()))

    def set_dataset(self, url: str, dataset: str) -> Optional[Entry]:
        """Remember which dataset C{url}'s entry belongs to."""
        return self._rewrite(url, lambda e: setattr(e, "dataset", dataset))

    def _rewrite(self, url: str, change: Callable[[Entry], Any]) -> Optional[Entry]:
        key = key_for(url)
        with self._locked():
            entry = self._read_meta(key)
            if entry is None or entry.url != url:
                return None
            known = self._index.get(_ik(key))
            if known is not None:
                entry.last_access = max(entry.last_access, known.last_access)
            change(entry)
            raw = entry.to_json()
            os.rename(_write_temp(self.root, raw), os.path.join(self.root, key + META_SUFFIX))
            known = self._index.pop(_ik(key), None)
            if known is not None:
                self._bytes -= known.footprint
            entry.meta_size = len(raw)
            self._index[_ik(key)] = _Known(entry)
            self._bytes += entry.footprint
            self._dirty.discard(key)
            return replace(entry)

    def flush(self) -> int:
        """Write the access times kept in memory to the metadata files; how many were written."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            wanted = {}
            for k in dirty:
                known = self._index.get(_ik(k))
                if known is not None:
                    wanted[k] = known.last_access
        written = 0
        for key, last_access in wanted.items():
            try:
                with self._locked():
                    entry = self._read_meta(key)
                    if entry is None or entry.last_access >= last_access:
                        continue
                    entry.last_access = last_access
                    os.rename(_write_temp(self.root, entry.to_json()), os.path.join(self.root, key + META_SUFFIX))
                    written += 1
            except OSError as e:
                self.log.warn("could not save the access time of an entry: {error}", error=e, component="cache")
        return written

    # removing ------------------------------------------------------------------------

    def remove(self, url: str) -> bool:
        with self._locked():
            return self._remove_key(key_for(url)) is not None

    def purge(self, *, dataset: Optional[str] = None, base_url: Optional[str] = None) -> int:
        """Remove every entry of C{dataset}, and every entry with no dataset
        recorded whose URL is C{base_url} or lies under it; how many went."""
        removed = 0
        with self._locked():
            for key, known in list(self._index.items()):
                if _belongs(known, dataset, base_url):
                    removed += self._remove_key(key.hex()) is not None
        return removed

    def _remove_key(self, key: str) -> Optional[str]:
        """Remove C{key}'s entry, files and record; the URL removed (its key if none is known),
        None if there was nothing. Caller holds the lock."""
        entry = self._read_meta(key)
        known = self._index.pop(_ik(key), None)
        if known is not None:
            self._bytes -= known.footprint
        self._dirty.discard(key)
        if entry is None:
            return None if known is None else (known.url or key)
        _unlink(os.path.join(self.root, key + META_SUFFIX))
        _unlink(os.path.join(self.root, entry.body))
        if known is not None:
            known_body = known.body(key)
            if known_body != entry.body:
                _unlink(os.path.join(self.root, known_body))
        return entry.url

    def _evict(self, incoming: int, keep: Optional[str] = None) -> None:
        """Remove least recently used entries until C{incoming} more bytes fit, and one more
        entry (C{incoming} > 0: an entry being committed, unless it replaces C{keep}'s) within
        C{max_entries}. Caller holds the lock."""
        room = 1 if incoming > 0 and (keep is None or _ik(keep) not in self._index) else 0  # a new version: no room
        for digest in list(self._index):
            if self._bytes + incoming <= self.max_bytes and len(self._index) + room <= self.max_entries:
                break
            key = digest.hex()
            if key == keep:
                continue
            url = self._remove_key(key)
            if url is not None:
                self.evictions += 1
                self.log.debug("evicted {url}", url=url, component="cache")

    # helpers -------------------------------------------------------------------------

    def _read_meta(self, key: str) -> Optional[Entry]:
        path = os.path.join(self.root, key + META_SUFFIX)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except FileNotFoundError:
            return None
        try:
            entry = Entry.from_json(raw)
            if entry.key != key:
                raise ValueError("the URL does not hash to the file's name")
        except (ValueError, TypeError, KeyError) as e:
            self.log.warn("removing unreadable cache metadata {path}: {error}", path=path, error=e, component="cache")
            _unlink(path)
            return None
        return entry

    def _locked(self) -> "_Locked":
        return _Locked(self._lock, self._lock_fd)

    def _take_stage(self) -> mmap.mmap:
        """A page-aligned staging buffer of DIRECT_STAGE bytes (a reused one if
        there is one: its memory is already the process's)."""
        with self._stage_lock:
            if self._spare_stages:
                return self._spare_stages.pop()
        return mmap.mmap(-1, DIRECT_STAGE)

    def _give_stage(self, stage: mmap.mmap) -> None:
        with self._stage_lock:
            if len(self._spare_stages) < DIRECT_SPARE:
                self._spare_stages.append(stage)
                return
        try:
            stage.close()
        except BufferError:  # still exported somewhere: unmapped when that goes
            pass


class FromPipe:
    """A piece of a body that waits in a pipe (a spliced body's copy, duplicated
    there by the kernel, L{ooidx.datapath.splice}): the writer's thread reads it
    straight into its staging buffer, so the reactor's thread never holds the
    bytes. C{release} is for the owner of the pipe, called on the reactor's
    thread once the piece has been read or will not be."""

    __slots__ = ("fd", "size", "release")

    def __init__(self, fd: int, size: int, release: Callable[[], None]) -> None:
        self.fd = fd
        self.size = size
        self.release = release

    def __len__(self) -> int:
        return self.size

    def into(self, view: memoryview) -> None:
        """(In a write thread.) Fill C{view} from the pipe, exactly."""
        while view:
            try:
                n = os.readv(self.fd, [view])
            except BlockingIOError:
                raise StoreError("the pipe holds fewer bytes than announced") from None
            if n == 0:
                raise StoreError("the pipe was closed")
            view = view[n:]

    def read(self) -> bytes:
        """(In a write thread.) The piece, as bytes."""
        data = bytearray(self.size)
        self.into(memoryview(data))
        return bytes(data)


Body = Union[bytes, FromPipe]


class Writer:
    """One response being stored. Not thread-safe: one thread at a time, in order."""

    def __init__(self, store: DiskStore, entry: Entry, length: Optional[int]) -> None:
        self.store = store
        self.entry = entry
        self.length = length
        self.size = 0
        self.done = False
        self.path = _temp_path(store.root)
        try:
            self._fd: Optional[int] = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot store {entry.url}: {e.strerror or e}") from e
        #: the staging buffer of a direct write (None: writes go through the page cache)
        self._stage: Optional[mmap.mmap] = None
        self._staged = 0
        self._offset = 0  # where the next byte goes in the file
        #: direct writes in flight: (the write, its stage, its length, its offset), oldest first
        self._flights: Deque[Tuple[Future, mmap.mmap, int, int]] = deque()
        self._landed: List[mmap.mmap] = []  # stages back from the disk, for this body's next ones
        self.direct_ok = True  # until the file system refuses a direct write
        if store.direct and (length is None or length >= DIRECT_STAGE):
            self._start_direct()

    @property
    def direct(self) -> bool:
        """Whether the body goes to the disk with O_DIRECT (so far)."""
        return self._stage is not None and self.direct_ok

    def _start_direct(self) -> None:
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | _O_DIRECT)
        except OSError:  # the file system has no O_DIRECT (EINVAL): the page cache, then
            return
        self._stage = self.store._take_stage()
        self._staged = 0

    def _buffered(self) -> None:
        """Back to writes through the page cache (the tail of a direct write, or a
        file system that refused a direct write). The file's offset is unchanged."""
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)

    def _write_stage(self, final: bool) -> None:
        """Write what is staged: all of it with O_DIRECT if the stage is full
        (handed to a thread of the store's, L{DIRECT_INFLIGHT}); at the end
        (C{final}), through the page cache, once the direct writes landed."""
        stage, staged = self._stage, self._staged
        assert stage is not None
        if not final and DIRECT_INFLIGHT > 0 and self.direct_ok:
            while len(self._flights) >= DIRECT_INFLIGHT:
                self._land()
            write = self.store._direct_writes().submit(_pwrite_all, self._fd, stage, staged, self._offset)
            self._flights.append((write, stage, staged, self._offset))
            self._offset += staged
            self._stage = self._landed.pop() if self._landed else self.store._take_stage()
            self._staged = 0
            return
        self._land_all()
        os.lseek(self._fd, self._offset, os.SEEK_SET)
        view = memoryview(stage)[:staged]
        try:
            if final:
                self._buffered()
            while view:
                try:
                    n = os.write(self._fd, view)
                except OSError as e:
                    if e.errno != errno.EINVAL or final:
                        raise
                    # a direct write refused (an alignment this file system will not
                    # take): the rest of this body goes through the page cache
                    self._buffered()
                    self.direct_ok = False
                    final = True
                    continue
                view = view[n:]
                self._offset += n
        finally:
            view.release()  # (a failure's traceback must not keep the stage exported)
        self._staged = 0

    def _land(self) -> None:
        """Wait for the oldest direct write. One the file system refused
        (EINVAL: an alignment it will not take) is written again through the
        page cache, and so is the rest of the body."""
        write, stage, length, offset = self._flights.popleft()
        try:
            write.result()
        except OSError as e:
            if e.errno != errno.EINVAL:
                self.store._give_stage(stage)
                raise
            self.direct_ok = False
            self._buffered()
            _pwrite_all(self._fd, stage, length, offset)
        self._landed.append(stage)

    def _land_all(self, ignore: bool = False) -> None:
        while self._flights:
            try:
                self._land()
            except OSError:
                if not ignore:
                    raise

    def _release_stage(self) -> None:
        stage, self._stage = self._stage, None
        landed, self._landed = self._landed, []
        for spare in ([stage] if stage is not None else []) + landed:
            self.store._give_stage(spare)

    def write(self, data: bytes) -> None:
        if self.done or self._fd is None:
            raise StoreError("write to a finished entry")
        if self._stage is not None:
            self.write_many([data])
            return
        if self.size + len(data) > self.store.max_bytes:
            self.abort()
            raise EntryTooLarge(f"{self.entry.url}: body larger than the store ({self.store.max_bytes} bytes)")
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot store {self.entry.url}: {e.strerror or e}") from e
        self.size += len(data)

    def write_many(self, chunks: List[Body]) -> None:
        """Write several chunks, in order, with as few system calls as the OS allows
        (C{writev}): a writer thread then takes Python's lock back once per batch,
        not once per chunk, while the reactor thread is busy streaming."""
        total = sum(len(c) for c in chunks)
        if self.done or self._fd is None:
            raise StoreError("write to a finished entry")
        if self.size + total > self.store.max_bytes:
            self.abort()
            raise EntryTooLarge(f"{self.entry.url}: body larger than the store ({self.store.max_bytes} bytes)")
        if self._stage is not None:
            try:
                self._stage_chunks(chunks)
            except StoreError:
                self.abort()
                raise
            except OSError as e:
                self.abort()
                raise StoreError(f"cannot store {self.entry.url}: {e.strerror or e}") from e
            self.size += total
            return
        try:
            views = [memoryview(c.read() if isinstance(c, FromPipe) else c) for c in chunks if len(c)]
            while views:
                n = os.writev(self._fd, views[:_IOV_MAX])
                while n and views:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except (OSError, StoreError) as e:
            self.abort()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot store {self.entry.url}: {e.strerror or e}") from e
        self.size += total

    def _stage_chunks(self, chunks: List[Body]) -> None:
        """Copy the chunks into the staging buffer (a piece in a pipe is read
        straight into it), writing it out each time it is full."""
        stage = self._stage
        assert stage is not None
        room = len(stage)
        for chunk in chunks:
            if isinstance(chunk, FromPipe):
                left = chunk.size
                while left:
                    n = min(left, room - self._staged)
                    with memoryview(stage) as view:
                        chunk.into(view[self._staged:self._staged + n])
                    self._staged += n
                    left -= n
                    if self._staged == room:
                        self._write_stage(final=False)
                        stage = self._stage  # (a stage in flight is not written to: the next one)
                continue
            data = memoryview(chunk)
            while data:
                n = min(len(data), room - self._staged)
                stage[self._staged:self._staged + n] = data[:n]
                self._staged += n
                data = data[n:]
                if self._staged == room:
                    self._write_stage(final=False)
                    stage = self._stage  # (a stage in flight is not written to: the next one)

    def commit(self) -> Entry:
        """Make the entry visible, whole; the previous version of the URL goes."""
        if self.done or self._fd is None:
            raise StoreError("commit of a finished entry")
        if self.length is not None and self.length != self.size:
            self.abort()
            raise StoreError(f"{self.entry.url}: {self.size} bytes arrived of the {self.length} announced")
        try:
            if self._stage is not None:
                if self._staged:
                    self._write_stage(final=True)
                self._land_all()
                self._release_stage()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self.entry.size = self.size
            entry = self.store._commit(self.entry, self.path)
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot store {self.entry.url}: {e.strerror or e}") from e
        except BaseException:
            self.abort()
            raise
        self.done = True
        return entry

    def abort(self) -> None:
        """Give up; nothing of this write remains."""
        self.done = True
        self._land_all(ignore=True)
        self._release_stage()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        _unlink(self.path)


def _pwrite_all(fd: int, stage: mmap.mmap, length: int, offset: int) -> None:
    """(In a direct-write thread.) The first C{length} bytes of C{stage} at C{offset}."""
    view = memoryview(stage)[:length]
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    finally:
        view.release()


class _Locked:
    """The store's thread lock and, across processes, an flock on its lock file."""

    def __init__(self, lock: Any, fd: Optional[int]) -> None:
        self.lock = lock
        self.fd = fd

    def __enter__(self) -> None:
        self.lock.acquire()
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except BaseException:
                self.lock.release()
                raise

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()


def _belongs(entry: Any, dataset: Optional[str], base_url: Optional[str]) -> bool:
    if dataset is not None and entry.dataset == dataset:
        return True
    if base_url and (entry.dataset is None or entry.dataset == dataset):
        url = entry.url
        return url == base_url or (url.startswith(base_url) and
                                   (base_url[-1] in "/?" or url[len(base_url)] in "./?"))
    return False


def _temp_path(root: str) -> str:
    return os.path.join(root, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")


def _write_temp(root: str, data: bytes) -> str:
    """A temporary file in C{root} holding C{data}, on disk (fsync'd); its path."""
    path = _temp_path(root)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        Logger(namespace=__name__).warn("could not remove {path}: {error}", path=path, error=e, component="cache")


def _writer_alive(temp_name: str) -> bool:
    """Whether the process that made a temporary file still runs (and is not this one)."""
    try:
        pid = int(temp_name[len(TEMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
