"""Hostile messages on every queue of a running node: a `twistd -n ooidx`
node with every component on RabbitMQ (a virtual host of this test's own),
and pika publishing what no component would send: random bytes, wrong
content types, missing and odd-typed headers (the op, the attempt count,
stream ids and sequence numbers), huge headers, deeply nested JSON, non-UTF-8,
stream messages for streams nobody opened, replies to nowhere or to a worker
queue. Hypothesis drives the shapes; hand-written cases cover the edges.

What must hold: the node stays up and every component answers ping
afterwards; no queue is left holding a message (each was handled, answered
with an error reply, or dead-lettered, in bounded time); no unhandled error
in the log.
"""
from __future__ import annotations

import json
import subprocess
import time
from typing import Any, Dict, Iterator, List, Optional

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.hostile_node import Node, own_vhost, start_node, stop_node
from tests.reliability.results import record

EXAMPLES = 1000
COMPONENT_QUEUES = ["attribute_store", "cache", "controller", "csv", "fetcher", "persister", "proxyng", "pub_sub",
                    "user_notification", "user_pub_sub"]
FANOUTS = ["notification", "dx.control", "cache.purge"]
PINGED = ["attribute_store", "cache", "controller", "csv", "fetcher", "persister", "proxyng", "pub_sub",
          "user_notification", "user_pub_sub"]
OPS = ["ping", "fetch", "fetch_dataset", "lookup", "purge", "stats", "serve", "register", "list", "get", "route",
       "answer", "get_dataset", "record", "get_stats", "subscribe", "unsubscribe", "publish", "render", "set", "query",
       "delete", "recent", "refresh", "status", "_private", "__init__", "reload"]


@pytest.fixture(scope="module")
def vhost(broker_url: str) -> Iterator[str]:
    url, delete = own_vhost(broker_url, "hostile-msg")
    try:
        yield url
    finally:
        delete()


@pytest.fixture(scope="module")
def node(tmp_path_factory: Any, vhost: str) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("hostile-msg"), "hmsg", broker=vhost,
                   timeouts={"shutdown": 3, "rpc": 10, "heartbeat": 10}, retries={"limit": 2})
    try:
        yield n
    finally:
        stop_node(n)


class Publisher:
    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        self.sent = 0

        self.refused = 0

    def publish(self, exchange: str, key: str, body: bytes, properties: pika.BasicProperties) -> None:
        try:
            self.channel.basic_publish(exchange=exchange, routing_key=key, body=body, properties=properties)
            self.sent += 1
        except pika.exceptions.UnsupportedAMQPFieldException:
            self.refused += 1  # pika cannot encode it
        except (pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError):
            self.refused += 1  # the broker itself refused it (not the node's business)
            self.channel = self.conn.channel()
        except (pika.exceptions.ConnectionClosed, pika.exceptions.StreamLostError):
            self.refused += 1  # e.g. headers larger than the broker's frame_max: it drops the connection
            self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
            self.channel = self.conn.channel()

    def depth(self, queue: str) -> Optional[int]:
        try:
            ok = self.channel.queue_declare(queue=queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.conn.channel()
            return None
        return ok.method.message_count

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


def queues(vhost_url: str) -> List[Dict[str, Any]]:
    from urllib.parse import unquote, urlsplit
    name = unquote(urlsplit(vhost_url).path.lstrip("/")) or "/"
    done = subprocess.run(["rabbitmqctl", "list_queues", "-p", name, "--formatter", "json", "name", "messages",
                           "messages_unacknowledged", "consumers"], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return []


def settle(vhost_url: str, timeout: float = 60.0) -> List[Dict[str, Any]]:
    """Wait until no queue but the dead-letter ones holds a message; return what is left."""
    deadline = time.monotonic() + timeout
    left: List[Dict[str, Any]] = []
    while time.monotonic() < deadline:
        left = [q for q in queues(vhost_url)
                if not (q["name"].endswith(".dead") or q["name"] == "magnet.dead-letters")
                and (q.get("messages") or 0) > 0]
        if not left:
            return []
        time.sleep(1)
    return left


def dead_letters(vhost_url: str) -> int:
    return sum(q.get("messages") or 0 for q in queues(vhost_url)
               if q["name"].endswith(".dead") or q["name"] == "magnet.dead-letters")


# --------------------------------------------------------------------------- #
# what to send

header_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1), st.text(max_size=50),
    st.binary(max_size=50), st.decimals(min_value=-1000, max_value=1000, places=2),
    st.datetimes(min_value=__import__('datetime').datetime(1971, 1, 1)),
    st.lists(st.integers(min_value=-1000, max_value=1000) | st.text(max_size=5), max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(min_value=0, max_value=9) | st.text(max_size=5),
                    max_size=3),
    st.just("x" * 60_000),
)
headers = st.dictionaries(
    st.sampled_from(["op", "x-magnet-attempt", "x-stream", "x-seq", "x-magnet-error", "x-magnet-origin",
                     "x-death", "dataset", "topic"]) | st.text(min_size=1, max_size=20),
    st.one_of(st.sampled_from(OPS), header_values), max_size=6)


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["url", "address", "request_id", "method", "store", "validators", "name", "key", "value",
                         "regex", "pattern", "dataset", "base_url", "status", "reason", "headers", "length",
                         "source", "topic", "event", "details", "email", "webhook", "listeners", "message"])
        | st.text(max_size=8), inner, max_size=6), max_leaves=15).map(lambda v: json.dumps(v).encode())
bodies = st.one_of(
    st.binary(max_size=2000), json_bodies,
    st.sampled_from([deep(100_000), b"{" + b'"a":{' * 50_000 + b"}" * 50_001, b"\xff\xfe\x00{", b"\xc3\x28",
                     b'{"url": "\xff"}', b"{\"url\": \"http://127.0.0.1:1/\", \"address\": \"fetcher\"}",
                     b"\x00" * 100, b"", b"null", b"1e999999", b"NaN", b'"' + b"\\u" * 10 + b'"',
                     b"x" * 3_000_000]),
)
content_types = st.sampled_from([None, "application/json", "application/octet-stream", "text/plain",
                                 "application/json; charset=latin-1", "\x00", "a" * 255])
types = st.sampled_from([None, "call", "reply", "error", "stream-start", "stream-data", "stream-end",
                         "stream-abort", "", "x" * 255])
reply_tos = st.sampled_from([None, "", "nowhere.at.all", "fetcher", "controller", "magnet.dead-letters",
                             "x" * 255])


def properties(content_type: Any, kind: Any, reply_to: Any, hdrs: Dict[str, Any], cid: Any,
               expiration: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=content_type, type=kind, reply_to=reply_to, headers=hdrs,
                                correlation_id=cid, expiration=expiration, delivery_mode=2)


messages = st.builds(
    lambda target, body, ct, kind, rt, hdrs, cid, exp: (target, body, properties(ct, kind, rt, hdrs, cid, exp)),
    st.sampled_from(COMPONENT_QUEUES + FANOUTS), bodies, content_types, types, reply_tos, headers,
    st.none() | st.text(max_size=40).map(lambda s: s.encode("utf-8")[:255].decode("utf-8", "ignore")),
    st.sampled_from([None, "0", "60000"]))


def send(pub: Publisher, target: str, body: bytes, props: pika.BasicProperties) -> None:
    if target in FANOUTS:
        pub.publish(target, "", body, props)
    else:
        pub.publish("", target, body, props)


def check_node(node: Node, vhost: str) -> Dict[str, int]:
    assert node.alive(), node.daemon.describe()
    answers = node.ping_all(PINGED)
    assert all(status == 200 for status in answers.values()), answers
    left = settle(vhost)
    assert not left, f"messages still queued: {left}"
    return answers


# --------------------------------------------------------------------------- #
# tests


def test_handwritten_messages(node: Node, vhost: str) -> None:
    pub = Publisher(vhost)
    before = dead_letters(vhost)
    cases: List[Any] = []
    for q in COMPONENT_QUEUES:
        for body, ct, kind, hdrs, rt in [
            (b"\xff\xfe garbage", None, None, {}, None),
            (b"\xff\xfe garbage", None, "call", {"op": "ping"}, "nowhere"),
            (b"{}", "application/json", "call", {}, None),  # no op
            (b"{}", "application/json", "call", {"op": 42}, None),
            (b"{}", "application/json", "call", {"op": ["ping"]}, None),
            (b"{}", "application/json", "call", {"op": ""}, None),
            (b"{}", "application/json", "call", {"op": "x" * 100_000}, None),
            (b"{}", "text/html", "call", {"op": "ping"}, None),
            (b"[1, 2]", "application/json", "call", {"op": "ping"}, None),
            (b"{\"a\": 1}", "application/json", "call", {"op": "ping"}, None),  # unexpected arguments
            (deep(200_000), "application/json", "call", {"op": "ping"}, None),
            (deep(200_000), "application/json", "call", {"op": "ping"}, "nowhere"),
            (b"{}", "application/json", "call", {"op": "ping", "x-magnet-attempt": "many"}, None),
            (b"{}", "application/json", "call", {"op": "ping", "x-magnet-attempt": -5}, None),
            (b"{}", "application/json", "call", {"op": "ping", "x-magnet-attempt": 2 ** 62}, None),
            (b"{}", "application/json", "call", {"op": "ping"}, q),  # the reply goes to a worker queue
            (b"x" * 8_000_000, "application/octet-stream", "call", {"op": "ping"}, None),
            (b"{}", "application/json", "stream-start", {"x-stream": "s1", "x-seq": "zero"}, None),
            (b"\xff", None, "stream-data", {"x-stream": "nobody", "x-seq": 7}, None),
            (b"", None, "stream-end", {"x-stream": 12}, None),
            (b"{}", "application/json", "error", {}, None),
            (b"{}", "application/json", "reply", {}, None),
        ]:
            cases.append((q, body, pika.BasicProperties(content_type=ct, type=kind, headers=hdrs, reply_to=rt,
                                                        correlation_id="hostile", delivery_mode=2)))
    for fanout in FANOUTS:
        for body in [b"\xff", deep(100_000), b"{}", b'{"topic": 5}', b"null"]:
            cases.append((fanout, body, pika.BasicProperties(content_type="application/json", type="call",
                                                             headers={"op": "purge"})))
    started = time.monotonic()
    for target, body, props in cases:
        send(pub, target, body, props)
    check_node(node, vhost)
    took = time.monotonic() - started
    pub.close()
    dead = dead_letters(vhost) - before
    problems = node.tracebacks()
    assert not problems, problems[:5]
    record("hostile", "messages-handwritten", inputs_tried=len(cases), sent=len(cases), processed=len(cases),
           errors=0, notes=f"{len(COMPONENT_QUEUES)} worker queues + {len(FANOUTS)} fanouts; {dead} dead-lettered; "
                           f"all queues empty and every component answered ping {took:.1f} s after the first send")


def test_fuzzed_messages(node: Node, vhost: str) -> None:
    pub = Publisher(vhost)
    before = dead_letters(vhost)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(messages)
    def run(message: Any) -> None:
        target, body, props = message
        send(pub, target, body, props)
        if pub.sent % 100 == 0:
            assert node.alive(), node.daemon.describe()

    started = time.monotonic()
    run()
    check_node(node, vhost)
    took = time.monotonic() - started
    sent, refused = pub.sent, pub.refused
    pub.close()
    dead = dead_letters(vhost) - before
    problems = node.tracebacks()
    assert not problems, problems[:5]
    record("hostile", "messages-fuzzed", inputs_tried=sent, sent=sent, processed=sent, errors=0,
           notes=f"hypothesis: bodies, content types, types, headers, reply_to on every queue and fanout; "
                 f"{dead} dead-lettered; {refused} refused by the broker itself; settled and pinged {took:.1f} s after the first send")
