"""The persister: every version of every dataset, on disk (docs/dissemination.md).

At start it subscribes through pub_sub (C{subscribe(regex="^dataset\\.",
name=SUBSCRIPTION)}, default name C{persister}) and consumes the address it
gets back: persisters with one name share that address, different names
each get a copy of every dataset ("send a copy to the west coast
repository"). Each dataset arrives as one magnet stream from a fetcher
(start metadata: topic, dataset, url, fetched, das, dds, status, headers,
length; body: the C{.dods} as received) and becomes a version directory:

    DATA_DIR/datasets/NAME/VERSION/         VERSION = YYYYmmddTHHMMSSZ-SHA12 (UTC save time,
        NAME.das                                       first 12 hex digits of the .dods sha256)
        NAME.dds
        NAME.dods
        NAME.nc                             netCDF4, from pydap decoding the .dods (ooidx.dissemination.netcdf)
        manifest.json                       {"dataset", "url", "topic", "version", "sequence",
                                             "fetched", "saved", "files": {FILE: {"bytes", "sha256"}},
                                             "netcdf": {"variables", "skipped"} or {"error"},
                                             "coverage": {COORDINATE: SPAN}, "changes": SUMMARY}

C{coverage} is what each coordinate variable spans (its CF time decoded to
dates), C{changes} the change summary from the version saved before it
(L{ooidx.dissemination.changes}): coverage before and after, variables
added and removed, shapes and types changed, a bounded diff of the typed
attributes, the sha256 of each response. The C{saved} event carries the
same summary under C{changes}.

Read through the worker queue C{persister} (the web port's
C{/api/datasets/NAME/versions}, L{ooidx.web.versions}): C{versions(name,
limit)} the manifests, C{version(name, version)} one of them (or
C{"latest"}), C{diff(name, before, after, limit)} the summary between any
two. A version name that is not one is L{InvalidVersion}, one not saved
L{UnknownVersion}. C{open_version(name, version, part, address, request_id)}
streams one saved file (C{part}: .das .dds .dods .nc) to C{address}
as a magnet stream, byte for byte, with the HTTP status and header fields a
DAP client reads it by (the proxy's C{/datasets/NAME@VERSION.SUFFIX}); the
call's answer says which version. Every persister on the node's data
directory can serve it.

Atomicity: the version is built in C{NAME/.tmp-PID-RANDOM/}; each file is
written to a C{.part-} file there, fsync'd and renamed; then the directory
is fsync'd and renamed to C{VERSION} (the moment the version exists) and
its parent fsync'd. A failure at any step removes the temporary directory,
so no half version is ever visible; a crash leaves a C{.tmp-} directory,
removed at the next start when its process is gone.

A version whose C{.dods} sha256 equals the last saved one (highest
C{sequence}) is not written again and produces no event. When a version is
saved: C{event.saved.NAME}. When one cannot be saved (a full disk, a broken
stream, bad metadata): C{event.failed.NAME} with the reason; the version is
not recorded, so the next delivery of the dataset is written in full.

A version lost to the disk or to a broken stream is asked for again: a
stream's chunks are acknowledged as they reach the disk (that is what bounds
memory), so the broker cannot give the version back, and the persister
instead asks the controller for the dataset again, for its own address only
(C{get_dataset(name, to=[ADDRESS])}), after C{retry_after} seconds, doubling
per failure up to C{retry_max}, until a delivery of that dataset is saved
(or found unchanged) or the dataset is no longer registered. The failed
event says when (C{retry_in}). A message the persister cannot read is not
asked for again: another copy would be no better.

The .dods streams to disk chunk by chunk (bounded memory); the netCDF
conversion needs the decoded data in memory (pydap unpacks it whole), so a
C{.dods} over L{Persister.max_netcdf_bytes} is kept without its C{.nc}
(the manifest says why). A C{.dods} pydap cannot decode is kept the same way.

Blocking disk work (L{ooidx.dissemination.saved}: the layout on disk, the atomic
write, reading versions back) runs in a small thread pool of the persister's own.
"""
from __future__ import annotations

import errno
import hashlib
import os
from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredLock, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from magnet import BadMessage, MagnetError, Message, RemoteError, operation

from ooidx import dap, events
from ooidx.component import Component
from ooidx.config import PersisterOptions
from ooidx.dissemination import changes
from ooidx.dissemination.saved import (DATASETS, LATEST, MANIFEST, TEMP_PREFIX, VERSION, InvalidVersion,
                                       UnknownVersion, _check_name, _check_version, _cleanup, _describe, _diff,
                                       _finish_version, _last_saved, _make_temp, _manifests, _one_manifest,
                                       _open_part, _open_saved, _prepare, _write_all, _write_file, list_versions,
                                       read_manifest, saved_headers, valid_version, version_name,
                                       SAVED_PARTS)

__all__ = ["Persister", "DATASETS", "MANIFEST", "TEMP_PREFIX", "version_name", "read_manifest", "list_versions",
           "VERSION", "LATEST", "valid_version", "InvalidVersion", "UnknownVersion"]

DEFAULT_SUBSCRIPTION = "persister"
DEFAULT_RETRY_AFTER = 60.0
DEFAULT_RETRY_MAX = 900.0
SUBSCRIBE_REGEX = r"^dataset\."
THREADS = 2
#: bytes read from a saved file at a time when streaming it
READ_SIZE = 256 * 1024


class Persister(Component):
    """The C{persister} component: see the module docstring."""

    log = Logger()

    #: the largest .dods converted to netCDF (pydap decodes it whole in memory)
    max_netcdf_bytes = 2 * 1024 * 1024 * 1024
    #: seconds between two attempts to subscribe while pub_sub does not answer
    subscribe_retry = (1.0, 30.0)

    def __init__(self, name: str, bus: Any, *, options: Optional[PersisterOptions] = None,
                 data_dir: Optional[str] = None, subscription: Optional[str] = None,
                 pub_sub: str = "pub_sub", controller: str = "controller", retry_after: Optional[float] = None,
                 retry_max: Optional[float] = None, reactor: Any = None, **kwargs: Any) -> None:
        """C{options}: the config's C{components.persister}; C{data_dir}: the
        node's data directory (versions go under its C{datasets/})."""
        super().__init__(name, bus, reactor=reactor, **kwargs)
        options = options if options is not None else PersisterOptions()
        self.subscription = subscription or options.subscription or DEFAULT_SUBSCRIPTION
        #: seconds before asking again for a version that could not be saved; doubles up to retry_max
        self.retry_after = float(retry_after or options.retry_after or DEFAULT_RETRY_AFTER)
        self.retry_max = max(self.retry_after, float(retry_max or options.retry_max or DEFAULT_RETRY_MAX))
        self.controller = controller
        self._retries: Dict[str, "_Retry"] = {}
        root = data_dir
        if not root:
            raise ValueError("the persister needs a data directory (config data_dir)")
        self.data_dir = os.path.abspath(root)
        self.root = os.path.join(self.data_dir, DATASETS)
        self.pub_sub = pub_sub
        self._reactor = reactor
        self._pool: Optional[ThreadPool] = None
        self._listener: Any = None
        self._subscribing: Any = None
        self._stopping = False
        self._last: Dict[str, Tuple[int, str, str]] = {}  # dataset -> (sequence, .dods sha256, version) of the last
        self._locks: Dict[str, DeferredLock] = {}
        self._active: set = set()
        #: the address this persister consumes, once subscribed
        self.address: Optional[str] = None
        #: fires with the address once subscribed (tests wait for it)
        self.ready: Deferred = Deferred()
        self.counters = {"saved": 0, "unchanged": 0, "failed": 0, "bytes": 0, "asked_again": 0, "served": 0,
                         "served_bytes": 0}

    # lifecycle ---------------------------------------------------------------------

    def setUp(self) -> Any:
        self._stopping = False
        reactor = self._reactor
        if reactor is None:
            reactor = self.bus.clock if IReactorThreads.providedBy(self.bus.clock) else _global_reactor()
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="ooidx-persister-io")
        self._pool.start()
        d = self._io(_prepare, self.root)
        d.addCallback(lambda removed: removed and self.log.info(
            "{component}: removed {count} unfinished version(s) of earlier runs", component=self.name,
            count=removed))
        d.addCallback(lambda _: self._subscribe(self.subscribe_retry[0]))
        return d

    def _subscribe(self, delay: float) -> None:
        """Subscribe through pub_sub and consume the address; retried with
        backoff while pub_sub does not answer (it may be on a node still starting)."""
        self._subscribing = None
        if self._stopping:
            return
        d = self.bus.call(self.pub_sub, "subscribe", regex=SUBSCRIBE_REGEX, name=self.subscription)

        def subscribed(answer: Any) -> Deferred:
            address = answer.get("address") if isinstance(answer, dict) else None
            if not isinstance(address, str) or not address:
                raise BadMessage(f"{self.pub_sub}.subscribe answered {str(answer)[:200]}, without an address")
            return self.bus.listen(self._on_message, name=address, durable=True, on_stream=self._on_stream)

        def listening(listener: Any) -> None:
            if self._stopping:
                listener.subscription.cancel()
                return
            self._listener = listener
            self.address = listener.address
            self.log.info("{component}: subscription {subscription} -> {address}; saving under {root}",
                          component=self.name, subscription=self.subscription, address=listener.address,
                          root=self.root)
            if not self.ready.called:
                self.ready.callback(listener.address)

        def failed(failure: Failure) -> None:
            if self._stopping:
                return
            if failure.check(MagnetError):
                self.log.warn("{component}: cannot subscribe through {pub_sub} yet ({reason}); again in {delay} s",
                              component=self.name, pub_sub=self.pub_sub, reason=failure.getErrorMessage(),
                              delay=delay)
            else:
                self.log.failure("{component}: subscribing failed; again in {delay} s", failure,
                                 component=self.name, delay=delay)
            self._subscribing = self.clock.callLater(delay, self._subscribe,
                                                     min(delay * 2, self.subscribe_retry[1]))

        d.addCallback(subscribed)
        d.addCallbacks(listening, failed)

    @inlineCallbacks
    def tearDown(self) -> Any:
        self._stopping = True
        if self._subscribing is not None and self._subscribing.active():
            self._subscribing.cancel()
        self._subscribing = None
        retries, self._retries = self._retries, {}
        for retry in retries.values():
            retry.cancel()
        listener, self._listener = self._listener, None
        if listener is not None and listener.subscription is not None:
            try:
                yield listener.subscription.cancel()  # cancel, never delete: the subscription is durable
            except Exception as e:  # noqa: BLE001 - the bus may already be gone
                self.log.debug("{component}: cancelling {address}: {error}", component=self.name,
                               address=listener.address, error=e)
        for d in list(self._active):
            try:
                yield d
            except Exception:  # noqa: BLE001 - already logged
                pass
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _io(self, f: Any, *args: Any, **kwargs: Any) -> Deferred:
        if self._pool is None:
            return fail(OSError(errno.ESHUTDOWN, "the persister is not running"))
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    # operations ------------------------------------------------------------------------

    @operation
    def versions(self, name: str, limit: Optional[int] = None) -> Deferred:
        """The manifests of dataset C{name}'s saved versions, oldest first
        (the last C{limit} of them when given)."""
        _check_name(name)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"limit is a whole number from 1, not {str(limit)[:40]!r}")
        d = self._io(_manifests, os.path.join(self.root, name))
        return d.addCallback(lambda manifests: manifests[-limit:] if limit else manifests)

    @operation
    def version(self, name: str, version: str) -> Deferred:
        """The manifest of one saved version of C{name} (L{LATEST}: the last saved)."""
        _check_name(name)
        _check_version(version)
        return self._io(_one_manifest, os.path.join(self.root, name), name, version)

    @operation
    def diff(self, name: str, before: str, after: str, limit: int = changes.LIMIT) -> Deferred:
        """The change summary from version C{before} to version C{after} of
        C{name} (any two, either way round), listing at most C{limit} attribute changes."""
        _check_name(name)
        _check_version(before)
        _check_version(after)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= changes.MAX_LIMIT:
            raise ValueError(f"limit is a whole number from 0 to {changes.MAX_LIMIT}")
        return self._io(_diff, os.path.join(self.root, name), name, before, after, limit)

    @operation
    def open_version(self, name: str, version: str, part: str, address: str, request_id: Optional[str] = None,
                     method: str = "GET") -> Deferred:
        """Stream the file C{part} (.das .dds .dods .nc) of a saved version of
        C{name} (L{LATEST}: the last saved) to C{address}, with C{request_id} as
        the stream's correlation id. Answers, once the file is open,
        C{{"via", "version", "bytes"}}; the stream goes on after the answer.
        An unknown version (or file of it) is L{UnknownVersion}."""
        _check_name(name)
        _check_version(version)
        if part not in SAVED_PARTS:
            raise InvalidVersion(f"a saved version is served as {', '.join(sorted(SAVED_PARTS))}, not {part!r}")
        if not isinstance(address, str) or not address:
            raise BadMessage("open_version needs an address to stream to")
        if not isinstance(request_id, (str, type(None))) or method not in ("GET", "HEAD"):
            raise BadMessage("open_version: request_id is a string, method GET or HEAD")
        d = self._io(_open_saved, os.path.join(self.root, name), name, version, part)

        def opened(result: Tuple[str, Any, int]) -> Dict[str, Any]:
            resolved, f, size = result
            streaming = self._stream_saved(address, request_id, name, resolved, part, f, size, method,
                                           version == LATEST)
            self._active.add(streaming)
            streaming.addBoth(lambda r: (self._active.discard(streaming), None)[1])
            return {"via": f"persister {self.node}", "version": resolved, "bytes": size}

        return d.addCallback(opened)

    @inlineCallbacks
    def _stream_saved(self, address: str, request_id: Optional[str], name: str, version: str, part: str, f: Any,
                      size: int, method: str, latest: bool) -> Any:
        """The saved file to C{address}, chunk by chunk (the stream's window bounds what is in flight)."""
        metadata = {"status": 200, "headers": saved_headers(part, version, latest), "length": size,
                    "source": "saved", "dataset": name, "version": version}
        writer = self.bus.open_stream(address, metadata, correlation_id=request_id)
        sent = 0
        try:
            if method != "HEAD":
                while True:
                    data = yield self._io(f.read, READ_SIZE)
                    if not data:
                        break
                    sent += len(data)
                    yield writer.write(data)
                if sent != size:
                    raise OSError(errno.EIO, f"{name}@{version}{part} is {sent} bytes, not {size}")
            yield writer.finish()
        except Exception as e:  # noqa: BLE001 - the reader sees a broken stream, never a clean end
            self.log.warn("{component}: streaming {name}@{version}{part} to {address} failed after {bytes} bytes: "
                          "{error}", component=self.name, name=name, version=version, part=part, address=address,
                          bytes=sent, error=_describe(e))
            writer.abort(e).addErrback(lambda f: self.log.debug("{component}: abort not sent: {error}",
                                                               component=self.name, error=f.getErrorMessage()))
            return
        finally:
            f.close()
        self.counters["served"] += 1
        self.counters["served_bytes"] += sent

    @operation
    def stats(self) -> Dict[str, Any]:
        return dict(self.counters, subscription=self.subscription, address=self.address, node=self.node,
                    retrying=sorted(self._retries))

    # asking again for what could not be saved --------------------------------------------

    def _ask_again_later(self, name: str) -> Optional[float]:
        """Make sure dataset C{name} is asked for again; the seconds until then
        (None while stopping). A retry already pending stands: several lost
        deliveries of one dataset need one new one."""
        if self._stopping:
            return None
        retry = self._retries.get(name)
        if retry is None:
            retry = self._retries[name] = _Retry(self.retry_after)
        if retry.call is None or not retry.call.active():
            retry.call = self.clock.callLater(retry.delay, self._ask_again, name)
        return max(0.0, retry.call.getTime() - self.clock.seconds())

    def _ask_again(self, name: str) -> None:
        """Ask the controller for dataset C{name}, for this persister's address
        only, and schedule the next attempt in case this one is lost too."""
        retry = self._retries.get(name)
        if retry is None or self._stopping:
            return
        retry.call = None
        retry.delay = min(retry.delay * 2, self.retry_max)
        if self.address is None:
            self._ask_again_later(name)
            return
        self.counters["asked_again"] += 1
        self.log.info("{component}: asking again for dataset {dataset} (its last delivery was not saved)",
                      component=self.name, dataset=name)
        d = self.bus.call(self.controller, "get_dataset", name=name, to=[self.address])

        def asked(_: Any) -> None:
            self._ask_again_later(name)  # until a delivery is saved: this one may be lost as well

        def refused(failure: Failure) -> None:
            if failure.check(RemoteError) and failure.value.remote_type in ("UnknownDataset", "InvalidName"):
                self.log.info("{component}: dataset {dataset} is no longer registered; not asking again",
                              component=self.name, dataset=name)
                self._settled(name)
                return
            self.log.warn("{component}: cannot ask {controller} again for dataset {dataset}: {reason}; "
                          "again in {delay} s", component=self.name, controller=self.controller, dataset=name,
                          reason=failure.getErrorMessage(), delay=retry.delay)
            self._ask_again_later(name)

        d.addCallbacks(asked, refused)
        d.addErrback(lambda f: self.log.failure("{component}: asking again for {dataset}", f,
                                                component=self.name, dataset=name))

    def _settled(self, name: str) -> None:
        """A delivery of C{name} was saved (or found unchanged): stop asking for it."""
        retry = self._retries.pop(name, None)
        if retry is not None:
            retry.cancel()

    # the subscription address ------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        """A plain publication on a C{dataset.*} topic (C{pub_sub publish}) reaches
        this address too: not an error, only nothing to save (datasets come as streams)."""
        self.log.debug("{component}: a {type} message at {address} (nothing to save: datasets come as streams)",
                       component=self.name, type=message.type or "plain", address=self.address)

    def _on_stream(self, stream: Any) -> None:
        """A dataset stream. Returns at once: its start must be acknowledged for its chunks to come."""
        version = _Version(self, stream)
        d = version.run()
        self._active.add(d)

        def done(result: Any) -> Any:
            self._active.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: self.log.failure("{component}: saving a version", f, component=self.name))

    def _lock(self, name: str) -> DeferredLock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = DeferredLock()
        return lock

    def _last_saved(self, name: str) -> Deferred:
        """(sequence, .dods sha256, version) of the last saved version of C{name}, or (0, "", "")."""
        if name in self._last:
            return succeed(self._last[name])
        d = self._io(_last_saved, os.path.join(self.root, name), name)

        def found(last: Tuple[int, str, str]) -> Tuple[int, str, str]:
            self._last[name] = last
            return last

        return d.addCallback(found)


class _Version:
    """One dataset stream becoming one version directory (or nothing)."""

    def __init__(self, persister: Persister, stream: Any) -> None:
        self.persister = persister
        self.stream = stream
        self.log = persister.log
        self.name: Optional[str] = None
        self.temp: Optional[str] = None
        self.fd: Optional[int] = None
        self.hasher = hashlib.sha256()
        self.bytes = 0
        self.problem: Optional[str] = None
        self.stage = "message"

    @inlineCallbacks
    def run(self) -> Any:
        p = self.persister
        metadata = self.stream.metadata
        try:
            self.name = self._check(metadata)
        except ValueError as e:
            self.problem = str(e)
            yield self._drain()
            return (yield self._failed())
        dataset_dir = os.path.join(p.root, self.name)
        try:
            self.stage = "disk"
            self.temp = yield p._io(_make_temp, dataset_dir)
            yield p._io(_write_file, self.temp, self.name + ".das", metadata["das"].encode("utf-8"))
            yield p._io(_write_file, self.temp, self.name + ".dds", metadata["dds"].encode("utf-8"))
            self.fd = yield p._io(_open_part, self.temp, self.name + ".dods")
        except Exception as e:  # noqa: BLE001 - a disk problem: the version is not saved
            self.problem = f"cannot write under {p.root}: {_describe(e)}"
        self.stage = "stream" if self.problem is None else self.stage
        try:
            yield self.stream.deliver(self._sink)
        except Exception as e:  # noqa: BLE001
            if self.problem is None:
                self.stage = "stream"
                self.problem = f"the stream broke: {e}"
        length = metadata.get("length")
        if self.problem is None and length is not None and length != self.bytes:
            self.problem = f"{self.bytes} bytes arrived, the upstream declared {length}"
        if self.problem is not None:
            yield self._discard()
            return (yield self._failed())
        lock = p._lock(self.name)
        yield lock.acquire()
        try:
            return (yield self._commit(metadata, dataset_dir))
        finally:
            lock.release()

    def _check(self, metadata: Any) -> str:
        if not isinstance(metadata, dict):
            raise ValueError("stream metadata is not an object")
        name = metadata.get("dataset")
        if not dap.valid_name(name):
            raise ValueError(f"not a dataset name: {str(name)[:80]!r}")
        self.name = name
        if metadata.get("topic") not in (None, f"dataset.{name}"):
            raise ValueError(f"topic {str(metadata.get('topic'))[:100]!r} does not name dataset {name}")
        for key in ("das", "dds", "url"):
            if not isinstance(metadata.get(key), str):
                raise ValueError(f"stream metadata without {key!r} text")
        if metadata.get("status") != 200:
            raise ValueError(f"status {metadata.get('status')!r}: only a 200 .dods is a dataset version")
        length = metadata.get("length")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
            raise ValueError(f"bad length {length!r}")
        return name

    def _sink(self, data: bytes) -> Optional[Deferred]:
        if self.problem is not None or self.fd is None:
            return None  # drained and dropped: the stream must be consumed either way
        self.bytes += len(data)
        self.hasher.update(data)
        d = self.persister._io(_write_all, self.fd, data)

        def failed(failure: Failure) -> None:
            if self.problem is None:
                self.stage = "disk"
                self.problem = f"cannot write under {self.persister.root}: {_describe(failure.value)}"

        return d.addErrback(failed)

    def _drain(self) -> Deferred:
        d = self.stream.deliver(lambda data: None)
        return d.addErrback(lambda _: None)

    @inlineCallbacks
    def _discard(self) -> Any:
        p = self.persister
        fd, self.fd = self.fd, None
        temp, self.temp = self.temp, None
        try:
            yield p._io(_cleanup, fd, temp)
        except Exception as e:  # noqa: BLE001
            self.log.warn("{component}: cannot remove {temp}: {error}", component=p.name, temp=temp, error=e)

    @inlineCallbacks
    def _commit(self, metadata: Dict[str, Any], dataset_dir: str) -> Any:
        p = self.persister
        name = self.name
        sha = self.hasher.hexdigest()
        try:
            sequence, last_sha, last_version = yield p._last_saved(name)
        except Exception as e:  # noqa: BLE001
            self.stage, self.problem = "disk", f"cannot read the versions of {name}: {_describe(e)}"
            yield self._discard()
            return (yield self._failed())
        if sha == last_sha:
            yield self._discard()
            p._settled(name)
            p.counters["unchanged"] += 1
            self.log.info("{component}: dataset {dataset} unchanged (sha256 {sha}); no new version",
                          component=p.name, dataset=name, sha=sha[:12])
            return None
        saved = p.clock.seconds()
        version = version_name(saved, sha)
        manifest = {"dataset": name, "url": metadata["url"], "topic": f"dataset.{name}", "version": version,
                    "sequence": sequence + 1, "fetched": metadata.get("fetched"), "saved": saved,
                    "subscription": p.subscription, "node": p.node}
        fd, self.fd = self.fd, None
        try:
            self.stage = "disk"
            result = yield p._io(_finish_version, fd, self.temp, dataset_dir, version, name, manifest,
                                 metadata.get("das"), self.bytes <= p.max_netcdf_bytes, metadata.get("dds"),
                                 last_version or None)
        except Exception as e:  # noqa: BLE001 - the version is not saved; nothing of it is left
            self.problem = f"cannot save under {p.root}: {_describe(e)}"
            yield self._discard()
            return (yield self._failed())
        self.temp = None
        p._settled(name)
        p._last[name] = (sequence + 1, sha, version)
        p.counters["saved"] += 1
        p.counters["bytes"] += self.bytes
        self.log.info("{component}: dataset {dataset} saved as version {version} ({bytes} bytes of .dods)",
                      component=p.name, dataset=name, version=version, bytes=self.bytes)
        files = {f: info["bytes"] for f, info in result["files"].items()}
        yield events.emit(p.bus, "saved", name, component=p.name, subscription=p.subscription, version=version,
                          path=os.path.join(DATASETS, name, version), url=metadata["url"], sha256=sha,
                          bytes=self.bytes, fetched=metadata.get("fetched"), saved=saved,
                          versions=result["versions"], files=files, netcdf="error" not in result["netcdf"],
                          changes=result["changes"])
        return version

    def _failed(self) -> Deferred:
        p = self.persister
        p.counters["failed"] += 1
        retry_in = p._ask_again_later(self.name) if self.stage != "message" and self.name else None
        self.log.warn("{component}: dataset {dataset} not saved ({stage}): {reason}; {next}", component=p.name,
                      dataset=self.name, stage=self.stage, reason=self.problem,
                      next="not asking again" if retry_in is None else f"asking again in {retry_in:g} s")
        d = events.emit(p.bus, "failed", self.name, component=p.name, subscription=p.subscription,
                        stage=self.stage, reason=(self.problem or "")[:500], retry_in=retry_in)
        return d.addCallback(lambda _: None)


class _Retry:
    """A dataset to ask for again: the wait before the next attempt, and its timer."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.call: Any = None

    def cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


def _global_reactor() -> Any:
    from twisted.internet import reactor
    return reactor
