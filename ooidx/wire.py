"""Every name that crosses the bus or the store: the one component table,
addresses, message types, headers and record keys.

Two components agree on a name only through this module. A name spelled
twice drifts (it did: two hop-by-hop lists that differed, three spellings of
the dataset record key), so a module that sends, receives or stores under a
name imports it from here. This module imports nothing of ooidx and nothing
of magnet but its two pattern names: anything may import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from magnet.bus import FANOUT, WORKER

__all__ = [
    "ComponentSpec", "COMPONENTS", "COMPONENT_NAMES", "LISTENING", "BUS_TABLE", "OPERATIONS_SUFFIX",
    "operations_address",
    "CONTROL_FANOUT", "CACHE_PURGE_FANOUT", "NOTIFICATION", "NOTIFICATION_API", "PUBSUB_CHANGED",
    "PUBSUB_TOPICS", "PUBSUB_TOPIC_PREFIX", "TOPIC_BINDING_KEY",
    "SUBSCRIBER_PREFIX", "USER_EVENTS_QUEUE", "USER_SUBSCRIPTIONS_CHANGED",
    "STATUS", "STATUS_REPLY", "PUBLICATION", "EVENT",
    "TOPIC_HEADER", "ADDRESSES_HEADER", "ID_HEADER", "RETIRED_COMPONENTS",
    "DATASET_KEY", "STATS_KEY", "SUBSCRIPTION_KEY", "PERSON_KEY", "USER_SUBSCRIPTION_KEY",
    "WEBHOOK_LOG_KEY", "dataset_key", "stats_key", "HOP_BY_HOP", "HOP_BY_HOP_BYTES", "SPLICED",
]


# The component table --------------------------------------------------------------

@dataclass(frozen=True)
class ComponentSpec:
    """One DX component: how it meets the bus and which class runs it.

    C{pattern} is L{magnet.bus.WORKER} (it serves operations on a worker
    queue of its name, with competing consumers), L{magnet.bus.FANOUT} (every
    instance gets every message sent to its name) or C{None} (an edge with no
    queue of its own). C{implementation} is C{"module:Class"}, imported only
    when a node runs it, so a node that runs the cache never imports the web
    page. C{listens} says it owns a TCP port (so one instance per node).
    """

    name: str
    pattern: Optional[str]
    implementation: str
    listens: bool = False


#: THE component table: every DX component, in a stable (alphabetical) order.
#: The config's known names, the topology every node declares, the operator
#: API's callable services and the class each node starts all come from here.
COMPONENTS: Tuple[ComponentSpec, ...] = (
    ComponentSpec("attribute_store", WORKER, "ooidx.attribute_store:AttributeStore"),
    ComponentSpec("cache", WORKER, "ooidx.datapath.cache:Cache"),
    ComponentSpec("controller", WORKER, "ooidx.datapath.controller:Controller"),
    ComponentSpec("csv", WORKER, "ooidx.datapath.csv:CSV"),
    ComponentSpec("fetcher", WORKER, "ooidx.datapath.fetcher:Fetcher"),
    ComponentSpec("notification", FANOUT, "ooidx.dissemination.notification:Notification"),
    ComponentSpec("persister", WORKER, "ooidx.dissemination.persister:Persister"),
    ComponentSpec("proxyng", WORKER, "ooidx.datapath.proxy:Proxy", listens=True),
    ComponentSpec("pub_sub", WORKER, "ooidx.dissemination.pub_sub:PubSub"),
    ComponentSpec("user_notification", WORKER, "ooidx.people.user_notification:UserNotification"),
    ComponentSpec("user_pub_sub", WORKER, "ooidx.people.user_pub_sub:UserPubSub"),
    ComponentSpec("web", None, "ooidx.web.app:Web", listens=True),
)

#: Components that are no more, and what took their place: a config may still
#: name them (with a warning, and nothing runs).
RETIRED_COMPONENTS: Dict[str, str] = {
    "distributor": "pub_sub delivers to its subscribers itself, in one multicast per publication "
                   "(magnet's Bus.multicast); remove 'distributor' from 'components'",
}

#: name -> spec.
BY_NAME: Dict[str, ComponentSpec] = {spec.name: spec for spec in COMPONENTS}
#: Every component name a node can run.
COMPONENT_NAMES: Tuple[str, ...] = tuple(spec.name for spec in COMPONENTS)
#: Components that listen on a TCP port (one instance per node).
LISTENING: Tuple[str, ...] = tuple(spec.name for spec in COMPONENTS if spec.listens)
#: name -> pattern, for the components that meet the bus (the edge "web" does not).
BUS_TABLE: Dict[str, str] = {spec.name: spec.pattern for spec in COMPONENTS if spec.pattern is not None}
#: A fanout takes no calls (a call has one answer, a fanout many receivers), so a
#: fanout component serves its operations (C{ping} ...) on a worker queue of
#: its own, its name and this suffix: C{notification.ops}.
OPERATIONS_SUFFIX = ".ops"


def operations_address(name: str) -> str:
    """Where a call to component C{name}'s operations goes: its worker queue,
    or for a fanout component its C{NAME.ops} queue."""
    return name + OPERATIONS_SUFFIX if BUS_TABLE.get(name) == FANOUT else name


# Addresses --------------------------------------------------------------------------

#: The fanout every daemon listens on for operator-wide requests (status).
CONTROL_FANOUT = "dx.control"
#: The fanout the caches (and the proxies' hot answers) hear purges on.
CACHE_PURGE_FANOUT = "cache.purge"
#: The fanout every event goes to (the notification component's name).
NOTIFICATION = "notification"
#: The worker queue of the notification component's API (its event tail).
NOTIFICATION_API = "notification.api"
#: The fanout pub_sub tells its instances about changed subscriptions on.
PUBSUB_CHANGED = "pubsub.changed"
#: The prefix of a pub_sub subscriber's own queue.
SUBSCRIBER_PREFIX = "pubsub.sub."
#: The direct exchange publications go to with their topic as routing key
#: (ooidx.dissemination.publisher, and pub_sub's own publish): each topic
#: pub_sub has bound routes to its own fanout (PUBSUB_TOPIC_PREFIX + hash),
#: bound to the address of every subscription matching the topic.
PUBSUB_TOPICS = "pubsub.topics"
#: The prefix of a bound topic's own fanout exchange (then the SHA-1 of the topic, hex).
PUBSUB_TOPIC_PREFIX = "pubsub.topic."
#: The queue user_notification takes events from.
USER_EVENTS_QUEUE = "user_notification.events"
#: The fanout people's subscription changes go out on.
USER_SUBSCRIPTIONS_CHANGED = "user_subscriptions.changed"


# Message types ---------------------------------------------------------------------

#: An operator-wide status request on the control fanout, and its reply.
STATUS = "status"
STATUS_REPLY = "status.reply"
#: A dataset (or part of one) published to subscribers.
PUBLICATION = "publication"
#: An event (registered, fetched, cached, purged, saved, failed, refreshed).
EVENT = "event"


# Headers ---------------------------------------------------------------------------

#: The topic of a publication or an event (what subscriptions match).
TOPIC_HEADER = "topic"
#: The addresses a dead-lettered publication did not reach (pub_sub.dead).
ADDRESSES_HEADER = "addresses"
#: The id of a message queued for a person.
ID_HEADER = "x-ooidx-id"


# Record keys in the attribute store --------------------------------------------------

DATASET_KEY = "dataset:"
STATS_KEY = "stats:"
SUBSCRIPTION_KEY = "subscription:"
#: A topic pub_sub has bound on PUBSUB_TOPICS: TOPIC_BINDING_KEY + SHA-1 of the topic (hex), {"topic"}.
TOPIC_BINDING_KEY = "pubsub_topic:"
PERSON_KEY = "person:"
USER_SUBSCRIPTION_KEY = "user_subscription:"
#: A webhook subscription's delivery log: WEBHOOK_LOG_KEY + PERSON:ID (ooidx.people.component).
WEBHOOK_LOG_KEY = "webhook_log:"


def dataset_key(name: str) -> str:
    """The attribute store key of dataset C{name}'s record."""
    return DATASET_KEY + name


def stats_key(name: str) -> str:
    """The attribute store key of dataset C{name}'s request counters."""
    return STATS_KEY + name


# HTTP ----------------------------------------------------------------------------

#: Headers that concern one connection only, never passed on (RFC 9110 section
#: 7.6.1, with the legacy Proxy-Connection and the misspelled Trailers).
#: In an answer stream's start metadata: the body does not follow as chunks; the
#: fetch moves it to the client's socket itself (ooidx.datapath.splice, one process).
SPLICED = "spliced"

HOP_BY_HOP: FrozenSet[str] = frozenset((
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "trailers", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization"))
HOP_BY_HOP_BYTES: FrozenSet[bytes] = frozenset(name.encode("ascii") for name in HOP_BY_HOP)
