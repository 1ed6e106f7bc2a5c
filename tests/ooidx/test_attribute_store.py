"""The attribute store on the real PostgreSQL (127.0.0.1:5432, a table of the
test's own), through the memory:// bus and by direct calls. The same tests on
SQLite run in the fast tier, tests/fast/core/test_attribute_store.py."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Tuple

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet

from ooidx.attribute_store import AttributeStore, InvalidKey, InvalidPattern, InvalidValue

from tests.support import attribute_store as checks
from tests.support.attribute_store import POSTGRES, Stack


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


@pytest.mark.parametrize("value", checks.VALUES, ids=range(len(checks.VALUES)))
@pytest_twisted.ensureDeferred
async def test_set_then_get(client: Any, value: Any) -> None:
    await checks.set_then_get(client, value)


@pytest_twisted.ensureDeferred
async def test_get_missing_is_key_error(client: Any) -> None:
    await checks.get_missing_is_key_error(client)


@pytest_twisted.ensureDeferred
async def test_set_replaces(client: Any) -> None:
    await checks.set_replaces(client)


@pytest_twisted.ensureDeferred
async def test_delete(client: Any) -> None:
    await checks.delete(client)


@pytest_twisted.ensureDeferred
async def test_query(client: Any) -> None:
    await checks.query(client)


@pytest.mark.parametrize("regex, why", checks.BAD_PATTERNS)
@pytest_twisted.ensureDeferred
async def test_query_refuses_bad_patterns(client: Any, regex: Any, why: str) -> None:
    await checks.query_refuses_a_bad_pattern(client, regex, why)


@pytest_twisted.ensureDeferred
async def test_pattern_at_the_length_limit_is_fine(client: Any) -> None:
    await checks.pattern_at_the_length_limit_is_fine(client)


@pytest.mark.parametrize("key, why", checks.BAD_KEYS)
@pytest.mark.parametrize("op", ["get", "set", "delete"])
@pytest_twisted.ensureDeferred
async def test_bad_keys_are_refused(client: Any, key: Any, why: str, op: str) -> None:
    await checks.bad_key_is_refused(client, key, why, op)


@pytest_twisted.ensureDeferred
async def test_keys_at_the_limit_and_unicode_keys(client: Any) -> None:
    await checks.keys_at_the_limit_and_unicode_keys(client)


@pytest_twisted.ensureDeferred
async def test_nan_is_not_json(client: Any) -> None:
    await checks.nan_is_not_json(client)


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
    await checks.large_value(client)


@pytest_twisted.ensureDeferred
async def test_many_concurrent_writes(client: Any) -> None:
    await checks.many_concurrent_writes(client)


@pytest_twisted.ensureDeferred
async def test_restart_keeps_the_data(stack: Stack) -> None:
    await checks.restart_keeps_the_data(stack)


@pytest_twisted.ensureDeferred
async def test_a_new_component_on_the_same_store_sees_the_data(stack: Stack) -> None:
    await checks.a_new_component_on_the_same_store_sees_the_data(stack)


@pytest_twisted.ensureDeferred
async def test_stopped_store_refuses_direct_calls(stack: Stack) -> None:
    await checks.stopped_store_refuses_direct_calls(stack)


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
