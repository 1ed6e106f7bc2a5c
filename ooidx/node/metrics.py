"""The bus's observations as Prometheus metrics, for C{GET /metrics} on the web port.

    observer = PrometheusObserver()
    bus = magnet.connect(url, reactor, observer=observer)
    ...
    body = observer.generate()          # Prometheus text format

Each observer keeps its metrics in a L{CollectorRegistry} of its own (never
prometheus_client's global one), so a process, or a test, can make as many
as it likes.

Names that are made per use (listen addresses, fanout subscription queues,
the RPC reply address) carry a random suffix; they are folded into one label
value each (C{magnet.listen}, C{NAME.sub}) so the number of series stays
bounded however long the daemon runs.

Child processes (``process: child`` components)
-----------------------------------------------

A node's C{/metrics} is served by its web component, in the daemon's
process; the children (L{ooidx.node.child}) count in processes of their own.
They share their counts with the daemon through prometheus_client's
multiprocess mode: the daemon gives every child
C{PROMETHEUS_MULTIPROC_DIR} = C{DATA_DIR/child-metrics/DAEMON_PID} (made
empty at start, removed at a clean stop, left-overs of daemons that are gone
removed at the next start), each child's metrics live in memory-mapped files
there (C{counter_PID.db}, C{histogram_PID.db}, C{gauge_livesum_PID.db}, ...),
and L{ChildMetrics} in the daemon reads them when /metrics is asked for and
adds them to the daemon's own, series by series: the same names, the same
labels (no C{pid} or C{child} label), as if one process had done it all.

Why this and not the daemon scraping each child (over a pipe or a port) and
merging: an increment is in the shared file the moment it happens, so a
child killed with SIGKILL loses nothing (a scrape loses everything since the
last one, and a restarted child starts again from zero), a scrape never
waits on a busy or hung child, and it is what multi-process Python services
(gunicorn, uWSGI) use in production. Where it differs from stock
C{MultiProcessCollector}, to keep its known faults out:

- The daemon itself stays in ordinary (in-memory) mode: its inline
  components count as before, and the children's files are merged into its
  registry's families (so no family appears twice in the exposition).
- When a child exits (SIGTERM, crash, kill -9) its counters and histograms
  are folded into a total kept in the daemon's memory and its files are
  deleted, in one step, before L{ProcessMonitor} restarts it: counters never
  go backwards, a dead child is counted once, and the files on disk are only
  those of the children running now (4 files of 64 KiB each, allocated up
  front so a full disk cannot SIGBUS a child writing into a sparse page;
  a fetcher uses a few KiB of them, and a child that cannot allocate them
  keeps its metrics in memory, out of /metrics, with a warning; past 64 KiB
  prometheus_client grows a file sparsely, as stock mode does). Stock mode
  keeps every dead process's files for ever.
- Gauges are "now" values (C{magnet_inflight} is C{livesum}: the live
  processes' sum; C{ooidx_component_up} is C{livemax}): a dead child's go
  with it.
- Only files of processes this daemon spawned are read, each on its own: a
  corrupt file, or a foreign one, is logged once and left out, and the rest
  is served (stock mode fails the whole scrape).

Without a web component in the daemon nothing of this is set up: the
children count in memory, as before, and nothing is written to disk.

Per-dataset series: L{ooidx.node.dataset_metrics}, added by L{renderer_for}.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger

from magnet.observer import BusObserver

from ooidx.node.dataset_metrics import DATASET_CAP, DATASET_TIMEOUT, DATASET_TTL, OTHER, DatasetMetrics
from ooidx.people.records import QUEUE_PREFIX

__all__ = ["PrometheusObserver", "CONTENT_TYPE", "metric_label", "MAX_NAME_LABELS", "OTHER_NAMES",
           "ChildMetrics", "MULTIPROC_ENV", "renderer_for",
           "DatasetMetrics", "DATASET_CAP", "DATASET_TTL", "DATASET_TIMEOUT", "OTHER",
           "CHILD_METRICS_DIR", "prepare_directory", "share_with_daemon", "pending_families"]

log = Logger(namespace="ooidx.node.metrics")

#: The content type of L{PrometheusObserver.generate}'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: RPC latency buckets, seconds: a local ping to a fetch that runs into its timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: The environment variable that puts prometheus_client in multiprocess mode (read at its import).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Under the data directory: one directory per daemon (its pid) for its children's metrics files.
CHILD_METRICS_DIR = "child-metrics"
#: The files a child makes, allocated up front (bytes each): prometheus_client's own initial size.
FILE_PREFIXES = ("counter", "histogram", "gauge_livesum", "gauge_livemax")
FILE_SIZE = 1 << 16

_GAUGE_MODES = frozenset(Gauge._MULTIPROC_MODES)
_FILE = re.compile(r"(?P<kind>counter|histogram|summary|gauge_(?P<mode>[a-z]+))_(?P<pid>[1-9][0-9]{0,9})\.db\Z")
#: How many distinct bad files are remembered (each is logged once).
_REPORT_LIMIT = 1000

_LISTEN = re.compile(r"magnet\.listen\..*\Z", re.S)
#: A person's queue (user.PERSON.ID): its name says who subscribes, which /metrics (open to all) must not.
_PERSON_QUEUE = re.compile(re.escape(QUEUE_PREFIX) + r".*\Z", re.S)
#: The label value every person's queue is counted under.
PEOPLE_LABEL = QUEUE_PREFIX + "*"
_FANOUT_SUB = re.compile(r"(?P<fanout>.+?)\.sub\..+\.[0-9a-f]{12}\Z", re.S)
#: Distinct bus-name label values one observer gives (after the folding of L{metric_label}); the
#: names first seen after that are all counted under L{OTHER_NAMES}. A pub_sub subscription keeps
#: its own label (C{pubsub.sub.NAME}: which one is unroutable), so without a bound every name ever
#: subscribed stayed a series in memory (about 640 bytes each, per metric) and on /metrics: the
#: soak makes a new one every 20 s (docs/reliability.md#soak).
MAX_NAME_LABELS = 1000
OTHER_NAMES = "other"  # as the datasets past their cap (dataset_metrics.OTHER)


def metric_label(name: str) -> str:
    """The label value for a bus name: per-use names folded into one value,
    and people's queues into one (C{user.*}): names and ids of people are
    shown with the operator token only, never in /metrics."""
    if _LISTEN.match(name):
        return "magnet.listen"
    if _PERSON_QUEUE.match(name):
        return PEOPLE_LABEL
    m = _FANOUT_SUB.match(name)
    if m:
        return m.group("fanout") + ".sub"
    return name


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A metric that cannot be counted (its file in the metrics directory is
    gone, say) is logged, once per observer, and never fails the bus's work."""
    def counted(self: "PrometheusObserver", *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as e:  # noqa: BLE001 - metrics are a side channel
            if not self._failed:
                self._failed = True
                log.error("metrics: {method} could not count ({kind}: {reason}); the bus goes on",
                          method=method.__name__, kind=type(e).__name__, reason=e)
    counted.__name__ = method.__name__
    counted.__doc__ = method.__doc__
    return counted


class PrometheusObserver(BusObserver):
    """A L{BusObserver} that counts what the bus does, in Prometheus metrics."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._sources: List[Any] = []
        self._failed = False
        self._conflicts: Set[str] = set()
        self._names: Set[str] = set()  # the bus-name label values given so far (at most MAX_NAME_LABELS)
        r = self.registry
        self.messages_in = Counter("magnet_messages_in", "Messages delivered to a consumer, by name",
                                   ["name"], registry=r)
        self.messages_out = Counter("magnet_messages_out", "Messages sent, by name", ["name"], registry=r)
        self.rpc_latency_seconds = Histogram("magnet_rpc_latency_seconds", "Time from an RPC call to its outcome",
                                             ["address", "op", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.handler_errors = Counter("magnet_handler_errors", "Handlers that failed, by name", ["name"],
                                      registry=r)
        # multiprocess_mode: how a child's value joins the others (it only matters in a child, see above)
        self.inflight_gauge = Gauge("magnet_inflight", "Handlers running now, by name", ["name"], registry=r,
                                    multiprocess_mode="livesum")
        self.dead_letters = Counter("magnet_dead_letters", "Messages dead-lettered, by the name they came from",
                                    ["name"], registry=r)
        self.unroutable_copies = Counter("magnet_unroutable", "Multicast copies not sent because their address "
                                         "does not exist, by address", ["name"], registry=r)
        self.consumer_restarts = Counter("magnet_consumer_restarts",
                                         "Consumers that consume again after they were lost, by queue and why "
                                         "(reconnect, cancelled, channel_closed, missing)",
                                         ["name", "reason"], registry=r)
        self.component_up_gauge = Gauge("ooidx_component_up", "1 if the component is started on this node",
                                        ["component"], registry=r, multiprocess_mode="livemax")

    # BusObserver ---------------------------------------------------------------

    def _label(self, name: str) -> str:
        """The label value for bus name C{name}: L{metric_label}'s, while fewer than
        L{MAX_NAME_LABELS} were given; past it only those given already, and
        L{OTHER_NAMES} for every new one (a name keeps the value it got first)."""
        label = metric_label(name)
        names = self._names
        if label in names:
            return label
        if len(names) >= MAX_NAME_LABELS:
            return OTHER_NAMES
        names.add(label)
        return label

    @_guarded
    def message_in(self, name: str) -> None:
        self.messages_in.labels(self._label(name)).inc()

    @_guarded
    def message_out(self, name: str) -> None:
        self.messages_out.labels(self._label(name)).inc()

    @_guarded
    def handler_error(self, name: str) -> None:
        self.handler_errors.labels(self._label(name)).inc()

    @_guarded
    def dead_letter(self, name: str) -> None:
        self.dead_letters.labels(self._label(name)).inc()

    @_guarded
    def unroutable(self, name: str) -> None:
        self.unroutable_copies.labels(self._label(name)).inc()

    @_guarded
    def inflight(self, name: str, delta: int) -> None:
        self.inflight_gauge.labels(self._label(name)).inc(delta)

    @_guarded
    def rpc_latency(self, address: str, op: str, seconds: float, outcome: str) -> None:
        self.rpc_latency_seconds.labels(self._label(address), op, outcome).observe(max(0.0, seconds))

    @_guarded
    def consumer_restarted(self, queue: str, reason: str) -> None:
        self.consumer_restarts.labels(self._label(queue), reason).inc()

    @_guarded
    def dead_letter_queue_redeclared(self, name: str) -> None:
        # NAME.dead was gone and declared again: counted with the restarts of NAME's consumers
        self.consumer_restarts.labels(metric_label(name), "dead_letter_queue").inc()

    # the daemon's own ----------------------------------------------------------

    def component_up(self, component: str, up: bool) -> None:
        """Record whether C{component} is started on this node."""
        self.component_up_gauge.labels(component).set(1 if up else 0)

    def components_up(self, components: Mapping[str, bool]) -> None:
        """Record the state of several components at once (from the daemon's health)."""
        for component, up in components.items():
            self.component_up(component, bool(up))

    def include(self, source: Any) -> None:
        """Add C{source.families()} (a L{ChildMetrics}) to what L{collect} and L{generate} give."""
        self._sources.append(source)

    def collect(self) -> List[Metric]:
        """Every metric family: this registry's, with what the included sources add."""
        if not self._sources:
            return list(self.registry.collect())
        families: Dict[str, _Family] = {}
        for metric in self.registry.collect():
            families[metric.name] = _Family.of_metric(metric)
        for source in self._sources:
            try:
                extra = source.families()
            except Exception:  # noqa: BLE001 - the daemon's own metrics are served all the same
                log.failure("metrics: reading {source}", source=source)
                continue
            for family in extra:
                _combine(families, family, self._conflict)
        return [family.metric() for family in families.values()]

    def _conflict(self, name: str) -> None:
        if name not in self._conflicts:
            self._conflicts.add(name)
            log.warn("metrics: the child processes' {family} has another type than the daemon's; "
                     "theirs is left out of /metrics", family=name)

    def generate(self) -> bytes:
        """Every metric, in the Prometheus text format (L{CONTENT_TYPE})."""
        if not self._sources:
            return generate_latest(self.registry)
        return generate_latest(_Collected(self.collect()))


def renderer_for(bus: Any, config: Any = None, *,
                 datasets: Optional[DatasetMetrics] = None) -> Callable[[Mapping[str, bool]], Any]:
    """What the web edge's /metrics calls: C{render(components_up) -> (body,
    content_type)}, from the bus's L{PrometheusObserver} (or, when the bus
    reports to some other observer, from one of its own: what the edge knows).
    The node hands this to the web edge, which never imports this module.

    Given the node's C{config} (or C{datasets}), the per-dataset series are
    added (L{DatasetMetrics}, capped at C{config.http.metrics_datasets}); then
    C{render} fires a Deferred with the same pair when the figures are
    stale and have to be read first."""
    observer = getattr(bus, "observer", None)
    if not isinstance(observer, PrometheusObserver):
        observer = PrometheusObserver()
    content_type = CONTENT_TYPE.encode("ascii")
    if datasets is None and config is not None and getattr(bus, "clock", None) is not None:
        cap = getattr(getattr(config, "http", None), "metrics_datasets", DATASET_CAP)
        datasets = DatasetMetrics(bus, bus.clock, cap=cap if isinstance(cap, int) else DATASET_CAP)

    def generate() -> Tuple[bytes, bytes]:
        families = observer.collect() + pending_families(bus)
        if datasets is not None:
            families += datasets.families()
        return generate_latest(_Collected(families)), content_type

    def render(components_up: Mapping[str, bool]) -> Any:
        if components_up:
            observer.components_up(components_up)
        if datasets is None or datasets.fresh():
            return generate()
        return datasets.refresh().addCallback(lambda _: generate())

    return render


def pending_families(bus: Any) -> List[Metric]:
    """C{magnet_pending{kind}}: what the daemon's bus waits on now (L{magnet.bus.Bus.pending}:
    RPC calls, unconfirmed sends, running handlers, private listen addresses, streams,
    unconfirmed and held publishes). Read when /metrics is asked for, so a Deferred
    that is never settled shows as a number that only grows (what a soak looks for)."""
    pending = getattr(bus, "pending", None)
    if not callable(pending):
        return []
    try:
        figures = pending()
    except Exception:  # noqa: BLE001 - metrics are a side channel
        log.failure("metrics: reading the bus's pending work")
        return []
    family = GaugeMetricFamily("magnet_pending", "What the bus waits on now, by kind (calls, sends, handlers, "
                               "listeners, streams, unconfirmed, held)", labels=["kind"])
    for kind, value in sorted(figures.items()):
        family.add_metric([kind], float(value))
    return [family]


class _Collected:
    """What L{generate_latest} takes: something with C{collect()}."""

    def __init__(self, metrics: List[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> List[Metric]:
        return self._metrics


# --------------------------------------------------------------------------- #
# families, merged sample by sample

LabelKey = Tuple[Tuple[str, str], ...]
SampleKey = Tuple[str, LabelKey]


class _Family:
    """One metric family: its type, help, the gauge's multiprocess mode, its samples."""

    __slots__ = ("name", "type", "help", "unit", "mode", "samples")

    def __init__(self, name: str, typ: str, help: str, unit: str = "", mode: Optional[str] = None) -> None:
        self.name = name
        self.type = typ
        self.help = help
        self.unit = unit
        self.mode = mode
        self.samples: Dict[SampleKey, float] = {}

    @classmethod
    def of_metric(cls, metric: Metric) -> "_Family":
        family = cls(metric.name, metric.type, metric.documentation, metric.unit)
        for s in metric.samples:
            family.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return family

    def copy(self, samples: bool = True) -> "_Family":
        other = _Family(self.name, self.type, self.help, self.unit, self.mode)
        if samples:
            other.samples = dict(self.samples)
        return other

    def metric(self) -> Metric:
        metric = Metric(self.name, self.help, self.type, self.unit)
        for (name, labels), value in self.samples.items():
            metric.add_sample(name, dict(labels), value)
        return metric


def _combine(into: Dict[str, _Family], family: _Family, conflict: Callable[[str], None]) -> None:
    """Add C{family}'s samples to C{into}'s family of that name: counters and
    histograms add up; gauges by their mode (max, min, else the sum)."""
    mine = into.get(family.name)
    if mine is None:
        into[family.name] = family.copy()
        return
    if mine.type != family.type:
        conflict(family.name)
        return
    mode = family.mode or mine.mode or ""
    if mine.mode is None:
        mine.mode = family.mode
    for key, value in family.samples.items():
        have = mine.samples.get(key)
        if have is None:
            mine.samples[key] = value
        elif key[0].endswith("_created"):
            mine.samples[key] = min(have, value)
        elif mine.type == "gauge" and mode.endswith("max"):
            mine.samples[key] = max(have, value)
        elif mine.type == "gauge" and mode.endswith("min"):
            mine.samples[key] = min(have, value)
        else:
            mine.samples[key] = have + value


class BadFile(Exception):
    """A metrics file that cannot be read as one."""


def read_file(path: str, kind: str, mode: Optional[str] = None) -> Dict[str, _Family]:
    """The families in one multiprocess file, histograms made cumulative (with
    C{_count}), as the exposition has them. Raises L{BadFile} (or OSError)."""
    typ = "gauge" if kind.startswith("gauge") else kind
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
    if size < 8:
        return {}  # made a moment ago, nothing in it yet
    try:
        entries = list(MmapedDict.read_all_values_from_file(path))
    except (OSError, EOFError):
        raise
    except Exception as e:  # noqa: BLE001 - struct.error, RuntimeError, UnicodeDecodeError, ...
        raise BadFile(f"{type(e).__name__}: {e}") from None
    families: Dict[str, _Family] = {}
    buckets: Dict[Tuple[str, LabelKey], Dict[float, float]] = {}
    for key, value, _timestamp, _pos in entries:
        try:
            metric_name, sample_name, labels, help_text = json.loads(key)
        except (ValueError, TypeError) as e:
            raise BadFile(f"a key that is not [metric, sample, labels, help]: {key[:80]!r} ({e})") from None
        if not (isinstance(metric_name, str) and isinstance(sample_name, str) and isinstance(help_text, str)
                and isinstance(labels, dict) and sample_name.startswith(metric_name)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
                and isinstance(value, float) and value == value):
            raise BadFile(f"an entry that is not a metric sample: {key[:80]!r} = {value!r}")
        family = families.get(metric_name)
        if family is None:
            family = families[metric_name] = _Family(metric_name, typ, help_text, mode=mode)
        if typ == "histogram" and sample_name == metric_name + "_bucket":
            if "le" not in labels:
                raise BadFile(f"a histogram bucket without 'le': {key[:80]!r}")
            try:
                le = float(labels.pop("le"))
            except ValueError:
                raise BadFile(f"a histogram bucket with a bad 'le': {key[:80]!r}") from None
            buckets.setdefault((metric_name, tuple(sorted(labels.items()))), {})[le] = value
        else:
            family.samples[(sample_name, tuple(sorted(labels.items())))] = value
    for (metric_name, labels_key), by_le in buckets.items():
        family = families[metric_name]
        total = 0.0
        for le in sorted(by_le):
            total += by_le[le]
            with_le = tuple(sorted(labels_key + (("le", floatToGoString(le)),)))
            family.samples[(metric_name + "_bucket", with_le)] = total
        family.samples[(metric_name + "_count", labels_key)] = total
    return families


class ChildMetrics:
    """The daemon's children's metrics, from their files in C{directory}.

    @param live_pids: the pids of the children running now (the daemon's
        L{ProcessMonitor}); a file of a process that is not among them is a
        dead child's.

    Tell it of each child spawned (L{child_started}: files of other pids
    are not read) and of each that exits (L{retire}). L{families} gives the
    families to add to the daemon's own.
    """

    def __init__(self, directory: str, live_pids: Callable[[], Iterable[int]]) -> None:
        self.directory = directory
        self._live_pids = live_pids
        self._ours: Set[int] = set()
        #: Counters and histograms of children that have exited (their files are deleted).
        self._retired: Dict[str, _Family] = {}
        self._reported: Set[Tuple[str, str]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ChildMetrics {self.directory}>"

    def child_started(self, pid: int) -> None:
        self._ours.add(pid)

    def retire(self) -> None:
        """Fold the files of children that have exited into the total kept in memory, and delete them."""
        self._scan()

    def families(self) -> List[_Family]:
        """The children's families: the exited ones' totals, with the running ones' files."""
        return list(self._scan().values())

    def close(self) -> None:
        """After the children stopped: keep their totals, remove the directory."""
        self._scan()
        self._closed = True
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------------------

    def _report(self, name: str, what: str, message: str, **fields: Any) -> None:
        key = (name, what)
        if key in self._reported:
            return
        if len(self._reported) < _REPORT_LIMIT:
            self._reported.add(key)
        log.warn(message, file=os.path.join(self.directory, name), **fields)

    def _conflict(self, name: str) -> Callable[[str], None]:
        return lambda family: self._report(name, "type:" + family,
                                           "metrics file {file}: {family} has another type than elsewhere; "
                                           "left out of /metrics", family=family)

    def _scan(self) -> Dict[str, _Family]:
        out = {name: family.copy() for name, family in self._retired.items()}
        if self._closed:
            return out
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            self._report("", "listdir", "metrics: cannot read the children's directory {file} ({reason}); "
                         "/metrics shows the daemon's own and the exited children's only", reason=e.strerror or e)
            return out
        live = set(self._live_pids())
        left: Set[int] = set()
        for name in names:
            m = _FILE.match(name)
            pid = int(m.group("pid")) if m else None
            mode = m.group("mode") if m else None
            if m is None or pid not in self._ours or (mode is not None and mode not in _GAUGE_MODES):
                self._report(name, "foreign", "metrics: {file} is not a metrics file of this daemon's children; "
                             "ignored")
                continue
            path = os.path.join(self.directory, name)
            alive = pid in live
            try:
                families = read_file(path, m.group("kind"), mode)
            except FileNotFoundError:
                continue
            except (OSError, BadFile) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                if alive:
                    self._report(name, "bad", "metrics file {file} cannot be read ({reason}): left out of "
                                 "/metrics while its process runs", reason=reason)
                    left.add(pid)
                elif self._delete(path, name):
                    self._report(name, "bad, removed", "metrics file {file} of an exited child cannot be read "
                                 "({reason}): its counts are lost; file removed", reason=reason)
                else:
                    left.add(pid)
                continue
            if alive:
                left.add(pid)
                for family in families.values():
                    _combine(out, family, self._conflict(name))
                continue
            # an exited child: counters and histograms stay (in memory), gauges go with it
            kept = [f for f in families.values() if f.type != "gauge"]
            if self._delete(path, name):
                for family in kept:
                    _combine(self._retired, family, self._conflict(name))
            else:
                left.add(pid)  # read again next time, from the file: never counted twice
            for family in kept:
                _combine(out, family, self._conflict(name))
        self._ours -= (self._ours - live - left)  # exited and all files gone: a new child may reuse the pid
        return out

    def _delete(self, path: str, name: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError as e:
            self._report(name, "unlink", "metrics file {file} of an exited child cannot be removed ({reason}); "
                         "it is read where it is", reason=e.strerror or e)
            return False
        return True


# --------------------------------------------------------------------------- #
# set-up: the daemon's directory, a child's files


def prepare_directory(data_dir: str, pid: Optional[int] = None) -> str:
    """C{DATA_DIR/child-metrics/PID}, made empty, for this daemon's children;
    the directories of daemons that are gone are removed. Raises OSError."""
    pid = os.getpid() if pid is None else pid
    root = os.path.join(data_dir, CHILD_METRICS_DIR)
    os.makedirs(root, mode=0o700, exist_ok=True)
    for entry in os.listdir(root):
        if entry.isdigit() and (int(entry) == pid or not _alive(int(entry))):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    path = os.path.join(root, str(pid))
    os.makedirs(path, mode=0o700)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def share_with_daemon() -> Optional[str]:
    """In a child process, before its first metric: if the daemon asked
    (C{PROMETHEUS_MULTIPROC_DIR}), make this process's files there, their
    room allocated on disk now, and return the directory. If that fails
    (the directory is gone, the disk is full) the metrics stay in this
    process's memory, as without a daemon to share with; None."""
    from prometheus_client import values

    directory = os.environ.get(MULTIPROC_ENV)
    if not directory or not getattr(values.ValueClass, "_multiprocess", False):
        return None
    pid = os.getpid()
    made: List[str] = []
    try:
        for prefix in FILE_PREFIXES:
            path = os.path.join(directory, f"{prefix}_{pid}.db")
            flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                made.append(path)
            except FileExistsError:  # an earlier process of this pid's, not removed: counting goes on in it
                fd = os.open(path, flags)
            try:
                _allocate(fd, FILE_SIZE)
            finally:
                os.close(fd)
    except OSError as e:
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
        values.ValueClass = values.MutexValue
        log.warn("metrics of this process cannot be shared with the daemon's /metrics ({reason}); "
                 "they stay in this process", reason=e.strerror or e, file=directory)
        return None
    return directory


def _allocate(fd: int, size: int) -> None:
    """Give the file C{size} bytes of disk, not a sparse hole (a write into
    one on a full disk is SIGBUS for a process that has the file mapped)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except AttributeError:
        pass
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    os.pwrite(fd, bytes(size), 0)
