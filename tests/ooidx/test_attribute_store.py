"""The attribute store on the real PostgreSQL (127.0.0.1:5432, a table of the
test's own), through the memory:// bus and by direct calls. The same tests on
SQLite run in the fast tier, tests/fast/core/test_attribute_store.py."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Tuple

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet

from ooidx.attribute_store import MAX_KEY_BYTES, MAX_PATTERN_LENGTH, AttributeStore, InvalidKey, InvalidPattern, InvalidValue

from tests.support.attribute_store import POSTGRES, VALUES, Stack, error_of


def drop_table(table: str) -> None:
    connection = psycopg2.connect(POSTGRES, connect_timeout=10)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        connection.close()


@pytest.fixture(params=["postgres"])
def backend(request: Any) -> Any:
    """(url, table) of a fresh store; the table is dropped afterwards."""
    table = f"attrs_{uuid.uuid4().hex[:16]}"
    yield POSTGRES, table
    drop_table(table)


@pytest_twisted.async_yield_fixture
async def stack(backend: Tuple[str, str]) -> Any:
    s = Stack(reactor, *backend)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(params=["bus", "direct"])
def client(request: Any, stack: Stack) -> Callable[..., defer.Deferred]:
    """op(name, **kwargs) -> Deferred, over the bus or straight to the component."""
    return stack.client(request.param)


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
@pytest_twisted.ensureDeferred
async def test_set_then_get(client: Any, value: Any) -> None:
    assert await client("set", key="k", value=value) is None
    assert await client("get", key="k") == value


@pytest_twisted.ensureDeferred
async def test_get_missing_is_key_error(client: Any) -> None:
    kind, message = await error_of(client("get", key="dataset:nope"))
    assert kind == "KeyError"
    assert "dataset:nope" in message


@pytest_twisted.ensureDeferred
async def test_set_replaces(client: Any) -> None:
    await client("set", key="a", value=1)
    await client("set", key="a", value={"two": 2})
    assert await client("get", key="a") == {"two": 2}
    assert await client("query", regex="^a$") == {"a": {"two": 2}}


@pytest_twisted.ensureDeferred
async def test_delete(client: Any) -> None:
    await client("set", key="gone", value="soon")
    assert await client("delete", key="gone") is True
    assert await client("delete", key="gone") is False
    assert (await error_of(client("get", key="gone")))[0] == "KeyError"


@pytest_twisted.ensureDeferred
async def test_query(client: Any) -> None:
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


@pytest.mark.parametrize("regex, why", [
    ("(", "not a valid regular expression"),
    ("[a-", "not a valid regular expression"),
    ("*x", "not a valid regular expression"),
    ("a" * (MAX_PATTERN_LENGTH + 1), "at most"),
    (5, "must be a string"),
    (None, "must be a string"),
])
@pytest_twisted.ensureDeferred
async def test_query_refuses_bad_patterns(client: Any, regex: Any, why: str) -> None:
    kind, message = await error_of(client("query", regex=regex))
    assert kind == "InvalidPattern"
    assert why in message


@pytest_twisted.ensureDeferred
async def test_pattern_at_the_length_limit_is_fine(client: Any) -> None:
    await client("set", key="x", value=1)
    assert await client("query", regex="x?" * (MAX_PATTERN_LENGTH // 2)) == {"x": 1}


@pytest.mark.parametrize("key, why", [
    (5, "must be a string"),
    (None, "must be a string"),
    (["a"], "must be a string"),
    ("", "must not be empty"),
    ("a\x00b", "NUL"),
    ("k" * (MAX_KEY_BYTES + 1), "at most 1024 bytes"),
    ("я" * 513, "at most 1024 bytes"),  # 1026 bytes in UTF-8
    ("huge" * 100_000, "at most 1024 bytes"),
])
@pytest.mark.parametrize("op", ["get", "set", "delete"])
@pytest_twisted.ensureDeferred
async def test_bad_keys_are_refused(client: Any, key: Any, why: str, op: str) -> None:
    kwargs: Dict[str, Any] = {"key": key}
    if op == "set":
        kwargs["value"] = 1
    kind, message = await error_of(client(op, **kwargs))
    assert kind == "InvalidKey"
    assert why in message


@pytest_twisted.ensureDeferred
async def test_keys_at_the_limit_and_unicode_keys(client: Any) -> None:
    longest = "k" * MAX_KEY_BYTES
    await client("set", key=longest, value="long")
    await client("set", key="я" * 512, value="wide")
    await client("set", key="dataset:海", value="sea")
    assert await client("get", key=longest) == "long"
    assert await client("get", key="я" * 512) == "wide"
    assert await client("query", regex="^dataset:") == {"dataset:海": "sea"}


@pytest_twisted.ensureDeferred
async def test_nan_is_not_json(client: Any) -> None:
    # the bus's JSON lets NaN through; the store does not keep it
    kind, message = await error_of(client("set", key="n", value=float("nan")))
    assert kind == "InvalidValue"
    assert "not JSON" in message
    assert (await error_of(client("get", key="n")))[0] == "KeyError"


@pytest_twisted.ensureDeferred
async def test_direct_call_with_a_non_json_value(stack: Stack) -> None:
    for value in (object(), {1, 2}, b"bytes", {"k": object()}, "\ud800"):
        with pytest.raises(InvalidValue, match="not JSON|not valid Unicode"):
            await defer.maybeDeferred(stack.store.set, key="obj", value=value)
    with pytest.raises(InvalidKey):
        await defer.maybeDeferred(stack.store.get, key=object())
    with pytest.raises(InvalidPattern):
        await defer.maybeDeferred(stack.store.query, regex=b"^x")


@pytest_twisted.ensureDeferred
async def test_missing_and_unknown_arguments_over_the_bus(stack: Stack) -> None:
    with pytest.raises(magnet.BadArguments):
        await stack.bus.call("attribute_store", "set", key="x")
    with pytest.raises(magnet.BadArguments):
        await stack.bus.call("attribute_store", "get", key="x", extra=1)
    with pytest.raises(magnet.UnknownOperation):
        await stack.bus.call("attribute_store", "drop_table")


@pytest_twisted.ensureDeferred
async def test_large_value(client: Any) -> None:
    value = {"blob": "x" * 1_000_000, "list": list(range(10_000))}
    await client("set", key="big", value=value)
    assert await client("get", key="big") == value


@pytest_twisted.ensureDeferred
async def test_many_concurrent_writes(client: Any) -> None:
    await defer.gatherResults([client("set", key=f"c:{i:03d}", value=i) for i in range(100)], consumeErrors=True)
    found = await client("query", regex="^c:")
    assert found == {f"c:{i:03d}": i for i in range(100)}


@pytest_twisted.ensureDeferred
async def test_restart_keeps_the_data(stack: Stack) -> None:
    await stack.bus.call("attribute_store", "set", key="dataset:sst", value={"url": "http://h/sst.nc"})
    await stack.bus.call("attribute_store", "set", key="gone", value=1)
    await stack.bus.call("attribute_store", "delete", key="gone")
    await stack.store.stopService()
    assert stack.store.backend is None
    await stack.store.start()
    assert await stack.bus.call("attribute_store", "get", key="dataset:sst") == {"url": "http://h/sst.nc"}
    assert await stack.bus.call("attribute_store", "query", regex="") == {"dataset:sst": {"url": "http://h/sst.nc"}}


@pytest_twisted.ensureDeferred
async def test_a_new_component_on_the_same_store_sees_the_data(stack: Stack) -> None:
    await stack.bus.call("attribute_store", "set", key="dataset:sst", value=[1])
    await stack.store.stopService()
    stack.store = stack.make_store()
    await stack.store.start()
    assert await stack.bus.call("attribute_store", "get", key="dataset:sst") == [1]


@pytest_twisted.ensureDeferred
async def test_stopped_store_refuses_direct_calls(stack: Stack) -> None:
    await stack.store.stopService()
    with pytest.raises(RuntimeError, match="not started"):
        await defer.maybeDeferred(stack.store.get, key="x")
    await stack.store.start()


@pytest_twisted.ensureDeferred
async def test_two_instances_compete_on_one_queue(backend: Tuple[str, str]) -> None:
    """instances=2: two consumers of the queue, one database connection pool."""
    bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", reactor, rpc_timeout=10)
    bus.startService()
    store = AttributeStore("attribute_store", bus, node="n1", instances=2, url=backend[0], table=backend[1],
                           clock=reactor)
    await store.start()
    try:
        await defer.gatherResults([bus.call("attribute_store", "set", key=f"i{i}", value=i) for i in range(20)])
        assert len(await bus.call("attribute_store", "query", regex="^i")) == 20
    finally:
        await store.stopService()
        await bus.stopService()


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_postgresql_table() -> None:
    """Several nodes: each its own bus and store component, one PostgreSQL table."""
    table = f"attrs_{uuid.uuid4().hex[:16]}"
    stacks = [Stack(reactor, POSTGRES, table), Stack(reactor, POSTGRES, table)]
    try:
        await defer.gatherResults([s.start() for s in stacks])  # both create the table at once
        await stacks[0].bus.call("attribute_store", "set", key="dataset:a", value={"from": 0})
        assert await stacks[1].bus.call("attribute_store", "get", key="dataset:a") == {"from": 0}
        await stacks[1].bus.call("attribute_store", "set", key="dataset:a", value={"from": 1})
        assert await stacks[0].bus.call("attribute_store", "query", regex="^dataset:") == {"dataset:a": {"from": 1}}
    finally:
        for s in stacks:
            await s.stop()
        drop_table(table)


@pytest_twisted.ensureDeferred
async def test_unreachable_postgresql_fails_the_start() -> None:
    bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", reactor)
    bus.startService()
    store = AttributeStore("attribute_store", bus, node="n1", url="postgresql://postgres@127.0.0.1:1/test",
                           clock=reactor)
    try:
        with pytest.raises(psycopg2.OperationalError):
            await store.start()
        assert store.backend is None and not store.started
    finally:
        await bus.stopService()
