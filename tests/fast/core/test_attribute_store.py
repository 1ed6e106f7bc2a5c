"""The attribute store on SQLite (in this test's directory), through the
memory:// bus and by direct calls, on a threadless Clock: the same behaviour
either way. tests/ooidx/test_attribute_store.py runs the same on PostgreSQL."""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Tuple

from twisted.internet import defer

import magnet

from ooidx.attribute_store import AttributeStore, InvalidKey, InvalidPattern, InvalidValue, literal_prefix, prefix_range
from ooidx.config import parse

from tests.fast.core.support import ClockCase, cases, expand, on_clock
from tests.support import attribute_store as checks
from tests.support.attribute_store import POSTGRES, Stack


@expand
class AttributeStoreTests(ClockCase):
    """On SQLite (the PostgreSQL runs stay in tests/ooidx/test_attribute_store.py)."""

    def backend(self) -> Tuple[str, str]:
        """(url, table) of a fresh SQLite store of this test's own."""
        if "_backend" not in self.__dict__:
            self.__dict__["_backend"] = (str(self.shared_tmp() / "data" / "attributes.sqlite3"),
                                         f"attrs_{uuid.uuid4().hex[:16]}")
        return self.__dict__["_backend"]

    def shared_tmp(self) -> Any:
        if "_tmp" not in self.__dict__:
            self.__dict__["_tmp"] = self.tmp_path()
        return self.__dict__["_tmp"]

    async def stack(self) -> Stack:
        if "_stack" not in self.__dict__:
            s = Stack(self.clock, *self.backend())
            await s.start()
            self.addCleanup(lambda: self.wait(s.stop()))
            self.__dict__["_stack"] = s
        return self.__dict__["_stack"]

    async def client(self, via: str) -> Callable[..., defer.Deferred]:
        """op(name, **kwargs) -> Deferred, over the bus or straight to the component."""
        return (await self.stack()).client(via)

    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    @cases("value", checks.VALUES, ids=range(len(checks.VALUES)))
    @on_clock
    async def test_set_then_get(self, via, value) -> None:
        await checks.set_then_get(await self.client(via), value)

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_get_missing_is_key_error(self, via) -> None:
        await checks.get_missing_is_key_error(await self.client(via))

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_set_replaces(self, via) -> None:
        await checks.set_replaces(await self.client(via))

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_delete(self, via) -> None:
        await checks.delete(await self.client(via))

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_query(self, via) -> None:
        await checks.query(await self.client(via))

    @cases("regex, why", checks.BAD_PATTERNS)
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    @on_clock
    async def test_query_refuses_bad_patterns(self, via, regex, why) -> None:
        await checks.query_refuses_a_bad_pattern(await self.client(via), regex, why)

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_pattern_at_the_length_limit_is_fine(self, via) -> None:
        await checks.pattern_at_the_length_limit_is_fine(await self.client(via))

    @cases("key, why", checks.BAD_KEYS)
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    @cases("op", ["get", "set", "delete"])
    @on_clock
    async def test_bad_keys_are_refused(self, via, key, why, op) -> None:
        await checks.bad_key_is_refused(await self.client(via), key, why, op)

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_keys_at_the_limit_and_unicode_keys(self, via) -> None:
        await checks.keys_at_the_limit_and_unicode_keys(await self.client(via))

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_nan_is_not_json(self, via) -> None:
        await checks.nan_is_not_json(await self.client(via))

    @on_clock
    async def test_direct_call_with_a_non_json_value(self) -> None:
        stack = await self.stack()
        for value in (object(), {1, 2}, b"bytes", {"k": object()}, "\ud800"):
            with self.assertRaisesRegex(InvalidValue, "not JSON|not valid Unicode"):
                await defer.maybeDeferred(stack.store.set, key="obj", value=value)
        with self.assertRaises(InvalidKey):
            await defer.maybeDeferred(stack.store.get, key=object())
        with self.assertRaises(InvalidPattern):
            await defer.maybeDeferred(stack.store.query, regex=b"^x")

    @on_clock
    async def test_missing_and_unknown_arguments_over_the_bus(self) -> None:
        stack = await self.stack()
        with self.assertRaises(magnet.BadArguments):
            await stack.bus.call("attribute_store", "set", key="x")
        with self.assertRaises(magnet.BadArguments):
            await stack.bus.call("attribute_store", "get", key="x", extra=1)
        with self.assertRaises(magnet.UnknownOperation):
            await stack.bus.call("attribute_store", "drop_table")

    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    @on_clock
    async def test_large_value(self, via) -> None:
        await checks.large_value(await self.client(via))

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_many_concurrent_writes(self, via) -> None:
        await checks.many_concurrent_writes(await self.client(via))

    @on_clock
    async def test_restart_keeps_the_data(self) -> None:
        await checks.restart_keeps_the_data(await self.stack())

    @on_clock
    async def test_a_new_component_on_the_same_store_sees_the_data(self) -> None:
        await checks.a_new_component_on_the_same_store_sees_the_data(await self.stack())

    @on_clock
    async def test_stopped_store_refuses_direct_calls(self) -> None:
        await checks.stopped_store_refuses_direct_calls(await self.stack())

    @on_clock
    async def test_two_instances_compete_on_one_queue(self) -> None:
        """instances=2: two consumers of the queue, one database connection pool."""
        backend = self.backend()
        bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", self.clock, rpc_timeout=10)
        bus.startService()
        store = AttributeStore("attribute_store", bus, node="n1", instances=2, url=backend[0], table=backend[1],
                               clock=self.clock)
        await store.start()
        try:
            await defer.gatherResults([bus.call("attribute_store", "set", key=f"i{i}", value=i) for i in range(20)])
            assert len(await bus.call("attribute_store", "query", regex="^i")) == 20
        finally:
            await store.stopService()
            await bus.stopService()

    def test_url_from_the_config(self) -> None:
        tmp_path = self.tmp_path()
        bus = magnet.connect("memory://attrs-config", self.clock)
        config = parse("data_dir: var\ncomponents:\n  attribute_store: {}\n", str(tmp_path / "dx.yaml"))
        store = AttributeStore.from_config("attribute_store", bus, config, node="n1", clock=self.clock)
        assert store.url == os.path.join(str(tmp_path), "var", "attributes.sqlite3")
        config = parse(f"components:\n  attribute_store: {{url: '{POSTGRES}'}}\n", str(tmp_path / "dx.yaml"))
        assert AttributeStore.from_config("attribute_store", bus, config, node="n1").url == POSTGRES

    @on_clock
    async def test_the_daemons_way_of_constructing_it(self) -> None:
        """cls(name, bus, node=, instances=, config=, clock=) then start(): the file lands in data_dir."""
        tmp_path = self.tmp_path()
        bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", self.clock)
        bus.startService()
        config = parse("data_dir: var\n", str(tmp_path / "dx.yaml"))
        store = AttributeStore.from_config("attribute_store", bus, config, node="n1", instances=1, clock=self.clock)
        await store.start()
        try:
            await bus.call("attribute_store", "set", key="k", value="v")
            assert (tmp_path / "var" / "attributes.sqlite3").exists()
        finally:
            await store.stopService()
            await bus.stopService()

    @cases("regex, prefix", [
        ("^dataset:", "dataset:"),
        ("dataset:", ""),
        ("^datasets?:", "dataset"),
        ("^data.set", "data"),
        ("^dataset:a|^stats", ""),
        ("^(dataset|stats):", ""),
        ("^dataset:b\\.nc", "dataset:b"),
        ("^ab*", "a"),
        ("^ab{2}", "a"),
        ("^a[bc]", "a"),
        ("^", ""),
        ("", ""),
    ])
    def test_literal_prefix(self, regex, prefix) -> None:
        assert literal_prefix(regex) == prefix

    def test_prefix_range(self) -> None:
        assert prefix_range("dataset:") == ("dataset:", "dataset;")
        assert prefix_range("") is None
        assert prefix_range("a\U0010ffff") is None


class AttributeStoreEdgeTests(ClockCase):
    def test_keys_and_values_that_are_not_valid_unicode_or_too_deep(self) -> None:
        from ooidx.attribute_store import check_key, encode_value

        with self.assertRaises(InvalidKey) as e:
            check_key("a\ud800")
        assert "no lone surrogates" in str(e.exception)
        with self.assertRaises(InvalidValue) as e:
            encode_value("\udfff")
        assert "not valid Unicode" in str(e.exception)
        deep: Any = []
        for _ in range(100_000):
            deep = [deep]
        with self.assertRaises(InvalidValue) as e:
            encode_value(deep)
        assert "nested too deeply" in str(e.exception)

    def test_backends(self) -> None:
        from ooidx.attribute_store import Backend, PostgresBackend, SQLiteBackend, open_backend

        with self.assertRaises(ValueError):
            open_backend("/x.sqlite3", "no such table; --", self.clock)
        pg = open_backend("postgresql://dx:secret@db:5432/dx", "attrs", self.clock)
        assert isinstance(pg, PostgresBackend) and pg.describe() == "postgresql://dx:***@db:5432/dx"
        assert 'COLLATE "C"' in pg.create_sql() and "%s" in pg.upsert_sql()
        assert isinstance(open_backend("/x.sqlite3", "attrs", self.clock), SQLiteBackend)
        base = Backend("attrs", self.clock)
        for method in (base.describe, base.make_pool, base.create_sql):
            with self.assertRaises(NotImplementedError):
                method()
        with self.assertRaises(RuntimeError):
            base._pool()

    def test_a_store_needs_a_url_or_a_config(self) -> None:
        bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", self.clock)
        with self.assertRaises(TypeError) as e:
            AttributeStore("attribute_store", bus, node="n1")  # type: ignore[call-arg]
        assert "url" in str(e.exception)

    @on_clock
    async def test_a_database_that_cannot_be_opened_fails_the_start(self) -> None:
        tmp_path = self.tmp_path()
        (tmp_path / "blocked").write_text("a file where a directory should be")
        bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", self.clock)
        bus.startService()
        store = AttributeStore("attribute_store", bus, node="n1", url=str(tmp_path / "blocked" / "a.sqlite3"),
                               clock=self.clock)
        try:
            with self.assertRaises(OSError) as e:  # making its directory: a file is in the way
                await store.start()
            assert e.exception.filename == str(tmp_path / "blocked")
            assert store.backend is None and not store.started
        finally:
            await bus.stopService()
