"""The cache's disk store (ooidx.datapath.store): atomic entries, LRU within a size bound, purge, safe names."""
from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any, List

from ooidx.datapath import store as store_module
from ooidx.datapath.store import DiskStore, EntryTooLarge, FromPipe, StoreError, key_for

from tests.fast.core.support import FastCase, expand

URL = "http://example.org/opendap/sst.nc.dds"


class Now:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Any, max_bytes: int = 1 << 20, now: Any = None) -> DiskStore:
    s = DiskStore(str(tmp_path / "cache"), max_bytes, now=now or Now())
    s.open()
    return s


def put(s: DiskStore, url: str, body: bytes, *, dataset: Any = None, headers: Any = None, chunk: int = 7) -> Any:
    w = s.writer(url, status=200, reason="OK", headers=headers or [["Content-Type", "text/plain"]],
                 dataset=dataset, length=len(body))
    for i in range(0, len(body), chunk):
        w.write(body[i:i + chunk])
    return w.commit()


def body_of(s: DiskStore, url: str) -> bytes:
    entry = s.get(url)
    assert entry is not None
    with s.open_body(entry) as f:
        return f.read()


def files(s: DiskStore) -> List[str]:
    return sorted(n for n in os.listdir(s.root) if n != ".lock")


@expand
class DiskStoreTests(FastCase):
    def test_write_then_read(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        entry = put(s, URL, b"hello world" * 100, dataset="sst",
                    headers=[["Content-Type", "text/plain"], ["ETag", '"v1"'], ["Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"]])
        assert entry.size == 1100 and entry.stored == 1000.0
        got = s.get(URL)
        assert got is not None
        assert (got.url, got.status, got.reason, got.dataset) == (URL, 200, "OK", "sst")
        assert got.validators == {"etag": '"v1"', "last_modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
        assert body_of(s, URL) == b"hello world" * 100
        assert s.get("http://example.org/other") is None

    def test_write_many_is_the_chunks_in_order(self) -> None:
        s = make(self.tmp_path())
        chunks = [bytes([i]) * (1000 + i) for i in range(40)] + [b""]
        w = s.writer(URL, status=200, reason="OK", headers=[], length=sum(len(c) for c in chunks))
        self.monkeypatch().setattr(store_module, "_IOV_MAX", 7)  # several writev calls
        w.write_many(chunks[:30])
        w.write(chunks[30])
        w.write_many(chunks[31:])
        w.commit()
        assert body_of(s, URL) == b"".join(chunks)
        small = make(self.tmp_path() / "small", max_bytes=100)
        w = small.writer(URL, status=200, reason="OK", headers=[])
        with self.assertRaises(EntryTooLarge):
            w.write_many([b"x" * 60, b"y" * 60])

    def test_entry_is_invisible_until_commit_and_abort_leaves_nothing(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        w = s.writer(URL, status=200, reason="OK", headers=[])
        w.write(b"partial")
        assert s.get(URL) is None
        assert [n for n in files(s) if not n.startswith(".tmp-")] == []
        w.abort()
        assert files(s) == []
        assert s.get(URL) is None

    def test_truncated_body_is_never_committed(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        put(s, URL, b"old body")
        w = s.writer(URL, status=200, reason="OK", headers=[], length=100)
        w.write(b"only ten b")
        with self.assertRaisesRegex(StoreError, "10 bytes arrived of the 100"):
            w.commit()
        assert body_of(s, URL) == b"old body"
        assert not any(n.startswith(".tmp-") for n in files(s))

    def test_replacing_an_entry_leaves_one_body(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        put(s, URL, b"first")
        put(s, URL, b"second version")
        assert body_of(s, URL) == b"second version"
        assert len([n for n in files(s) if n.endswith(".body")]) == 1
        assert s.stats()["entries"] == 1

    def test_a_reader_keeps_its_body_while_a_new_version_commits(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        put(s, URL, b"A" * 1000)
        entry = s.get(URL)
        f = s.open_body(entry)
        put(s, URL, b"B" * 10)
        assert f.read() == b"A" * 1000
        f.close()
        assert body_of(s, URL) == b"B" * 10

    def test_crash_mid_write_is_cleaned_at_startup(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        put(s, URL, b"kept")
        w = s.writer("http://example.org/crashing", status=200, reason="OK", headers=[])
        w.write(b"half a bo")
        # the process "dies": its temp file stays. A dead writer's pid marks it as stray.
        dead = os.path.join(s.root, f".tmp-{2 ** 22 + 12345}-deadbeef")
        os.rename(w.path, dead)
        orphan = os.path.join(s.root, key_for("http://x/y") + "-0123.body")  # body renamed, metadata never written
        with open(orphan, "wb") as f:
            f.write(b"orphan")
        s.close()
        s2 = make(tmp_path)
        assert not os.path.exists(dead) and not os.path.exists(orphan)
        assert body_of(s2, URL) == b"kept"
        assert s2.get("http://example.org/crashing") is None
        assert s2.stats()["entries"] == 1

    def test_live_writers_temp_files_survive_another_process_starting(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        alive = os.path.join(s.root, f".tmp-{os.getppid()}-cafe")  # a running process (our parent)
        open(alive, "wb").close()
        make(tmp_path)
        assert os.path.exists(alive)

    def test_metadata_with_a_missing_or_short_body_is_dropped_at_startup(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        e = put(s, URL, b"0123456789")
        with open(os.path.join(s.root, e.body), "r+b") as f:
            f.truncate(5)
        garbage = os.path.join(s.root, key_for("http://g") + ".json")
        with open(garbage, "w") as f:
            f.write("{not json")
        s2 = make(tmp_path)
        assert s2.get(URL) is None
        assert files(s2) == []

    def test_lru_eviction_keeps_the_size_bound(self) -> None:
        tmp_path = self.tmp_path()
        now = Now()
        s = make(tmp_path, max_bytes=3 * 1400, now=now)
        for i in range(3):
            now.t += 1
            put(s, f"http://h/{i}", bytes([i]) * 1000)
        now.t += 1
        s.get("http://h/0")  # 0 is now the most recently used; 1 is the least
        now.t += 1
        put(s, "http://h/3", b"3" * 1000)
        assert s.get("http://h/1", touch=False) is None
        for i in (0, 2, 3):
            assert s.get(f"http://h/{i}", touch=False) is not None
        stats = s.stats()
        assert stats["bytes"] <= 3 * 1400 and stats["evictions"] == 1
        on_disk = sum(os.path.getsize(os.path.join(s.root, n)) for n in files(s))
        assert on_disk == stats["bytes"]

    def test_lru_order_survives_a_restart(self) -> None:
        tmp_path = self.tmp_path()
        now = Now()
        s = make(tmp_path, max_bytes=3 * 1400, now=now)
        for i in range(3):
            now.t += 1
            put(s, f"http://h/{i}", b"x" * 1000)
        now.t += 1
        s.get("http://h/0")
        s.close()  # access times reach the disk
        s2 = make(tmp_path, max_bytes=3 * 1400, now=now)
        now.t += 1
        put(s2, "http://h/3", b"y" * 1000)
        assert s2.get("http://h/1", touch=False) is None
        assert s2.get("http://h/0", touch=False) is not None

    def test_too_large_is_refused_whole(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path, max_bytes=1000)
        with self.assertRaises(EntryTooLarge):
            s.writer(URL, status=200, reason="OK", headers=[], length=5000)
        w = s.writer(URL, status=200, reason="OK", headers=[])
        with self.assertRaises(EntryTooLarge):
            w.write(b"x" * 2000)
        assert files(s) == []

    def test_shrinking_max_bytes_evicts_at_startup(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path, max_bytes=10000)
        for i in range(5):
            put(s, f"http://h/{i}", b"z" * 1000)
        s.close()
        s2 = make(tmp_path, max_bytes=2500)
        assert s2.stats()["bytes"] <= 2500
        assert 1 <= s2.stats()["entries"] <= 2

    def test_purge_by_dataset_and_by_base_url(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        put(s, "http://h/data/sst.nc.dds", b"a", dataset="sst")
        put(s, "http://h/data/sst.nc.das", b"b")  # dataset not known: the base URL decides
        put(s, "http://h/data/sst.nc.dods?time[0]", b"c")
        put(s, "http://h/data/sst.nc4.dds", b"d")  # another file that only shares a prefix
        put(s, "http://h/data/sst.nc.asc", b"e", dataset="other")  # recorded under another dataset
        assert s.purge(dataset="sst", base_url="http://h/data/sst.nc") == 3
        assert s.get("http://h/data/sst.nc4.dds") is not None
        assert s.get("http://h/data/sst.nc.asc") is not None
        assert s.purge(dataset="other") == 1
        assert s.stats()["entries"] == 1

    def test_keys_are_hashes_and_no_url_escapes_the_directory(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        evil = ["http://x/../../etc/passwd", "../../../../tmp/evil", "/etc/passwd", "http://x/%2e%2e/%2e%2e/a",
                "http://x/\x00/a", "http://x/" + "a" * 5000]
        for url in evil:
            put(s, url, b"data")
        for name in files(s):
            stem = name.split("-")[0].split(".")[0]
            assert len(stem) == 64 and all(c in "0123456789abcdef" for c in stem), name
        outside = [p for p in (tmp_path.iterdir()) if p.name != "cache"]
        assert outside == []
        for url in evil:
            assert body_of(s, url) == b"data"
        assert not os.path.exists("/tmp/evil")

    def test_metadata_cannot_point_a_body_elsewhere(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        e = put(s, URL, b"data")
        meta_path = os.path.join(s.root, e.key + ".json")
        with open(meta_path) as f:
            meta = json.load(f)
        meta["body"] = "../../etc/passwd"
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        assert s.get(URL) is None
        assert not os.path.exists(meta_path)

    def test_concurrent_writers_of_one_url_last_complete_wins(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path, max_bytes=64 << 20)
        bodies = {i: bytes([65 + i]) * (100_000 + i) for i in range(8)}
        order: List[int] = []
        barrier = threading.Barrier(len(bodies))
        errors: List[BaseException] = []
        order_lock = threading.Lock()

        def writer(i: int) -> None:
            try:
                w = s.writer(URL, status=200, reason="OK", headers=[], length=len(bodies[i]))
                barrier.wait()
                for j in range(0, len(bodies[i]), 4096):
                    w.write(bodies[i][j:j + 4096])
                with order_lock:  # record the order in which the commits happen
                    w.commit()
                    order.append(i)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,)) for i in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert body_of(s, URL) == bodies[order[-1]]
        assert [n for n in files(s) if n.endswith(".body")] and len([n for n in files(s) if n.endswith(".body")]) == 1
        assert not any(n.startswith(".tmp-") for n in files(s))

    def test_concurrent_writers_without_ordering_never_mix(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path, max_bytes=64 << 20)
        bodies = {i: bytes([65 + i]) * (50_000 + i) for i in range(6)}

        def writer(i: int) -> None:
            put(s, URL, bodies[i], chunk=1000)

        threads = [threading.Thread(target=writer, args=(i,)) for i in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        entry = s.get(URL)
        data = body_of(s, URL)
        assert data in bodies.values() and len(data) == entry.size
        assert s.stats()["entries"] == 1

    def test_disk_full_refuses_cleanly(self) -> None:
        tmp_path = self.tmp_path()
        monkeypatch = self.monkeypatch()
        s = make(tmp_path)
        put(s, URL, b"existing")

        real_write = os.write
        root = s.root

        def full(fd: int, data: Any) -> int:
            # ENOSPC for files on the cache's file system only (not the reactor's waker pipe)
            if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(store_module.os, "write", full)
        w = s.writer("http://h/new", status=200, reason="OK", headers=[])
        with self.assertRaisesRegex(StoreError, "No space left"):
            w.write(b"data")
            w.commit()  # (a direct write stages what is written: the disk sees it at the commit)
        assert s.get("http://h/new") is None
        assert not any(n.startswith(".tmp-") for n in files(s))
        assert body_of(s, URL) == b"existing"

    def test_read_only_dir_refuses_cleanly(self) -> None:
        tmp_path = self.tmp_path()
        monkeypatch = self.monkeypatch()
        s = make(tmp_path)
        put(s, URL, b"existing")
        real_open = os.open

        def read_only(path: Any, flags: int, *args: Any) -> int:
            if flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(path, flags, *args)

        monkeypatch.setattr(store_module.os, "open", read_only)
        with self.assertRaisesRegex(StoreError, "Read-only"):
            s.writer("http://h/new", status=200, reason="OK", headers=[])
        assert body_of(s, URL) == b"existing"
        assert s.get("http://h/new") is None

    def test_failure_at_commit_leaves_the_old_version(self) -> None:
        tmp_path = self.tmp_path()
        monkeypatch = self.monkeypatch()
        s = make(tmp_path)
        put(s, URL, b"old")
        w = s.writer(URL, status=200, reason="OK", headers=[])
        w.write(b"new")
        real_rename = os.rename

        def failing_rename(src: str, dst: str) -> None:
            if dst.endswith(".json"):
                raise OSError(errno.EIO, "I/O error")
            real_rename(src, dst)

        monkeypatch.setattr(store_module.os, "rename", failing_rename)
        with self.assertRaises(StoreError):
            w.commit()
        monkeypatch.setattr(store_module.os, "rename", real_rename)
        assert body_of(s, URL) == b"old"
        assert not any(n.startswith(".tmp-") for n in files(s))
        assert len([n for n in files(s) if n.endswith(".body")]) == 1

    def test_refresh_updates_stored_time(self) -> None:
        tmp_path = self.tmp_path()
        now = Now(1000.0)
        s = make(tmp_path, now=now)
        put(s, URL, b"x")
        now.t = 2000.0
        assert s.refresh(URL).stored == 2000.0
        assert make(tmp_path, now=now).get(URL).stored == 2000.0
        assert s.refresh("http://none") is None

    def test_writer_refuses_bad_metadata(self) -> None:
        tmp_path = self.tmp_path()
        s = make(tmp_path)
        for kwargs in ({"status": "200", "headers": []}, {"status": 200, "headers": "Content-Type: x"},
                       {"status": 200, "headers": [["a"]]}, {"status": 99, "headers": []}):
            with self.assertRaises(StoreError):
                s.writer(URL, reason="OK", **kwargs)
        with self.assertRaises(StoreError):
            s.writer("", status=200, reason="OK", headers=[])
        assert files(s) == []


class IndexMemoryTests(FastCase):
    """The in-memory index keeps a slim record per entry, not its headers: a soak of the
    exchange (scripts/soak, 30 min of fresh misses) grew the daemon by 3 KB per cached
    answer, 44 MB for 15,000, bounded only by the store's bytes on disk (1 GiB of small
    answers: over a million entries, gigabytes of memory). A slim record (url, body name,
    dataset, footprint, last access) in an OrderedDict still cost about 590 bytes (the second
    soak: +12.5 MB for 18,374 entries); the record now keeps no derivable string (the body's
    token as an int, the dataset interned, the URL only when no dataset is known) in a plain
    dict keyed by the 32 bytes of the SHA-256: about 250 (340 in this small store)."""

    HEADERS = [["Server", "TwistedWeb/26.10.0"], ["Date", "Sun, 06 Dec 2026 01:18:26 GMT"],
               ["Opendap-Server", "pydap/3.5.9"], ["Content-Description", "dods_data"],
               ["Content-Type", "application/octet-stream"], ["Last-Modified", "Sun, 06 Dec 2026 01:02:30 -0000"],
               ["Access-Control-Allow-Origin", "*"],
               ["Access-Control-Allow-Headers", "Origin, X-Requested-With, Content-Type"], ["Content-Length", "137"]]

    def test_an_entry_costs_about_300_bytes_of_index(self) -> None:
        import tracemalloc
        root = self.tmp_path()
        s = make(root, max_bytes=1 << 30)
        count = 400
        for i in range(count):
            put(s, f"http://127.0.0.1:35683/long.nc.dods?time[{i}:1:{i + 8}]", b"x" * 137, dataset="long",
                headers=self.HEADERS, chunk=1 << 16)
        s.close()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            again = make(root, max_bytes=1 << 30)  # the index, read back from the metadata files
            per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()
        self.assertEqual(again.stats()["entries"], count)
        self.assertLess(per_entry, 360, f"{per_entry:.0f} bytes of index per entry")
        # what the index leaves out is read from disk when asked for
        entry = again.get(f"http://127.0.0.1:35683/long.nc.dods?time[5:1:13]")
        self.assertEqual(entry.headers, self.HEADERS)
        self.assertEqual([e.headers for e in again.entries()[:1]], [self.HEADERS])
        again.close()

    def test_a_body_name_the_store_did_not_make_is_kept_whole(self) -> None:
        """The index keeps only the token of a body named KEY-<uuid4 hex>.body; another name
        (a store of an older version, a hand-made entry) is kept whole, and removing the entry
        still removes that body, and the one the index knew if the metadata moved on."""
        root = self.tmp_path()
        s = make(root)
        e = put(s, "http://example.org/a.dods", b"a" * 10)
        odd = e.key + "-Not_A-Uuid.body"
        os.rename(os.path.join(s.root, e.body), os.path.join(s.root, odd))
        meta = json.loads(open(os.path.join(s.root, e.key + ".json"), "rb").read())
        meta["body"] = odd
        with open(os.path.join(s.root, e.key + ".json"), "w") as f:
            json.dump(meta, f)
        s.close()
        again = make(root)
        self.assertEqual(again.get("http://example.org/a.dods", touch=False).body, odd)
        self.assertEqual(again._index[bytes.fromhex(e.key)].body(e.key), odd)
        self.assertEqual(again._index[bytes.fromhex(e.key)].url, "http://example.org/a.dods")  # no dataset: kept for purges
        self.assertTrue(again.remove("http://example.org/a.dods"))
        self.assertFalse(os.path.exists(os.path.join(again.root, odd)))
        self.assertFalse(again.remove("http://example.org/a.dods"))
        # a canonical name: the index keeps an int, and gives the same name back
        f = put(again, "http://example.org/b.dods", b"b" * 10, dataset="dataset-b")
        known = again._index[bytes.fromhex(f.key)]
        self.assertIsInstance(known.token, int)
        self.assertEqual(known.body(f.key), f.body)
        self.assertIsNone(known.url)  # a dataset: purges match it by dataset
        g = put(again, "http://example.org/c.dods", b"c" * 10, dataset="-".join(["dataset", "b"]))  # an equal string, not the same
        self.assertIs(again._index[bytes.fromhex(g.key)].dataset, known.dataset)  # one string per dataset
        self.assertEqual(again.purge(dataset="dataset-b", base_url="http://example.org/"), 2)
        self.assertEqual([n for n in files(again) if n.endswith(".body")], [])
        again.close()

    def test_the_number_of_entries_is_bounded_too(self) -> None:
        now = Now()
        root = str(self.tmp_path() / "cache")
        s = DiskStore(root, 1 << 30, now=now, max_entries=3)
        s.open()
        for i in range(4):
            now.t += 1
            put(s, f"http://example.org/x{i}.dods", b"y" * 10)
        self.assertEqual(s.stats()["entries"], 3)
        self.assertEqual(s.evictions, 1)
        self.assertIsNone(s.get("http://example.org/x0.dods"))  # the least recently used went
        self.assertIsNotNone(s.get("http://example.org/x3.dods"))
        put(s, "http://example.org/x3.dods", b"z" * 10)  # a new version of one held: nothing more goes
        self.assertEqual((s.stats()["entries"], s.evictions), (3, 1))
        s.close()
        again = DiskStore(root, 1 << 30, max_entries=2)
        again.open()  # reopened under a smaller bound: trimmed at once
        self.assertEqual(again.stats()["entries"], 2)
        again.close()


@expand
class DirectWriteTests(FastCase):
    """A large body goes to the disk with O_DIRECT through a reused staging buffer
    (store.DIRECT_STAGE), its last piece through the page cache; where the file
    system refuses O_DIRECT, all of it goes through the page cache, whole."""

    STAGE = 8192

    def setUp(self) -> None:
        self.monkeypatch().setattr(store_module, "DIRECT_STAGE", self.STAGE)
        # each stage written in the writer's thread, where the spy sees it in order
        # (the direct writes in flight, in threads of their own: DirectWritesInFlightTests)
        self.monkeypatch().setattr(store_module, "DIRECT_INFLIGHT", 0)
        self.writes: List[Any] = []
        real_write = os.write

        def spy(fd: int, data: Any) -> int:
            import fcntl
            if os.readlink(f"/proc/self/fd/{fd}") != self.watched:  # the body's file only
                return real_write(fd, data)
            direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & store_module._O_DIRECT)
            if direct and self.refuse_direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            self.writes.append((len(data), direct))
            return real_write(fd, data)

        self.refuse_direct = False
        self.watched = None
        self.monkeypatch().setattr(os, "write", spy)

    def writer(self, s: DiskStore, length: Any) -> Any:
        w = s.writer(URL, status=200, reason="OK", headers=[], length=length)
        self.watched = w.path
        return w

    def direct_or_skip(self, w: Any) -> None:
        if not w.direct:
            w.abort()
            self.skipTest("this file system refuses O_DIRECT")

    def test_a_large_body_goes_direct_in_whole_stages_and_its_tail_through_the_page_cache(self) -> None:
        s = make(self.tmp_path(), max_bytes=1 << 20)
        body = bytes(range(251)) * 100 + b"tail"  # 3 stages and 1,004 bytes
        w = self.writer(s, len(body))
        self.direct_or_skip(w)
        w.write_many([body[i:i + 1000] for i in range(0, 12000, 1000)])
        self.assertEqual(self.writes, [(self.STAGE, True)])
        w.write(body[12000:20000])
        w.write_many([body[20000:]])
        self.assertEqual(self.writes, [(self.STAGE, True)] * 3)
        entry = w.commit()
        self.assertEqual(self.writes, [(self.STAGE, True)] * 3 + [(len(body) - 3 * self.STAGE, False)])
        self.assertEqual((entry.size, body_of(s, URL)), (len(body), body))

    def piped(self, data: bytes, released: List[int], keep_open: bool = False) -> FromPipe:
        """C{data} waiting in a non-blocking pipe, as a spliced body's copy waits."""
        r, w = os.pipe2(os.O_NONBLOCK)
        self.addCleanup(os.close, r)
        os.write(w, data)
        if keep_open:
            self.addCleanup(os.close, w)
        else:
            os.close(w)
        return FromPipe(r, len(data), lambda: released.append(len(data)))

    def test_pieces_waiting_in_pipes_are_read_into_the_stage_in_order_with_bytes_between(self) -> None:
        s = make(self.tmp_path(), max_bytes=1 << 20)
        body = bytes(range(251)) * 100 + b"tail"  # 3 stages and 1,004 bytes
        w = self.writer(s, len(body))
        self.direct_or_skip(w)
        released: List[int] = []
        w.write_many([self.piped(body[:6000], released), body[6000:6100], self.piped(body[6100:20000], released)])
        w.write_many([self.piped(body[20000:], released)])
        entry = w.commit()
        self.assertEqual(self.writes, [(self.STAGE, True)] * 3 + [(len(body) - 3 * self.STAGE, False)])
        self.assertEqual((entry.size, body_of(s, URL)), (len(body), body))
        self.assertEqual(released, [])  # giving a pipe back is its owner's (the cache's tee), not the writer's

    def test_a_pipe_holding_less_than_announced_refuses_the_body(self) -> None:
        s = make(self.tmp_path(), max_bytes=1 << 20)
        for keep_open in (True, False):  # nothing more to read now, or the pipe's writer gone
            w = self.writer(s, 4 * self.STAGE)
            self.direct_or_skip(w)
            short = self.piped(b"x" * 100, [], keep_open=keep_open)
            with self.assertRaises(StoreError):
                w.write_many([FromPipe(short.fd, 200, lambda: None)])  # 200 announced, 100 in the pipe
            self.assertTrue(w.done)
        self.assertIsNone(s.get(URL, touch=False))

    def test_pieces_in_pipes_go_through_the_page_cache_without_direct_writes(self) -> None:
        plain = DiskStore(str(self.tmp_path() / "plain"), 1 << 20, direct=False)
        plain.open()
        body = b"p" * 5000 + b"q" * 5000
        w = self.writer(plain, len(body))
        w.write_many([self.piped(body[:5000], []), self.piped(body[5000:], [])])
        self.assertEqual((w.commit().size, body_of(plain, URL)), (len(body), body))

    def test_a_body_of_unknown_length_goes_direct_too(self) -> None:
        s = make(self.tmp_path(), max_bytes=1 << 20)
        w = self.writer(s, None)
        self.direct_or_skip(w)
        w.write(b"x" * (2 * self.STAGE))
        w.commit()
        self.assertEqual(self.writes, [(self.STAGE, True)] * 2)
        self.assertEqual(body_of(s, URL), b"x" * (2 * self.STAGE))

    def test_a_small_body_and_a_store_without_direct_writes_use_the_page_cache(self) -> None:
        s = make(self.tmp_path())
        w = self.writer(s, self.STAGE - 1)
        self.assertFalse(w.direct)
        w.write(b"s" * (self.STAGE - 1))
        w.commit()
        plain = DiskStore(str(self.tmp_path() / "plain"), 1 << 20, direct=False)
        plain.open()
        w = self.writer(plain, 3 * self.STAGE)
        self.assertFalse(w.direct)
        w.write_many([b"p" * self.STAGE] * 3)
        w.commit()
        self.assertTrue(all(not direct for _, direct in self.writes))
        self.assertEqual(body_of(plain, URL), b"p" * (3 * self.STAGE))
        self.assertEqual(plain._spare_stages, [])

    def test_a_file_system_without_o_direct_gets_the_body_through_the_page_cache(self) -> None:
        import fcntl
        real_fcntl = fcntl.fcntl

        def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
            if cmd == fcntl.F_SETFL and arg & store_module._O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_fcntl(fd, cmd, arg)

        self.monkeypatch().setattr(fcntl, "fcntl", no_direct)
        s = make(self.tmp_path())
        w = self.writer(s, 2 * self.STAGE)
        self.assertFalse(w.direct)
        w.write_many([b"n" * self.STAGE, b"m" * self.STAGE])
        w.commit()
        self.assertEqual(body_of(s, URL), b"n" * self.STAGE + b"m" * self.STAGE)

    def test_a_refused_direct_write_goes_on_through_the_page_cache(self) -> None:
        s = make(self.tmp_path())
        w = self.writer(s, 3 * self.STAGE + 5)
        self.direct_or_skip(w)
        self.refuse_direct = True  # as a file system whose alignment the stage does not meet
        w.write_many([b"a" * self.STAGE, b"b" * self.STAGE])
        w.write(b"c" * (self.STAGE + 5))
        w.commit()
        self.assertEqual(self.writes, [(self.STAGE, False)] * 3 + [(5, False)])
        self.assertEqual(body_of(s, URL), b"a" * self.STAGE + b"b" * self.STAGE + b"c" * (self.STAGE + 5))

    def test_no_staging_buffer_stays_after_a_write_by_default(self) -> None:
        s = make(self.tmp_path())
        w = self.writer(s, None)
        self.direct_or_skip(w)
        stage = w._stage
        w.write(b"d" * (self.STAGE + 1))
        w.commit()
        self.assertTrue(stage.closed)  # its memory is given back to the system
        self.assertEqual(s._spare_stages, [])

    def test_staging_buffers_are_reused_and_at_most_direct_spare_are_kept(self) -> None:
        self.monkeypatch().setattr(store_module, "DIRECT_SPARE", 1)
        s = make(self.tmp_path())
        first, second = self.writer(s, None), self.writer(s, None)
        self.direct_or_skip(first)
        stages = {id(first._stage), id(second._stage)}
        self.assertEqual(len(stages), 2)
        first.write(b"1" * 10)
        first.commit()
        second.write(b"2" * (self.STAGE + 1))
        second.abort()  # an abort gives its stage back too
        self.assertEqual(len(s._spare_stages), store_module.DIRECT_SPARE)
        third = self.writer(s, None)
        self.assertIn(id(third._stage), stages)
        third.abort()
        self.assertEqual([n for n in files(s) if n.startswith(".tmp-")], [])

    def test_a_full_disk_during_a_direct_write_refuses_cleanly(self) -> None:
        s = make(self.tmp_path())
        w = self.writer(s, 4 * self.STAGE)
        self.direct_or_skip(w)
        stage = w._stage
        real_write = os.write

        def full(fd: int, data: Any) -> int:
            if os.readlink(f"/proc/self/fd/{fd}") == self.watched:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        self.monkeypatch().setattr(os, "write", full)
        w.write(b"f" * 10)  # staged: the disk has not seen it yet
        with self.assertRaisesRegex(StoreError, "No space left"):
            w.write_many([b"f" * self.STAGE])
        self.assertTrue(stage.closed)
        self.assertEqual([n for n in files(s) if n.startswith(".tmp-")], [])
        with self.assertRaises(StoreError):
            w.write(b"more")  # a finished writer
        self.assertIsNone(s.get(URL))


class DirectWritesInFlightTests(FastCase):
    """Full stages go to the disk in threads of the store's own, at most
    DIRECT_INFLIGHT of one body at once, each at its own offset: the body is
    whole and in order whatever order they land in; a write that fails is the
    body's failure (nothing stays); one the file system refuses (EINVAL) is
    written again through the page cache."""

    STAGE = 8192

    def setUp(self) -> None:
        self.monkeypatch().setattr(store_module, "DIRECT_STAGE", self.STAGE)
        self.monkeypatch().setattr(store_module, "DIRECT_INFLIGHT", 2)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.offsets: List[int] = []
        self.fail_at: Any = None  # (offset, errno)
        real_pwrite = os.pwrite

        def spy(fd: int, data: Any, offset: int) -> int:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
                self.offsets.append(offset)
            try:
                if self.fail_at is not None and self.fail_at[0] == offset:
                    raise OSError(self.fail_at[1], os.strerror(self.fail_at[1]))
                return real_pwrite(fd, data, offset)
            finally:
                with self.lock:
                    self.running -= 1

        self.monkeypatch().setattr(os, "pwrite", spy)

    def store(self) -> DiskStore:
        s = make(self.tmp_path(), max_bytes=1 << 20)
        self.addCleanup(s.close)
        return s

    def body(self) -> bytes:
        return bytes(range(251)) * 400 + b"tail"  # 12 stages and 2,804 bytes

    def test_a_body_of_many_stages_is_whole_and_in_order(self) -> None:
        s = self.store()
        body = self.body()
        w = s.writer(URL, status=200, reason="OK", headers=[], length=len(body))
        if not w.direct:
            w.abort()
            self.skipTest("this file system refuses O_DIRECT")
        w.write_many([body[i:i + 3000] for i in range(0, len(body), 3000)])
        entry = w.commit()
        self.assertEqual((entry.size, body_of(s, URL)), (len(body), body))
        self.assertEqual(sorted(self.offsets), [i * self.STAGE for i in range(12)])
        self.assertLessEqual(self.most, 2)

    def test_a_direct_write_that_fails_fails_the_body_and_nothing_stays(self) -> None:
        s = self.store()
        body = self.body()
        self.fail_at = (3 * self.STAGE, errno.ENOSPC)
        w = s.writer(URL, status=200, reason="OK", headers=[], length=len(body))
        if not w.direct:
            w.abort()
            self.skipTest("this file system refuses O_DIRECT")
        with self.assertRaises(StoreError):
            w.write_many([body[i:i + 3000] for i in range(0, len(body), 3000)])
            w.commit()
        self.assertTrue(w.done)
        self.assertIsNone(s.get(URL, touch=False))
        self.assertEqual([n for n in os.listdir(s.root) if n.startswith(".tmp-")], [])

    def test_a_direct_write_refused_is_written_again_through_the_page_cache(self) -> None:
        s = self.store()
        body = self.body()
        self.fail_at = (2 * self.STAGE, errno.EINVAL)
        w = s.writer(URL, status=200, reason="OK", headers=[], length=len(body))
        if not w.direct:
            w.abort()
            self.skipTest("this file system refuses O_DIRECT")
        self.fail_at = (2 * self.STAGE, errno.EINVAL)
        calls = {"n": 0}
        real = os.pwrite

        def once(fd: int, data: Any, offset: int) -> int:  # refused the first time only
            if offset == 2 * self.STAGE and calls["n"] == 0:
                calls["n"] += 1
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)

        self.fail_at = None
        self.monkeypatch().setattr(os, "pwrite", once)
        w.write_many([body[i:i + 3000] for i in range(0, len(body), 3000)])
        self.assertFalse(w.direct)  # the rest of the body went through the page cache
        entry = w.commit()
        self.assertEqual((entry.size, body_of(s, URL)), (len(body), body))
