"""What both runs of the attribute store's tests use: the store on a
memory:// bus (L{Stack}, on SQLite in the fast tier,
tests/fast/core/test_attribute_store.py, and on PostgreSQL in
tests/ooidx/test_attribute_store.py), a client of it over the bus or by
direct calls, the failure of a call as (type, message), the values and bad
input tried, and the checks both runs make (each test of either module is
one of them, on its own runner's parameters)."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Tuple

from twisted.internet import defer

import magnet
from magnet import RemoteError

from ooidx.attribute_store import MAX_KEY_BYTES, MAX_PATTERN_LENGTH, AttributeStore

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
#: op(name, **kwargs) -> Deferred: the store over the bus or by direct calls (L{Stack.client})
Client = Callable[..., defer.Deferred]


class Stack:
    """An attribute store at C{url} (table C{table}) on a memory:// bus of its own, on C{clock}."""

    def __init__(self, clock: Any, url: str, table: str) -> None:
        self.url, self.table, self.clock = url, table, clock
        self.bus = magnet.connect(f"memory://attrs-{uuid.uuid4().hex}", clock, rpc_timeout=10)
        self.store = self.make_store()

    def make_store(self) -> AttributeStore:
        return AttributeStore("attribute_store", self.bus, node="n1", url=self.url, table=self.table, clock=self.clock)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield self.store.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.store.stopService()
        yield self.bus.stopService()

    def client(self, via: str) -> Callable[..., defer.Deferred]:
        """op(name, **kwargs) -> Deferred, over the bus (C{via="bus"}) or straight to the component."""
        if via == "bus":
            def over_bus(op: str, **kwargs: Any) -> defer.Deferred:
                return self.bus.call("attribute_store", op, **kwargs)
            return over_bus

        def direct(op: str, **kwargs: Any) -> defer.Deferred:
            return defer.maybeDeferred(getattr(self.store, op), **kwargs)
        return direct


async def error_of(d: defer.Deferred) -> Tuple[str, str]:
    """(type name, message) of the failure, whether it crossed the bus or not."""
    try:
        result = await d
    except RemoteError as e:
        return e.remote_type, e.message
    except Exception as e:
        return type(e).__name__, str(e)
    raise AssertionError(f"expected a failure, got {result!r}")


VALUES = [
    {"name": "sst", "url": "http://host/opendap/sst.nc", "status": "registered", "size": 0, "refresh": None},
    [1, 2.5, "three", None, True, {"x": []}],
    "plain text",
    "ünïcødé ✓ 海",
    42,
    -1.5e300,
    True,
    None,
    {},
    {"nested": {"deep": {"deeper": [[[]]]}}},
]


# --------------------------------------------------------------------------- #
# the checks both runs make: C{client} is op(name, **kwargs) -> Deferred (Stack.client)

BAD_PATTERNS = [
    ("(", "not a valid regular expression"),
    ("[a-", "not a valid regular expression"),
    ("*x", "not a valid regular expression"),
    ("a" * (MAX_PATTERN_LENGTH + 1), "at most"),
    (5, "must be a string"),
    (None, "must be a string"),
]

BAD_KEYS = [
    (5, "must be a string"),
    (None, "must be a string"),
    (["a"], "must be a string"),
    ("", "must not be empty"),
    ("a\x00b", "NUL"),
    ("k" * (MAX_KEY_BYTES + 1), "at most 1024 bytes"),
    ("я" * 513, "at most 1024 bytes"),  # 1026 bytes in UTF-8
    ("huge" * 100_000, "at most 1024 bytes"),
]


async def set_then_get(client: Client, value: Any) -> None:
    assert await client("set", key="k", value=value) is None
    assert await client("get", key="k") == value


async def get_missing_is_key_error(client: Client) -> None:
    kind, message = await error_of(client("get", key="dataset:nope"))
    assert kind == "KeyError"
    assert "dataset:nope" in message


async def set_replaces(client: Client) -> None:
    await client("set", key="a", value=1)
    await client("set", key="a", value={"two": 2})
    assert await client("get", key="a") == {"two": 2}
    assert await client("query", regex="^a$") == {"a": {"two": 2}}


async def delete(client: Client) -> None:
    await client("set", key="gone", value="soon")
    assert await client("delete", key="gone") is True
    assert await client("delete", key="gone") is False
    assert (await error_of(client("get", key="gone")))[0] == "KeyError"


async def query(client: Client) -> None:
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


async def query_refuses_a_bad_pattern(client: Client, regex: Any, why: str) -> None:
    kind, message = await error_of(client("query", regex=regex))
    assert kind == "InvalidPattern"
    assert why in message


async def pattern_at_the_length_limit_is_fine(client: Client) -> None:
    await client("set", key="x", value=1)
    assert await client("query", regex="x?" * (MAX_PATTERN_LENGTH // 2)) == {"x": 1}


async def bad_key_is_refused(client: Client, key: Any, why: str, op: str) -> None:
    kwargs: Dict[str, Any] = {"key": key}
    if op == "set":
        kwargs["value"] = 1
    kind, message = await error_of(client(op, **kwargs))
    assert kind == "InvalidKey"
    assert why in message


async def keys_at_the_limit_and_unicode_keys(client: Client) -> None:
    longest = "k" * MAX_KEY_BYTES
    await client("set", key=longest, value="long")
    await client("set", key="я" * 512, value="wide")
    await client("set", key="dataset:海", value="sea")
    assert await client("get", key=longest) == "long"
    assert await client("get", key="я" * 512) == "wide"
    assert await client("query", regex="^dataset:") == {"dataset:海": "sea"}


async def nan_is_not_json(client: Client) -> None:
    kind, message = await error_of(client("set", key="n", value=float("nan")))
    assert kind == "InvalidValue"
    assert "not JSON" in message
    assert (await error_of(client("get", key="n")))[0] == "KeyError"


async def large_value(client: Client) -> None:
    value = {"blob": "x" * 1_000_000, "list": list(range(10_000))}
    await client("set", key="big", value=value)
    assert await client("get", key="big") == value


async def many_concurrent_writes(client: Client) -> None:
    await defer.gatherResults([client("set", key=f"c:{i:03d}", value=i) for i in range(100)], consumeErrors=True)
    found = await client("query", regex="^c:")
    assert found == {f"c:{i:03d}": i for i in range(100)}


# the checks on a Stack

async def restart_keeps_the_data(stack: Stack) -> None:
    await stack.bus.call("attribute_store", "set", key="dataset:sst", value={"url": "http://h/sst.nc"})
    await stack.bus.call("attribute_store", "set", key="gone", value=1)
    await stack.bus.call("attribute_store", "delete", key="gone")
    await stack.store.stopService()
    assert stack.store.backend is None
    await stack.store.start()
    assert await stack.bus.call("attribute_store", "get", key="dataset:sst") == {"url": "http://h/sst.nc"}
    assert await stack.bus.call("attribute_store", "query", regex="") == {"dataset:sst": {"url": "http://h/sst.nc"}}


async def a_new_component_on_the_same_store_sees_the_data(stack: Stack) -> None:
    await stack.bus.call("attribute_store", "set", key="dataset:sst", value=[1])
    await stack.store.stopService()
    stack.store = stack.make_store()
    await stack.store.start()
    assert await stack.bus.call("attribute_store", "get", key="dataset:sst") == [1]


async def stopped_store_refuses_direct_calls(stack: Stack) -> None:
    await stack.store.stopService()
    try:
        await defer.maybeDeferred(stack.store.get, key="x")
    except RuntimeError as e:
        assert "not started" in str(e), e
    else:
        raise AssertionError("a stopped store answered a direct call")
    await stack.store.start()
