"""The cache: responses kept on this node's disk, served to whoever asks.

Two ways in (docs/data-path.md):

- the worker queue C{cache}: L{Cache.answer}, the controller's one post for a
  routed request (a fresh entry streamed to the proxy; else the URL fetched
  here, by a fetcher of this process, streamed to the proxy and written to
  the store as it passes, with one fetch per URL at a time: L{_Fill},
  L{_Tee}); and (RPC) L{Cache.lookup}, L{Cache.purge}, L{Cache.stats},
  C{ping}. Any node's cache may answer a lookup; its answer names that
  node's address, where the rest happens.
- the node address C{cache.node.NODE}, a shared listen address every cache
  instance of this node consumes (one listener per process):
  - posts of C{serve(url, method, address, request_id, revalidated=False,
    dataset=None)}: stream the stored response to C{address};
  - streams whose metadata has C{"store": true} (the fetcher's copy of a GET
    200): written to the store, kept only after a complete stream-end.

Purges reach every node: C{purge} on the worker queue purges the node that
took it and tells the others on the fanout C{cache.purge}.

A dataset's change events (fetched, saved, refreshed, registered) on the
notification fanout drop its entries, so a new version is not hidden behind
the old one's for max_age.

A large stored body asked for by a proxy of this process goes from its file
to the client's socket in the kernel (L{ooidx.datapath.splice.FileSplice}),
not through the stream: the stream then carries only its start and its end.

Disk work runs in small thread pools of its own (reads; stored copies' writes),
never on the reactor thread; the store module (L{ooidx.datapath.store}) knows nothing of the bus.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import uuid
from typing import Any, Dict, List, Optional, Set

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from magnet import BadMessage, Message, operation, rpc
from magnet.errors import MagnetError

from ooidx import events
from ooidx.component import Component
from ooidx.config import CacheOptions, FetcherOptions, SecurityConfig
from ooidx.errors import DXError, InvalidName, InvalidURL, UpstreamError
from ooidx.datapath import splice
from ooidx.datapath.fetcher import Fetcher
from ooidx.datapath.splice import FileSplice
from ooidx.datapath.store import Body, DiskStore, Entry, EntryTooLarge, FromPipe, StoreError, Writer
from ooidx.datapath.transfer import Transfer
from ooidx.datapath.stopping import ended_within
from ooidx import wire

__all__ = ["Cache", "node_address", "PURGE_FANOUT"]

#: The fanout every cache node listens on for purges.
PURGE_FANOUT = wire.CACHE_PURGE_FANOUT
#: Bytes read from disk per step while serving (the stream chunks them further).
READ_SIZE = 1024 * 1024
#: Streams served at once by one process; further serves wait their turn.
MAX_SERVING = 32
#: Seconds between writes of the in-memory access times to disk.
FLUSH_INTERVAL = 60.0
#: Disk threads of one cache process for reads (lookups, serving), and for writes
#: (stored copies: their fsyncs must not hold a lookup up in the same queue).
THREADS = 4
WRITE_THREADS = 2
#: Seconds the cache waits at stop for running serves and writes to finish their disk work.
STOP_WAIT = 10.0
#: URL -> dataset pairs a cache process remembers from the lookups (the last ones): a serve
#: or a stored copy that does not name its dataset is filed under it. About 120 bytes a
#: pair (the URL's string and the dict's slot; the name interned): about 1.2 MB at the bound.
RECENT_DATASETS = 10_000
#: Seconds a purge waits for the attribute store's record of the dataset.
ATTRIBUTE_TIMEOUT = 5.0
#: Seconds a request for a URL this process is fetching already waits for that
#: fetch (nginx's proxy_cache_lock_timeout); then it goes upstream itself, unstored.
LOCK_TIMEOUT = 5.0
#: Bytes of a body's stored copy (the tee) that may wait for the disk while the
#: transfer goes on at the client's pace (the disk's latency, its fsyncs and the
#: commit never hold the client). Past it the transfer waits for the disk to be
#: half this behind (a disk slower than the client sets the pace, as in nginx),
#: but at most TEE_STALL seconds at a time: then the copy is dropped and the
#: client goes on (a stuck disk never stalls it). Queued chunks are the node's
#: memory: 16 MiB made the stored 128 MiB miss's peak RSS 108 MB (issue 15's
#: bound is 100); the copy now goes to the disk with O_DIRECT (store.DIRECT_STAGE),
#: fast enough that 8 MiB rarely fills.
TEE_BUFFER = 8 * 1024 * 1024
TEE_STALL = 2.0
#: Events after which a dataset's stored answers are dropped (a new version was
#: fetched or saved, the dataset was refreshed or registered again).
CHANGE_KINDS = ("fetched", "saved", "refreshed", "registered")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_METHODS = ("GET", "HEAD")
#: A stored body's file name: the URL's SHA-256 (64), "-", a uuid4 (32), ".body".
_BODY_NAME_LENGTH = 64 + 1 + 32 + 5


def node_address(node: str) -> str:
    """The address of a node's cache (docs/data-path.md: C{cache.node.NODE})."""
    return f"cache.node.{node}"


def _request_problem(url: Any, method: Any, dataset: Any) -> Optional[Exception]:
    """What is wrong with a C{serve} or C{answer} request's URL, method or
    dataset name (L{InvalidURL}, L{InvalidName}), or None: both refuse alike."""
    try:
        _check_url(url)
        if method not in _METHODS:
            raise InvalidURL(f"method {str(method)[:16]!r} is not served (GET or HEAD)")
        if dataset is not None:
            _check_name(dataset)
    except (InvalidURL, InvalidName) as e:
        return e
    return None


class Cache(Component):
    """The cache component of one node."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, options: Optional[CacheOptions] = None,
                 directory: Optional[str] = None, security: Optional[SecurityConfig] = None,
                 fetch_options: Optional[FetcherOptions] = None, lock_timeout: float = LOCK_TIMEOUT,
                 **kwargs: Any) -> None:
        """C{options}: the config's C{components.cache}; C{directory}: where the
        store lives (the node's data directory's C{cache/}; C{var/cache} here
        when not given); C{security} and C{fetch_options} (the config's
        C{security} and C{components.fetcher}): how a miss is fetched here, where
        its body is stored (L{answer}); C{lock_timeout}: how long a request waits
        for the fetch of the same URL under way (L{LOCK_TIMEOUT})."""
        super().__init__(name, bus, **kwargs)
        self.options: CacheOptions = options if options is not None else CacheOptions()
        #: the upstream side of a miss: a fetcher of this process (its URL policy, HTTP client,
        #: bound on transfers), not a component on the bus
        self.fetcher = Fetcher(f"{name}.fetch", bus, node=self.node, clock=self.clock, reactor=kwargs.get("reactor"),
                               options=fetch_options, security=security)
        self.lock_timeout = lock_timeout
        self.prefetch = self.fetcher.options.max_transfers + MAX_SERVING
        #: URL -> the fetch of it under way here whose body is being stored (the per-URL lock)
        self._fills: Dict[str, "_Fill"] = {}
        self._change_subscription: Any = None
        self.address = node_address(self.node)
        self.store = DiskStore(directory or os.path.abspath(os.path.join("var", "cache")), self.options.max_bytes,
                               now=self.clock.seconds)
        self.counters: Dict[str, int] = {"lookups": 0, "hits": 0, "misses": 0, "stale": 0, "served_bytes": 0,
                                         "stores": 0, "store_failures": 0, "gone": 0, "waited": 0,
                                         "invalidated": 0, "spliced_hits": 0}
        self._id = uuid.uuid4().hex
        self._pool: Optional[ThreadPool] = None
        self._write_pool: Optional[ThreadPool] = None
        self._reactor: Any = None
        self._listener: Any = None
        self._purge_subscription: Any = None
        self._flusher: Optional[LoopingCall] = None
        self._serving = DeferredSemaphore(MAX_SERVING)
        self._active: Set[Deferred] = set()
        self._writers: Dict[str, "_Incoming"] = {}
        self._recent_datasets: Dict[str, str] = {}
        self._node_ops = rpc.operations(_NodeOperations(self))

    # lifecycle ---------------------------------------------------------------------

    @inlineCallbacks
    def setUp(self) -> Any:
        self._reactor = self.bus.clock if IReactorThreads.providedBy(self.bus.clock) else _global_reactor()
        self._pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="ooidx-cache-io")
        self._pool.start()
        self._write_pool = ThreadPool(minthreads=0, maxthreads=WRITE_THREADS, name="ooidx-cache-write")
        self._write_pool.start()
        yield self._io(self.store.open)
        self._listener = yield self.bus.listen(self._on_node_message, name=self.address, shared=True,
                                               on_stream=self._on_stream)
        self._purge_subscription = yield self.bus.subscribe(PURGE_FANOUT, self._on_purge_broadcast)
        self._change_subscription = yield self.bus.subscribe(events.NOTIFICATION, self._on_event)
        self._flusher = LoopingCall(self._flush)
        self._flusher.clock = self.clock
        self._flusher.start(FLUSH_INTERVAL, now=False)

    @inlineCallbacks
    def tearDown(self) -> Any:
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        # Cancel, not delete: other processes of this node may consume the same
        # shared address; the broker removes it when its last consumer goes.
        subscriptions = [self._purge_subscription, self._change_subscription,
                         self._listener.subscription if self._listener else None]
        for subscription in subscriptions:
            if subscription is not None:
                try:
                    yield subscription.cancel()
                except Exception as e:  # the bus may already be gone
                    self.log.debug("cancelling {what}: {error}", what=subscription.name, error=e,
                                   component=self.name)
        self._listener = self._purge_subscription = self._change_subscription = None
        for incoming in list(self._writers.values()):
            incoming.cancel("the cache is stopping")
        for fill in list(self._fills.values()):
            fill.cancel("the cache is stopping")
        try:
            yield self.fetcher.tearDown()
        except Exception as e:
            self.log.warn("{component}: stopping its fetches: {error}", component=self.name, error=e)
        # Let running serves and writes finish their disk work (they end quickly once the bus is gone).
        ended = yield ended_within(list(self._active), STOP_WAIT, self._reactor)
        if not ended:
            self.log.warn("{component}: serves or writes still running after {timeout:g} s; stopping anyway",
                          component=self.name, timeout=STOP_WAIT)
        if self._pool is not None:
            try:
                yield self._io(self.store.close)
            except Exception as e:
                self.log.warn("closing the cache store: {error}", error=e, component=self.name)
            self._pool.stop()
            self._pool = None
        if self._write_pool is not None:
            self._write_pool.stop()
            self._write_pool = None

    def _io(self, f: Any, *args: Any, **kwargs: Any) -> Deferred:
        """Run blocking disk work in the cache's threads."""
        if self._pool is None:
            return fail(StoreError("the cache is not running"))
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def _write_io(self, f: Any, *args: Any, **kwargs: Any) -> Deferred:
        """Run blocking disk work of a stored copy (open, write, commit, abort) in the
        cache's write threads: a commit's fsyncs never queue ahead of a lookup."""
        if self._write_pool is None:
            return fail(StoreError("the cache is not running"))
        return deferToThreadPool(self._reactor, self._write_pool, f, *args, **kwargs)

    def _flush(self) -> Deferred:
        d = self._io(self.store.flush)
        d.addErrback(lambda f: self.log.warn("saving access times: {error}", error=f.getErrorMessage(),
                                             component=self.name))
        return d

    def _track(self, d: Deferred) -> Deferred:
        self._active.add(d)

        def done(result: Any) -> Any:
            self._active.discard(d)
            return result

        return d.addBoth(done)

    # the worker queue ------------------------------------------------------------

    @operation
    @inlineCallbacks
    def lookup(self, url: str, dataset: Optional[str] = None) -> Any:
        """Whether this node has C{url}: C{{"state": "fresh"|"stale"|"miss", "node": ADDRESS,
        "validators": {"etag", "last_modified"}}} (fresh: younger than max_age)."""
        _check_url(url)
        if dataset is not None:
            _check_name(dataset)
            self._remember_dataset(url, dataset)
        self.counters["lookups"] += 1
        entry = yield self._io(self.store.get, url, touch=False)
        answer: Dict[str, Any] = {"node": self.address, "max_entry_bytes": self.max_entry_bytes(url)}
        if entry is None:
            self.counters["misses"] += 1
            answer.update(state="miss", validators={})
            return answer
        age = self.clock.seconds() - entry.stored
        fresh = age < self.options.max_age
        if not fresh:
            self.counters["stale"] += 1
        if dataset is not None and entry.dataset is None:
            self._io(self.store.set_dataset, url, dataset).addErrback(lambda _: None)
        answer.update(state="fresh" if fresh else "stale", validators={"etag": entry.validators.get("etag"),
                                                                 "last_modified": entry.validators.get("last_modified")},
                      age=max(age, 0.0), size=entry.size)
        return answer

    def max_entry_bytes(self, url: str) -> int:
        """A bound on the body of C{url} this node could keep: the store's size less
        the smallest metadata an entry of that URL can have (a larger body never fits;
        one this size may still not, with its headers)."""
        smallest = Entry(url=url, status=200, reason="", headers=[], validators={}, stored=0.0, size=0,
                         body="x" * _BODY_NAME_LENGTH)
        return max(0, self.store.max_bytes - len(smallest.to_json()))

    @operation
    @inlineCallbacks
    def purge(self, name: str, base_url: Optional[str] = None) -> Any:
        """Remove the entries of dataset C{name} (and those under C{base_url} with no
        dataset recorded) on every node; the count removed on this one."""
        _check_name(name)
        if base_url is None:
            base_url = yield self._base_url_of(name)
        else:
            _check_url(base_url)
        count = yield self._purge_here(name, base_url)
        message = rpc.request("purge", {"name": name, "base_url": base_url, "origin": self._id})
        try:
            yield self.bus.send(PURGE_FANOUT, message)
        except MagnetError as e:
            self.log.warn("purge of {dataset} not passed on to the other nodes: {error}", dataset=name, error=e,
                          component=self.name)
        return count

    @inlineCallbacks
    def _base_url_of(self, name: str) -> Any:
        """The base URL of dataset C{name} in the attribute store (a purged record keeps
        it), or None: entries whose dataset is not recorded are found by it."""
        try:
            record = yield self.bus.call("attribute_store", "get", key=wire.dataset_key(name), timeout=ATTRIBUTE_TIMEOUT)
        except MagnetError as e:
            self.log.info("purge of {dataset}: no base URL from the attribute store ({error}); purging by name",
                          dataset=name, error=e, component=self.name)
            return None
        url = record.get("url") if isinstance(record, dict) else None
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return url
        return None

    @operation
    @inlineCallbacks
    def stats(self) -> Any:
        """Entries, bytes and counters of this node's cache."""
        store = yield self._io(self.store.stats)
        return {**store, **self.counters, "node": self.node, "max_age": self.options.max_age}

    def _purge_here(self, name: str, base_url: Optional[str]) -> Deferred:
        for incoming in list(self._writers.values()):
            if incoming.belongs(name, base_url):
                incoming.cancel(f"dataset {name} purged")
        for fill in list(self._fills.values()):
            if fill.belongs(name, base_url):
                fill.cancel(f"dataset {name} purged")
        self._recent_datasets = {u: d for u, d in self._recent_datasets.items() if d != name}
        d = self._io(self.store.purge, dataset=name, base_url=base_url)

        def done(count: int) -> int:
            self.log.info("purged {count} entries of {dataset}", count=count, dataset=name, component=self.name)
            return count

        return d.addCallback(done)

    def _on_purge_broadcast(self, message: Message) -> Any:
        try:
            op, kwargs = rpc.decode_request(message)
        except BadMessage as e:
            self.log.warn("ignoring a malformed purge broadcast: {error}", error=e, component=self.name)
            return None
        if op != "purge" or kwargs.get("origin") == self._id:
            return None
        name, base_url = kwargs.get("name"), kwargs.get("base_url")
        if not isinstance(name, str) or not _NAME.match(name) or not (base_url is None or isinstance(base_url, str)):
            self.log.warn("ignoring a purge broadcast with bad arguments", component=self.name)
            return None
        d = self._purge_here(name, base_url)
        d.addErrback(lambda f: self.log.warn("purge of {dataset}: {error}", dataset=name,
                                             error=f.getErrorMessage(), component=self.name))
        return d

    def _remember_dataset(self, url: str, dataset: str) -> None:
        """Remember that C{url} belongs to C{dataset} (the last L{RECENT_DATASETS} lookups).
        The name is interned: every lookup decodes its own copy of it from JSON, and
        10,000 copies of a few names cost about 0.5 MB more (the soak, docs/reliability.md#soak)."""
        self._recent_datasets.pop(url, None)
        self._recent_datasets[url] = sys.intern(dataset)
        while len(self._recent_datasets) > RECENT_DATASETS:
            self._recent_datasets.pop(next(iter(self._recent_datasets)))

    # the node address: posts ------------------------------------------------------

    def _on_node_message(self, message: Message) -> Any:
        """A plain message at the node address: a posted request (serve)."""
        if message.type != rpc.CALL:
            self.log.warn("ignoring a {type!r} message at {address}", type=message.type, address=self.address,
                          component=self.name)
            return None
        d = rpc.invoke(self._node_ops, self.address, message)

        def failed(failure: Failure) -> Any:
            # Retrying cannot mend a request that does not fit: dead-letter it at once,
            # and tell the caller when it asked for an answer.
            if message.reply_to:
                self.bus.transport.publish("", message.reply_to, rpc.error_reply(failure, message.correlation_id),
                                           mandatory=True).addErrback(lambda _: None)
            raise BadMessage(f"{failure.type.__name__}: {failure.getErrorMessage()}")

        return d.addErrback(failed)

    def serve(self, url: Any = None, method: Any = "GET", address: Any = None, request_id: Any = None,
              revalidated: Any = False, dataset: Any = None) -> Any:
        """Stream the stored response for C{url} to C{address}; the post is taken at
        once, the streaming goes on (bounded to L{MAX_SERVING} at a time)."""
        if not isinstance(address, str) or not address:
            raise BadMessage("serve needs an address to stream to")
        if not isinstance(request_id, (str, type(None))):
            raise BadMessage("request_id must be a string")
        problem = _request_problem(url, method, dataset)
        if problem is not None:
            self.log.warn("refusing serve of {url!r}: {error}", url=url, error=problem, component=self.name)
            return self._error_to(address, request_id, problem)
        d = self._serving.run(self._serve, url, method, address, request_id, bool(revalidated), dataset)
        d.addErrback(lambda f: self.log.failure("serving {url}", f, url=url, component=self.name))
        self._track(d)
        return None

    @inlineCallbacks
    def _serve(self, url: str, method: str, address: str, request_id: Optional[str], revalidated: bool,
               dataset: Optional[str]) -> Any:
        entry = None
        try:
            if revalidated:
                entry = yield self._io(self.store.refresh, url)
            else:
                entry = yield self._io(self.store.get, url)
        except (OSError, StoreError) as e:
            self.log.warn("cannot refresh {url} ({error}); serving what is stored", url=url, error=e,
                          component=self.name)
            entry = yield self._io(self.store.get, url)
        served = False
        if entry is not None:
            served = yield self._serve_entry(entry, method, address, request_id, dataset)
        if not served:
            yield self._gone(url, method, address, request_id)

    @inlineCallbacks
    def _serve_entry(self, entry: Entry, method: str, address: str, request_id: Optional[str],
                     dataset: Optional[str]) -> Any:
        """Stream a stored entry to C{address}; False if its body has gone meanwhile
        (nothing was sent), else True (sent whole, or the stream aborted)."""
        url = entry.url
        try:
            body = yield self._io(self.store.open_body, entry)
        except FileNotFoundError:
            return False
        metadata = {"status": entry.status, "reason": entry.reason, "headers": entry.headers, "url": entry.url,
                    "source": "cache", "length": entry.size}
        job = self._splice(entry, method, request_id, body)
        if job is not None:
            metadata[wire.SPLICED] = True
        writer = self.bus.open_stream(address, metadata, correlation_id=request_id)
        sent = 0
        try:
            if job is not None:
                try:
                    sent = yield job.outcome()
                finally:
                    yield job.quiet()  # no disk thread reads the body any more: it may close
                if sent != entry.size:
                    raise StoreError(f"spliced {sent} bytes of {url}, not {entry.size}")
                self.counters["spliced_hits"] += 1
            elif method != "HEAD":
                while True:
                    data = yield self._io(body.read, READ_SIZE)
                    if not data:
                        break
                    sent += len(data)
                    yield writer.write(data)
                if sent != entry.size:
                    raise StoreError(f"stored body of {url} is {sent} bytes, not {entry.size}")
            yield writer.finish()
        except Exception as e:
            if job is not None:
                sent = job.sent
            self.log.warn("serving {url} to {address} failed after {bytes} bytes: {error}", url=url,
                          address=address, bytes=sent, error=e, component=self.name)
            writer.abort(e)
            return True
        finally:
            self._io(body.close).addErrback(lambda _: None)
        self.counters["hits"] += 1
        self.counters["served_bytes"] += sent
        self.log.debug("served {url} ({bytes} bytes) to {address}", url=url, bytes=sent, address=address,
                       component=self.name)
        self._record(url, entry.dataset or dataset, sent, entry.status)
        return True

    def _splice(self, entry: Entry, method: str, request_id: Optional[str], body: Any) -> Optional[FileSplice]:
        """A L{FileSplice} of the body's file to the client's socket, if the
        proxy that asked is in this process and the body is large enough (see
        L{ooidx.datapath.splice}); else None (the stream path). The proxy's end
        is taken, and the splice hung on it, before the stream's start goes out."""
        if (method != "GET" or entry.status != 200 or entry.size < splice.SPLICE_MIN
                or not splice.available()):
            return None
        end = splice.HANDOFFS.take(request_id)
        if end is None:
            return None
        job = FileSplice(self._reactor, body.fileno(), entry.size, self._io, idle_timeout=self.fetcher.options.timeout,
                         log=self.log)
        end.splice = job
        return job

    # the worker queue: a request answered here, from the store or upstream ---------------

    @operation
    def answer(self, url: Any = None, method: Any = "GET", address: Any = None, request_id: Any = None,
               dataset: Any = None) -> Any:
        """The controller's one call on the data path (posted to the C{cache} worker
        queue with the proxy's address): stream a fresh stored answer to C{address},
        or fetch C{url} here and stream it to C{address} while the body is written
        to this node's store on its way (the tee). A URL another request of this
        process is fetching already waits for that fetch (at most C{lock_timeout}
        seconds) and is then served from the store. Never fails: a problem is an
        error reply to C{address}. Fires when the answer is over, so that the
        request is delivered again (and the proxy cuts the client's transfer) if
        this process dies meanwhile."""
        if not isinstance(address, str) or not address:
            self.log.warn("{component}: answer without an address (url {url!r}); dropped", component=self.name,
                          url=str(url)[:200])
            return None
        if not isinstance(request_id, (str, type(None))):
            request_id = None
        problem = _request_problem(url, method, dataset)
        if problem is not None:
            return self._error_to(address, request_id, problem)
        d = self._answer(url, method, address, request_id, dataset)

        def failed(failure: Failure) -> Any:
            self.log.failure("{component}: answering {url}", failure, component=self.name, url=url)
            return self._error_to(address, request_id, UpstreamError("internal error in the cache"))

        return self._track(d.addErrback(failed))

    def _is_fresh(self, entry: Entry) -> bool:
        return self.clock.seconds() - entry.stored < self.options.max_age

    @inlineCallbacks
    def _answer(self, url: str, method: str, address: str, request_id: Optional[str], dataset: Optional[str],
                waited: bool = False) -> Any:
        self.counters["lookups"] += 1
        if dataset is not None:
            self._remember_dataset(url, dataset)
        entry = yield self._io(self.store.get, url, touch=False)
        if entry is not None and self._is_fresh(entry):
            served = yield self._serving.run(self._serve_entry, entry, method, address, request_id, dataset)
            if served:
                return None
            entry = None  # gone meanwhile
        fill = self._fills.get(url)
        if fill is not None and not waited:
            # the per-URL lock: one upstream fetch for concurrent misses
            self.counters["waited"] += 1
            yield fill.wait(self.lock_timeout)
            result = yield self._answer(url, method, address, request_id, dataset, waited=True)
            return result
        self.counters["misses" if entry is None else "stale"] += 1
        store = method == "GET" and fill is None
        result = yield self._fetch(url, method, address, request_id, dataset, entry if store else None, store)
        return result

    def _fetch(self, url: str, method: str, address: str, request_id: Optional[str], dataset: Optional[str],
               entry: Optional[Entry], store: bool) -> Deferred:
        """Fetch C{url} here, streaming it to C{address}; with C{store}, the body is
        also written to the store as it goes (and C{entry}, a stale one, revalidated)."""
        fill = None
        if store:
            fill = self._fills[url] = _Fill(self, url, dataset or self._recent_datasets.get(url))
        validators = {"etag": entry.validators.get("etag"), "last_modified": entry.validators.get("last_modified")} \
            if entry is not None else {}
        not_modified = (lambda: self._revalidated(url, method, address, request_id, dataset)) \
            if entry is not None else None
        transfer = Transfer(self.fetcher, url, method, address, request_id, validators=validators,
                            store_limit=self.max_entry_bytes(url) if store else None,
                            tee=fill.tee if fill is not None else None, not_modified=not_modified)
        d = self.fetcher.run_transfer(transfer)

        def done(result: Any) -> Any:
            if fill is not None:
                if self._fills.get(url) is fill:
                    del self._fills[url]
                fill.release()
            return result

        return d.addBoth(done)

    @inlineCallbacks
    def _revalidated(self, url: str, method: str, address: str, request_id: Optional[str],
                     dataset: Optional[str]) -> Any:
        """The upstream said 304 to a stale entry's validators: it is stored now again, and served."""
        try:
            entry = yield self._io(self.store.refresh, url)
        except (OSError, StoreError) as e:
            self.log.warn("cannot refresh {url} ({error}); serving what is stored", url=url, error=e,
                          component=self.name)
            entry = yield self._io(self.store.get, url)
        served = False
        if entry is not None:
            served = yield self._serving.run(self._serve_entry, entry, method, address, request_id, dataset)
        if not served:
            yield self._fetch(url, method, address, request_id, dataset, None, False)
        return None

    # dataset changes: what was stored of a dataset goes with its old version ---------------

    def _on_event(self, message: Message) -> Any:
        """C{fetched}, C{saved}, C{refreshed} or C{registered} of a dataset on the
        notification fanout: its stored answers (and those under the event's C{url})
        are dropped and the stores of it under way cancelled, so that no read through
        the exchange returns the old version's bytes. Never fails."""
        topic = message.headers.get(events.TOPIC_HEADER) if isinstance(message.headers, dict) else None
        if message.type != events.EVENT or not isinstance(topic, str):
            return None
        parts = topic.split(".", 2)
        if len(parts) != 3 or parts[1] not in CHANGE_KINDS or not _NAME.match(parts[2]):
            return None
        name = parts[2]
        try:
            body = message.json()
        except MagnetError:
            body = None
        base_url = body.get("url") if isinstance(body, dict) else None
        if not (isinstance(base_url, str) and base_url.startswith(("http://", "https://"))):
            base_url = None
        self.counters["invalidated"] += 1
        d = self._purge_here(name, base_url)
        d.addErrback(lambda f: self.log.warn("{component}: dropping {dataset} after {kind}: {error}",
                                             component=self.name, dataset=name, kind=parts[1],
                                             error=f.getErrorMessage()))
        return d

    def _gone(self, url: str, method: str, address: str, request_id: Optional[str]) -> Deferred:
        """The entry went between lookup and serve: have a fetcher get it (and store it
        here again); if no fetcher can be reached, answer UpstreamError."""
        self.counters["gone"] += 1
        self.log.info("{url} left the cache before it was served; asking a fetcher", url=url, component=self.name)
        d = self.bus.post("fetcher", "fetch", url=url, method=method, address=address, request_id=request_id,
                          store=self.address, validators={})
        d.addErrback(lambda f: self._error_to(address, request_id, UpstreamError("cache entry gone")))
        return d

    def _error_to(self, address: str, request_id: Optional[str], exc: Exception) -> Deferred:
        d = self.bus.send(address, rpc.error_reply(Failure(exc), request_id))
        d.addErrback(lambda f: self.log.info("error reply to {address} not delivered: {error}", address=address,
                                             error=f.getErrorMessage(), component=self.name))
        return d

    def _record(self, url: str, dataset: Optional[str], size: int, status: int) -> None:
        d = self.bus.post("controller", "record", dataset=dataset, url=url, hit=True, bytes=size, status=status)
        d.addErrback(lambda f: self.log.debug("record not delivered: {error}", error=f.getErrorMessage(),
                                              component=self.name))

    # the node address: streams to store ----------------------------------------------

    def _on_stream(self, stream: Any) -> None:
        """A stream at the node address: a response to keep. Returns at once (the
        stream's start must be acknowledged for its chunks to arrive)."""
        incoming = _Incoming(self, stream)
        self._writers[incoming.id] = incoming
        d = incoming.run()

        def finished(result: Any) -> Any:
            self._writers.pop(incoming.id, None)
            return result

        d.addBoth(finished)
        d.addErrback(lambda f: self.log.failure("storing a stream", f, component=self.name))
        self._track(d)


class _NodeOperations:
    """What posts to the node address may ask for."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache

    @operation
    def serve(self, url: Any = None, method: Any = "GET", address: Any = None, request_id: Any = None,
              revalidated: Any = False, dataset: Any = None) -> Any:
        return self._cache.serve(url=url, method=method, address=address, request_id=request_id,
                                 revalidated=revalidated, dataset=dataset)


class _Incoming:
    """One stream being written to the store. Its sink never fails (so the
    stream is always drained and acknowledged); a problem switches it to
    discarding, and the entry is dropped at the end."""

    def __init__(self, cache: Cache, stream: Any) -> None:
        self.cache = cache
        self.stream = stream
        self.id = uuid.uuid4().hex
        self.writer: Optional[Writer] = None
        self.problem: Optional[str] = None
        self.url: Optional[str] = None
        self.dataset: Optional[str] = None

    def belongs(self, name: str, base_url: Optional[str]) -> bool:
        if self.url is None:
            return False
        if self.dataset is not None:
            return self.dataset == name
        return bool(base_url) and self.url.startswith(base_url)

    def cancel(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason

    @inlineCallbacks
    def run(self) -> Any:
        cache, log = self.cache, self.cache.log
        metadata = self.stream.metadata
        try:
            self.writer = yield self._open(metadata)
        except (StoreError, DXError, ValueError, TypeError) as e:
            self.problem = str(e)
        if self.problem is not None:
            log.warn("not storing a stream: {reason}", reason=self.problem, component=cache.name)
        try:
            yield self.stream.deliver(self._sink)
        except Exception as e:
            self.cancel(f"stream broke: {e}")
        writer = self.writer
        if writer is None:
            return None
        if self.problem is not None:
            cache.counters["store_failures"] += 1
            log.warn("not keeping {url}: {reason}", url=self.url, reason=self.problem, component=cache.name)
            yield cache._write_io(writer.abort)
            return None
        try:
            entry = yield cache._write_io(writer.commit)
        except (StoreError, OSError) as e:
            cache.counters["store_failures"] += 1
            log.warn("not keeping {url}: {error}", url=self.url, error=e, component=cache.name)
            return None
        cache.counters["stores"] += 1
        log.info("stored {url} ({bytes} bytes)", url=entry.url, bytes=entry.size, component=cache.name)
        events.emit(cache.bus, "cached", entry.dataset, component=cache.name, url=entry.url, bytes=entry.size)
        return entry

    def _open(self, metadata: Any) -> Deferred:
        if not isinstance(metadata, dict) or metadata.get("store") is not True:
            raise ValueError("a stream at the cache's address without \"store\": true")
        url = metadata.get("url")
        _check_url(url)
        self.url = url
        length = metadata.get("length")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
            raise ValueError(f"bad length {length!r}")
        if metadata.get("status") != 200:
            raise ValueError(f"only 200 answers are kept, not {metadata.get('status')!r}")
        if length is not None and length > self.cache.max_entry_bytes(url):
            # would be refused at commit: drain the stream without writing it
            raise EntryTooLarge(f"{length} bytes will not fit in a store of {self.cache.store.max_bytes}")
        dataset = metadata.get("dataset")
        if not (isinstance(dataset, str) and _NAME.match(dataset)):
            dataset = self.cache._recent_datasets.get(url)
        self.dataset = dataset
        return self.cache._write_io(self.cache.store.writer, url, status=200, reason=metadata.get("reason") or "OK",
                              headers=metadata.get("headers") or [], validators=metadata.get("validators"),
                              dataset=dataset, length=length)

    def _sink(self, data: bytes) -> Optional[Deferred]:
        if self.problem is not None or self.writer is None:
            return None
        d = self.cache._write_io(self.writer.write, data)
        d.addErrback(self._write_failed)
        return d

    def _write_failed(self, failure: Failure) -> None:
        if failure.check(EntryTooLarge):
            self.cancel(failure.getErrorMessage())
        else:
            self.cancel(f"cannot write: {failure.getErrorMessage()}")


class _Fill:
    """The fetch of one URL under way in this process whose body is being stored:
    the per-URL lock (other requests for the URL wait for it, bounded) and the
    store's copy of the body (L{_Tee})."""

    def __init__(self, cache: Cache, url: str, dataset: Optional[str]) -> None:
        self.cache = cache
        self.url = url
        self.dataset = dataset
        self.copy: Optional[_Tee] = None
        self.problem: Optional[str] = None
        self._waiters: list = []

    def tee(self, metadata: Dict[str, Any]) -> Optional["_Tee"]:
        """The transfer's writer for the store's copy (Transfer's C{tee})."""
        if self.problem is not None:
            return None
        self.copy = _Tee(self.cache, self.url, self.dataset, metadata)
        return self.copy

    def belongs(self, name: str, base_url: Optional[str]) -> bool:
        if self.dataset is not None:
            return self.dataset == name
        return bool(base_url) and self.url.startswith(base_url)  # type: ignore[arg-type]

    def cancel(self, reason: str) -> None:
        """Keep nothing of this fetch (the dataset changed or went; the cache stops)."""
        if self.problem is None:
            self.problem = reason
        if self.copy is not None:
            self.copy.cancel(reason)

    def wait(self, timeout: float) -> Deferred:
        """Fires with None when the fetch is over (its body stored or not), or after
        C{timeout} seconds; never fails."""
        d: Deferred = Deferred()
        self._waiters.append(d)
        call = self.cache.clock.callLater(timeout, self._timed_out, d)
        return d.addBoth(lambda result: (call.cancel() if call.active() else None, None)[1])

    def _timed_out(self, d: Deferred) -> None:
        if d in self._waiters:
            self._waiters.remove(d)
            d.callback(None)

    def release(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class _Tee:
    """The store's copy of a body on its way from the upstream to the client,
    written on this node as it passes (no second stream on the bus). Chunks
    queue here and go to the disk in batches (one thread call, one C{writev},
    for all that queued while the last one ran); C{write} holds the transfer
    back only while the copy is more than L{TEE_BUFFER} bytes behind, and for
    at most L{TEE_STALL} seconds at a time, then the copy is dropped. Kept only after C{finish} (the transfer saw the whole
    body) and the store's commit (which checks the declared length); an
    C{abort} or a C{cancel} keeps nothing."""

    def __init__(self, cache: Cache, url: str, dataset: Optional[str], metadata: Dict[str, Any]) -> None:
        self.cache = cache
        self.url = url
        self.problem: Optional[str] = None
        self.pending = 0  # bytes queued or being written
        self.writer: Optional[Writer] = None
        self._queue: List[Body] = []
        #: the queue is shared with the write thread, which takes what queued while it wrote
        self._lock = threading.Lock()
        self._ended = False  # the commit (or abort) has begun
        self._held: Optional[Deferred] = None  # the transfer's wait while the disk is far behind
        self._stall: Any = None
        self._busy = True  # until the writer is open
        self._ending: Optional[Deferred] = None
        length = metadata.get("length")
        d = cache._write_io(cache.store.writer, url, status=200, reason=metadata.get("reason") or "OK",
                            headers=metadata.get("headers") or [], validators=metadata.get("validators"),
                            dataset=dataset, length=length if isinstance(length, int) else None)
        d.addCallbacks(self._opened, self._failed)
        d.addBoth(self._idle)

    def _opened(self, writer: Writer) -> None:
        self.writer = writer

    def _failed(self, failure: Failure) -> None:
        self.cancel(f"cannot write: {failure.getErrorMessage()}")

    def cancel(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason
        with self._lock:
            queued, self._queue = self._queue, []
        _released(queued)
        self._release()
        if self._ending is not None:
            self._settle()

    def write(self, data: Body) -> Deferred:
        """Queue C{data} (bytes, or a L{FromPipe} piece the write thread reads itself)."""
        if self.problem is not None:
            _released([data])
            return succeed(None)
        self.pending += len(data)
        with self._lock:
            self._queue.append(data)
        if not self._busy:
            self._next()
        if self.pending <= TEE_BUFFER:
            return succeed(None)
        if self._held is None:  # the disk is far behind: hold the transfer, bounded
            self._held = Deferred()
            self._stall = self.cache.clock.callLater(TEE_STALL, self._stalled)
        return self._held

    def _stalled(self) -> None:
        self._stall = None
        self.cancel(f"the disk stayed more than {TEE_BUFFER // 2} bytes behind the client for {TEE_STALL:g} s")

    def _release(self) -> None:
        held, self._held = self._held, None
        stall, self._stall = self._stall, None
        if stall is not None and stall.active():
            stall.cancel()
        if held is not None:
            held.callback(None)

    def _next(self) -> None:
        """Write what queued, in one thread call; or, at the end, commit or abort."""
        if self._queue and self.problem is None and self.writer is not None:
            self._busy = True
            d = self.cache._write_io(self._write_queued, self.writer, self.cache._reactor)
            d.addErrback(self._failed)
            d.addBoth(self._idle)
        elif self._ending is not None and not self._ended:
            self._ended = True
            self._busy = True
            d = self._commit()
            d.addErrback(lambda f: self.cache.log.failure("storing {url}", f, url=self.url,
                                                          component=self.cache.name))
            d.addBoth(lambda _: self._settle())

    def _write_queued(self, writer: Writer, reactor: Any) -> None:
        """(In a write thread.) Write what queued, batch after batch, until
        nothing more has: the thread is not handed back to the reactor (and
        called again) between batches, so a fast body keeps it busy."""
        while True:
            with self._lock:
                if not self._queue or self.problem is not None:
                    return
                batch, self._queue = self._queue, []
            try:
                writer.write_many(batch)
            finally:
                reactor.callFromThread(_released, batch)
            reactor.callFromThread(self._written, None, sum(len(b) for b in batch))

    def _written(self, _: Any, size: int) -> None:
        self.pending -= size
        if self._held is not None and self.pending <= TEE_BUFFER // 2:
            self._release()

    def _idle(self, _: Any) -> None:
        self._busy = False
        self._next()

    def finish(self) -> Deferred:
        """Commit the copy once its writes are done; fires with None (never fails),
        at once for a copy that will not be kept (a write stuck on the disk must not
        hold the transfer: the writer is aborted when that write returns)."""
        if self._ending is None:
            self._ending = Deferred()
            if not self._busy:
                self._next()
        if self.problem is not None:
            self._settle()
        return self._ending

    def _settle(self) -> None:
        if self._ending is not None and not self._ending.called:
            self._ending.callback(None)

    @inlineCallbacks
    def _commit(self) -> Any:
        cache, writer = self.cache, self.writer
        if writer is None:  # the store could not even open the copy (a read-only or full disk)
            cache.counters["store_failures"] += 1
            if self.problem is not None:
                cache.log.warn("not keeping {url}: {reason}", url=self.url, reason=self.problem, component=cache.name)
            return None
        if self.problem is not None:
            cache.counters["store_failures"] += 1
            cache.log.warn("not keeping {url}: {reason}", url=self.url, reason=self.problem, component=cache.name)
            yield cache._write_io(writer.abort)
            return None
        try:
            entry = yield cache._write_io(writer.commit)
        except (StoreError, OSError) as e:
            cache.counters["store_failures"] += 1
            cache.log.warn("not keeping {url}: {error}", url=self.url, error=e, component=cache.name)
            return None
        if self.problem is not None:  # cancelled (the dataset changed) while committing
            yield cache._write_io(cache.store.remove, self.url)
            return None
        cache.counters["stores"] += 1
        cache.log.info("stored {url} ({bytes} bytes)", url=entry.url, bytes=entry.size, component=cache.name)
        events.emit(cache.bus, "cached", entry.dataset, component=cache.name, url=entry.url, bytes=entry.size)
        return entry

    def abort(self, exc: BaseException) -> Deferred:
        """The body broke off (or is not to be kept): nothing of it stays."""
        self.cancel(f"{type(exc).__name__}: {exc}")
        self.finish()
        return succeed(None)


def _released(pieces: List[Body]) -> None:
    """Give back the pipes of the pieces that wait in one (L{FromPipe})."""
    for piece in pieces:
        if isinstance(piece, FromPipe):
            piece.release()



def _check_url(url: Any) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 8192:
        raise InvalidURL(f"not an http(s) URL: {str(url)[:200]!r}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(f"not a dataset name: {str(name)[:100]!r}")


def _global_reactor() -> Any:
    from twisted.internet import reactor
    return reactor
