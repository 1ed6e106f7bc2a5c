"""The attribute store on SQLite (in this test's directory), through the
memory:// bus and by direct calls, on a threadless Clock: the same behaviour
either way. tests/ooidx/test_attribute_store.py runs the same on PostgreSQL."""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Dict, Tuple

from twisted.internet import defer

import magnet

from ooidx.attribute_store import (MAX_KEY_BYTES, MAX_PATTERN_LENGTH, AttributeStore, InvalidKey, InvalidPattern,
                                   InvalidValue, literal_prefix, prefix_range)
from ooidx.config import parse

from tests.fast.core.support import ClockCase, cases, expand, on_clock
from tests.support.attribute_store import POSTGRES, VALUES, Stack, error_of


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
    @cases("value", VALUES, ids=range(len(VALUES)))
    @on_clock
    async def test_set_then_get(self, via, value) -> None:
        client = await self.client(via)
        assert await client("set", key="k", value=value) is None
        assert await client("get", key="k") == value

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_get_missing_is_key_error(self, via) -> None:
        client = await self.client(via)
        kind, message = await error_of(client("get", key="dataset:nope"))
        assert kind == "KeyError"
        assert "dataset:nope" in message

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_set_replaces(self, via) -> None:
        client = await self.client(via)
        await client("set", key="a", value=1)
        await client("set", key="a", value={"two": 2})
        assert await client("get", key="a") == {"two": 2}
        assert await client("query", regex="^a$") == {"a": {"two": 2}}

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_delete(self, via) -> None:
        client = await self.client(via)
        await client("set", key="gone", value="soon")
        assert await client("delete", key="gone") is True
        assert await client("delete", key="gone") is False
        assert (await error_of(client("get", key="gone")))[0] == "KeyError"

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_query(self, via) -> None:
        client = await self.client(via)
        data = {"dataset:a": {"n": 1}, "dataset:b.nc": {"n": 2}, "datasets": 3, "stats:a": 4, "dataset;x": 5,
                "Dataset:c": 6, "other:dataset:d": 7}
        for key, value in data.items():
            await client("set", key=key, value=value)
        assert await client("query", regex="^dataset:") == {"dataset:a": {"n": 1}, "dataset:b.nc": {"n": 2}}
        assert await client("query", regex="dataset:") == {k: v for k, v in data.items() if "dataset:" in k}
        assert await client("query", regex="") == data
        assert await client("query", regex=".*") == data
        assert await client("query", regex="^(dataset|stats):a$") == {"dataset:a": {"n": 1}, "stats:a": 4}
        assert await client("query", regex="^datasets?:") == {"dataset:a": {"n": 1}, "dataset:b.nc": {"n": 2}}
        assert await client("query", regex="^dataset:b\\.nc$") == {"dataset:b.nc": {"n": 2}}
        assert await client("query", regex="^dataset:a|^stats") == {"dataset:a": {"n": 1}, "stats:a": 4}
        assert await client("query", regex="(?i)^dataset:[ac]$") == {"dataset:a": {"n": 1}, "Dataset:c": 6}
        assert await client("query", regex="^nothing") == {}

    @cases("regex, why", [
        ("(", "not a valid regular expression"),
        ("[a-", "not a valid regular expression"),
        ("*x", "not a valid regular expression"),
        ("a" * (MAX_PATTERN_LENGTH + 1), "at most"),
        (5, "must be a string"),
        (None, "must be a string"),
    ])
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    @on_clock
    async def test_query_refuses_bad_patterns(self, via, regex, why) -> None:
        client = await self.client(via)
        kind, message = await error_of(client("query", regex=regex))
        assert kind == "InvalidPattern"
        assert why in message

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_pattern_at_the_length_limit_is_fine(self, via) -> None:
        client = await self.client(via)
        await client("set", key="x", value=1)
        assert await client("query", regex="x?" * (MAX_PATTERN_LENGTH // 2)) == {"x": 1}

    @cases("key, why", [
        (5, "must be a string"),
        (None, "must be a string"),
        (["a"], "must be a string"),
        ("", "must not be empty"),
        ("a\x00b", "NUL"),
        ("k" * (MAX_KEY_BYTES + 1), "at most 1024 bytes"),
        ("я" * 513, "at most 1024 bytes"),  # 1026 bytes in UTF-8
        ("huge" * 100_000, "at most 1024 bytes"),
    ])
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    @cases("op", ["get", "set", "delete"])
    @on_clock
    async def test_bad_keys_are_refused(self, via, key, why, op) -> None:
        client = await self.client(via)
        kwargs: Dict[str, Any] = {"key": key}
        if op == "set":
            kwargs["value"] = 1
        kind, message = await error_of(client(op, **kwargs))
        assert kind == "InvalidKey"
        assert why in message

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_keys_at_the_limit_and_unicode_keys(self, via) -> None:
        client = await self.client(via)
        longest = "k" * MAX_KEY_BYTES
        await client("set", key=longest, value="long")
        await client("set", key="я" * 512, value="wide")
        await client("set", key="dataset:海", value="sea")
        assert await client("get", key=longest) == "long"
        assert await client("get", key="я" * 512) == "wide"
        assert await client("query", regex="^dataset:") == {"dataset:海": "sea"}

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_nan_is_not_json(self, via) -> None:
        client = await self.client(via)
        kind, message = await error_of(client("set", key="n", value=float("nan")))
        assert kind == "InvalidValue"
        assert "not JSON" in message
        assert (await error_of(client("get", key="n")))[0] == "KeyError"

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
        client = await self.client(via)
        value = {"blob": "x" * 1_000_000, "list": list(range(10_000))}
        await client("set", key="big", value=value)
        assert await client("get", key="big") == value

    @on_clock
    @cases("via", ["bus", "direct"], ids=["bus", "direct"])
    async def test_many_concurrent_writes(self, via) -> None:
        client = await self.client(via)
        await defer.gatherResults([client("set", key=f"c:{i:03d}", value=i) for i in range(100)], consumeErrors=True)
        found = await client("query", regex="^c:")
        assert found == {f"c:{i:03d}": i for i in range(100)}

    @on_clock
    async def test_restart_keeps_the_data(self) -> None:
        stack = await self.stack()
        await stack.bus.call("attribute_store", "set", key="dataset:sst", value={"url": "http://h/sst.nc"})
        await stack.bus.call("attribute_store", "set", key="gone", value=1)
        await stack.bus.call("attribute_store", "delete", key="gone")
        await stack.store.stopService()
        assert stack.store.backend is None
        await stack.store.start()
        assert await stack.bus.call("attribute_store", "get", key="dataset:sst") == {"url": "http://h/sst.nc"}
        assert await stack.bus.call("attribute_store", "query", regex="") == {"dataset:sst": {"url": "http://h/sst.nc"}}

    @on_clock
    async def test_a_new_component_on_the_same_store_sees_the_data(self) -> None:
        stack = await self.stack()
        await stack.bus.call("attribute_store", "set", key="dataset:sst", value=[1])
        await stack.store.stopService()
        stack.store = stack.make_store()
        await stack.store.start()
        assert await stack.bus.call("attribute_store", "get", key="dataset:sst") == [1]

    @on_clock
    async def test_stopped_store_refuses_direct_calls(self) -> None:
        stack = await self.stack()
        await stack.store.stopService()
        with self.assertRaisesRegex(RuntimeError, "not started"):
            await defer.maybeDeferred(stack.store.get, key="x")
        await stack.store.start()

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
