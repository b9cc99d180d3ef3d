"""checkpointd's Prometheus metrics: a small thread-safe registry and the agent's metrics.

Why not ``prometheus_client``: the agent is a fail-over daemon installed on hosts that
run someone else's application; every dependency is one more thing to vet and pin. The
text exposition format 0.0.4 is a few lines of rules, written down here and checked line
by line in tests/unit/test_metrics.py:

- each family is ``# HELP name text`` (``\\`` and newline escaped), ``# TYPE name type``,
  then its samples ``name{label="value",...} number``; label values escape ``\\``, ``"``
  and newline;
- a histogram ``x`` exposes ``x_bucket{le="b"}`` with *cumulative* counts for every bound
  in increasing order, ending with ``le="+Inf"`` (equal to ``x_count``), then ``x_sum``
  and ``x_count``;
- numbers are Go-style: ``+Inf``, ``-Inf``, ``NaN``; whole numbers without a fraction.

Every update takes one lock per family and does O(1) work (a histogram observation is
one ``bisect``), so the commit loop may call them on every round. ``render`` copies each
family under its lock, so a scrape sees every family in a consistent state.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from typing import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Commit latency bounds in seconds: 0.5 ms (one etcd round trip on a LAN) to 2.5 s
#: (beyond the retry timeout; the commit is late enough to matter for the lease).
#: 0.05 is a bound so that "p99 above 50 ms" is measured, not interpolated past.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def format_value(value: float) -> str:
    """A sample value or ``le`` bound as Go's Prometheus client writes it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values)) + "}"


class _Family:
    """One metric family: a name, its help, its label names, and one value per label set."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        if not _METRIC_NAME.match(name):
            raise ValueError(f"{name!r} is not a Prometheus metric name")
        self.name, self.help = name, help
        self.labelnames = tuple(labelnames)
        for label in self.labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: {label!r} is not a label name")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"{name}: a label name is given twice")
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def _key(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        """The label values in declaration order; exactly the declared names, or ValueError
        (a typo in a label name must not silently create a new series)."""
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.labelnames)}")
        try:
            return tuple(str(labels[n]) for n in self.labelnames)
        except KeyError:
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.labelnames)}") from None

    def declare(self, **labels: str) -> None:
        """Expose this label set at 0 before anything happens: a rate() over a series
        that appears only at its first event misses that event."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def samples(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...], float]]:
        """(sample name, label names, label values, value), in a stable order."""
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, self.labelnames, key, v) for key, v in items]


class Counter(_Family):
    """Only ever goes up (a restart resets it to 0; Prometheus' rate() handles that)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def raise_to(self, total: float, **labels: str) -> None:
        """Move up to ``total`` if it is larger: lets a total kept elsewhere (the agent's
        ``counters`` dict) feed this counter without ever counting an event twice."""
        key = self._key(labels)
        with self._lock:
            if total > self._values.get(key, 0.0):
                self._values[key] = float(total)


class Gauge(_Family):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set_only(self, **labels: str) -> None:
        """This label set to 1 and every other one to 0, in one step: a scrape never sees
        two roles at 1 (or none) while the role changes."""
        key = self._key(labels)
        with self._lock:
            for other in self._values:
                self._values[other] = 0.0
            self._values[key] = 1.0


class Histogram(_Family):
    """Observations counted into fixed buckets (no labels: one series per family).

    Counts are kept per bucket and summed into cumulative counts at render time, so an
    observation costs one bisect and one addition."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float] = COMMIT_BUCKETS):
        super().__init__(name, help)
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]):
            bounds.pop()                     # +Inf is always there
        if not bounds or any(math.isnan(b) for b in bounds) or sorted(set(bounds)) != bounds:
            raise ValueError(f"{name}: buckets must be distinct, increasing and not NaN")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            raise ValueError(f"{self.name}: cannot observe NaN")
        i = bisect.bisect_left(self.bounds, value)  # first bound >= value: le is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> tuple[list[int], float, int]:
        """(cumulative count per bound and +Inf, sum, count), taken under the lock."""
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, n

    def value(self, **labels: str) -> float:
        return float(self.snapshot()[2])

    def samples(self):
        cumulative, total, n = self.snapshot()
        out = [(f"{self.name}_bucket", ("le",), (format_value(b),), float(c))
               for b, c in zip(self.bounds + (math.inf,), cumulative)]
        out.append((f"{self.name}_sum", (), (), total))
        out.append((f"{self.name}_count", (), (), float(n)))
        return out


class Registry:
    """The families exposed by one ``/metrics``, in the order they were added."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()

    def add(self, family: _Family) -> _Family:
        with self._lock:
            if family.name in self._families:
                raise ValueError(f"{family.name} is registered twice")
            self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self.add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self.add(Gauge(name, help, labelnames))

    def histogram(self, name: str, help: str, buckets: Iterable[float] = COMMIT_BUCKETS) -> Histogram:
        return self.add(Histogram(name, help, buckets))

    def get(self, name: str) -> _Family:
        return self._families[name]

    def render(self) -> str:
        """The text exposition format 0.0.4, ending with a newline."""
        with self._lock:
            families = list(self._families.values())
        lines = []
        for fam in families:
            lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
            lines.append(f"# TYPE {fam.name} {fam.kind}")
            for name, labelnames, labelvalues, value in fam.samples():
                lines.append(f"{name}{_labels_text(labelnames, labelvalues)} {format_value(value)}")
        return "\n".join(lines) + "\n"


# -- the agent's metrics --------------------------------------------------------------

ROLES = ("primary", "standby", "fenced", "promoting", "demoted", "starting")

#: Why a checkpoint record was refused, as the metric labels it. The store's reasons
#: (checkpointd/store/errors.py REASONS) and resurrect/core.py's map onto these, so that
#: alerts need not know which layer refused.
REFUSAL_REASONS = ("authentication", "epoch", "msl", "bytes", "decode", "pass")
_REFUSAL_ALIASES = {"stale": "msl", "size": "bytes", "format": "decode", "version": "decode"}


def refusal_reason(reason: str) -> str:
    """One of REFUSAL_REASONS, or ``"other"``: label values stay a small fixed set."""
    reason = _REFUSAL_ALIASES.get(reason, reason)
    return reason if reason in REFUSAL_REASONS else "other"


class AgentMetrics:
    """tcpcp's metrics (all named ``tcpcp_*``), with one method per thing the agent does.

    Counters are bumped by the agent where the event happens; gauges that describe the
    agent's state are set from ``Agent.status()`` at scrape time (``update_from_status``),
    so the hot paths never compute them."""

    def __init__(self, registry: Registry | None = None):
        r = self.registry = registry or Registry()
        self.checkpoints = r.counter(
            "tcpcp_checkpoints_total", "Checkpoint records written durably to etcd.")
        self.commit_batches = r.counter(
            "tcpcp_commit_batches_total", "Group-commit etcd transactions that succeeded.")
        self.commit_latency = r.histogram(
            "tcpcp_commit_latency_seconds",
            "Time from a commit queued by an application to durable in etcd.")
        self.records_refused = r.counter(
            "tcpcp_records_refused_total",
            "Checkpoint records not sealed or not resurrected, by reason.", ("reason",))
        self.gate_commits = r.counter(
            "tcpcp_gate_commits_total", "ACK gate raises after a durable checkpoint.")
        self.gate_full = r.counter(
            "tcpcp_gate_full_total",
            "Connections left unprotected because the ACK gate's map was full.")
        self.resurrections = r.counter(
            "tcpcp_resurrections_total", "Connections resurrected from checkpoints.")
        self.resurrection_failures = r.counter(
            "tcpcp_resurrection_failures_total",
            "Checkpointed connections that could not be resurrected, by reason.", ("reason",))
        self.passed = r.counter(
            "tcpcp_passed_total", "Connections passed live by switchovers, by direction "
            "(out: from this host, in: activated here).", ("direction",))
        self.fences = r.counter(
            "tcpcp_fences_total", "Times this agent silenced its connections (lease not renewed).")
        self.role_changes = r.counter(
            "tcpcp_role_changes_total", "HA role transitions seen by this agent.")
        self.role = r.gauge(
            "tcpcp_role", "1 for the agent's current HA role, 0 for the others.", ("role",))
        self.connections_protected = r.gauge(
            "tcpcp_connections_protected", "Registered connections guarded by the ACK gate.")
        self.connections_unprotected = r.gauge(
            "tcpcp_connections_unprotected",
            "Registered connections without the ACK gate (input may be lost on fail-over).")
        self.last_checkpoint_age_max = r.gauge(
            "tcpcp_last_checkpoint_age_max_seconds",
            "Age of the oldest connection's newest durable checkpoint.")
        self.etcd_errors = r.counter(
            "tcpcp_etcd_errors_total", "etcd requests that failed or timed out.")
        for reason in REFUSAL_REASONS:
            self.records_refused.declare(reason=reason)
        for role in ROLES:
            self.role.declare(role=role)
        self._role: str | None = None
        self._role_lock = threading.Lock()

    # -- called by the agent where things happen -------------------------------------
    def observe_commit(self, seconds: float) -> None:
        """One commit's latency: queued by the application -> durable in etcd."""
        self.commit_latency.observe(max(0.0, seconds))

    def checkpoints_written(self, n: int = 1, batches: int = 1) -> None:
        if batches:
            self.commit_batches.inc(batches)
        if n:
            self.checkpoints.inc(n)

    def record_refused(self, reason: str, n: int = 1) -> None:
        self.records_refused.inc(n, reason=refusal_reason(reason))

    def resurrection_failed(self, reason: str, n: int = 1) -> None:
        """``reason``: a short fixed word (``probe``, ``resume``, ``restore``), never the
        error text (label values must stay few)."""
        self.resurrection_failures.inc(n, reason=reason)

    def set_role(self, role: str) -> None:
        with self._role_lock:
            if role == self._role:
                return
            if self._role is not None:
                self.role_changes.inc()
            self._role = role
            self.role.set_only(role=role)

    def set_connections(self, protected: int, unprotected: int) -> None:
        self.connections_protected.set(protected)
        self.connections_unprotected.set(unprotected)

    # -- called at scrape time -------------------------------------------------------
    def update_from_status(self, status: Mapping) -> None:
        """Set the gauges from a dict shaped like ``Agent.status()``.

        Reads ``role`` and ``fenced`` (a fenced primary is reported as ``fenced``);
        ``counters`` (``checkpoints``, ``commit_batches``, ``resurrected``, ``fenced``)
        raise the matching counters to the agent's totals, so an agent that bumps only its
        dict still exposes them, and one that bumps both is not counted twice; and, when
        present, ``connections_protected``, ``connections_unprotected`` and
        ``last_checkpoint_age_max`` (seconds). Missing keys leave their metric alone."""
        role = status.get("role")
        if role is not None:
            self.set_role("fenced" if status.get("fenced") and role == "primary" else str(role))
        counters = status.get("counters") or {}
        for key, counter in (("checkpoints", self.checkpoints),
                             ("commit_batches", self.commit_batches),
                             ("resurrected", self.resurrections),
                             ("fenced", self.fences)):
            if isinstance(counters.get(key), (int, float)):
                counter.raise_to(counters[key])
        for key, direction in (("passed_out", "out"), ("passed_in", "in")):
            if isinstance(counters.get(key), (int, float)):
                self.passed.raise_to(counters[key], direction=direction)
        if "connections_protected" in status or "connections_unprotected" in status:
            self.set_connections(status.get("connections_protected", 0),
                                 status.get("connections_unprotected", 0))
        age = status.get("last_checkpoint_age_max")
        if isinstance(age, (int, float)):
            self.last_checkpoint_age_max.set(age)

    def render(self) -> str:
        return self.registry.render()
