"""Prometheus metrics, cheap on the hot path, summed over every worker.

Per-frame counts stay plain ints on each relay (no lock, no call per frame); a collector sums the open relays
and the closed totals when /metrics is scraped. Rare events (connects, resets, token usage) go straight into
prometheus_client objects. One registry per app, so several proxies in one process (tests) do not clash.
No ids as labels: labels are directions, outcomes, HTTP statuses and token kinds only.

With `[listen] workers = N` the parent sets PROMETHEUS_MULTIPROC_DIR before it spawns the workers, and
prometheus_client keeps every value in per-process files there (its multiprocess mode). The per-frame ints
stay as they are; what they gained since the last look is pushed into those files when a connection closes,
every SHARED_SYNC_SECONDS, and by the scraped worker just before it reads them. A scrape of any worker
shows the sum over all of them: exact for closed connections and the scraped worker, at most
SHARED_SYNC_SECONDS behind for frames still flowing on another worker's open connections.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

PREFIX = "realtime_proxy"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch, read when it is imported
SHARED_SYNC_SECONDS = 1.0

# The per-connection counts, in this order: frames up, frames down, bytes up, bytes down, events held.
Counts = list[int]


class LiveStats(Protocol):
    frames_up: int
    frames_down: int
    bytes_up: int
    bytes_down: int


class LiveConnection(Protocol):
    @property
    def stats(self) -> LiveStats: ...

    @property
    def held_count(self) -> int: ...

    @property
    def held_total(self) -> int: ...


def _counts(conn: LiveConnection) -> Counts:
    s = conn.stats
    return [s.frames_up, s.frames_down, s.bytes_up, s.bytes_down, conn.held_total]


class _Shared:
    """The per-connection counts as prometheus_client objects, whose values live in the shared files."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.connections_open = Gauge(
            f"{PREFIX}_connections_open", "Client connections open now.", registry=r, multiprocess_mode="livesum"
        )
        self.held_events = Gauge(
            f"{PREFIX}_held_events",
            "Client events held back by running resets now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Counter(f"{PREFIX}_connections", "Client connections relayed since start.", registry=r)
        frames = Counter(f"{PREFIX}_frames", "Frames relayed, by direction.", ["direction"], registry=r)
        octets = Counter(f"{PREFIX}_bytes", "Payload bytes relayed, by direction.", ["direction"], registry=r)
        held = Counter(f"{PREFIX}_events_held", "Client events held back by resets since start.", registry=r)
        # Same order as Counts.
        self.counters = (
            frames.labels("upstream"),
            frames.labels("downstream"),
            octets.labels("upstream"),
            octets.labels("downstream"),
            held,
        )

    def add(self, now: Counts, before: Counts) -> None:
        for counter, n, b in zip(self.counters, now, before, strict=True):
            if n != b:
                counter.inc(n - b)


class Metrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.upstream_connect_seconds = Histogram(
            f"{PREFIX}_upstream_connect_seconds",
            "Time to open the upstream WebSocket (handshake included).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.upstream_failures = Counter(
            f"{PREFIX}_upstream_connect_failures",
            "Upstream connections that failed, by HTTP status (or 'unreachable').",
            ["status"],
            registry=r,
        )
        self.clients_refused = Counter(
            f"{PREFIX}_clients_refused",
            "Client upgrades refused by the proxy itself, by status.",
            ["status"],
            registry=r,
        )
        self.resets = Counter(
            f"{PREFIX}_resets",
            "Session resets by outcome: completed, partial (some deletes failed), timed_out.",
            ["outcome"],
            registry=r,
        )
        self.reset_seconds = Histogram(
            f"{PREFIX}_reset_duration_seconds",
            "Time from session.reset to its end.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.items_deleted = Counter(f"{PREFIX}_items_deleted", "Items deleted by resets.", registry=r)
        self.events_rejected = Counter(
            f"{PREFIX}_events_rejected", "Client events refused because the held-event limit was reached.", registry=r
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens",
            "Token usage read from response.done, by kind (input, cached, output).",
            ["kind"],
            registry=r,
        )
        for kind in ("input", "cached", "output"):
            self.tokens.labels(kind)
        self.task_input_tokens = Histogram(
            f"{PREFIX}_task_input_tokens",
            "Input tokens per task: summed over the responses between two resets, read when the reset ends.",
            buckets=(100, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000),
            registry=r,
        )
        self.connections_total = 0
        self._closed: Counts = [0, 0, 0, 0, 0]  # what the closed connections counted
        # Open connections, each with what of its counts is already in the shared files (zeros when not shared).
        self._open: dict[LiveConnection, Counts] = {}
        self.shared_dir = os.environ.get(MULTIPROC_DIR_ENV) or None
        self._shared = _Shared(r) if self.shared_dir else None
        if self._shared is None:
            r.register(self)

    def opened(self, conn: LiveConnection) -> None:
        self.connections_total += 1
        self._open[conn] = [0, 0, 0, 0, 0]
        if self._shared is not None:
            self._shared.connections.inc()
            self._shared.connections_open.inc()

    def closed(self, conn: LiveConnection) -> None:
        pushed = self._open.pop(conn, None)
        if pushed is None:
            return
        counts = _counts(conn)
        self._closed = [a + b for a, b in zip(self._closed, counts, strict=True)]
        if self._shared is not None:
            self._shared.add(counts, pushed)
            self._shared.connections_open.dec()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def sync(self) -> None:
        """Shared mode: push what the open connections counted since the last sync into the shared files."""
        if self._shared is None:
            return
        held = 0
        for conn, pushed in self._open.items():
            counts = _counts(conn)
            self._shared.add(counts, pushed)
            pushed[:] = counts
            held += conn.held_count
        self._shared.held_events.set(held)

    def exposition(self) -> bytes:
        """The /metrics body: this process's metrics, or with workers the sum over every worker's files."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        self.sync()
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def collect(self) -> Iterator[Metric]:
        sums = list(self._closed)
        held = 0
        for conn in self._open:
            for i, n in enumerate(_counts(conn)):
                sums[i] += n
            held += conn.held_count
        yield GaugeMetricFamily(f"{PREFIX}_connections_open", "Client connections open now.", value=len(self._open))
        yield CounterMetricFamily(
            f"{PREFIX}_connections", "Client connections relayed since start.", value=self.connections_total
        )
        frames = CounterMetricFamily(f"{PREFIX}_frames", "Frames relayed, by direction.", labels=["direction"])
        frames.add_metric(["upstream"], sums[0])
        frames.add_metric(["downstream"], sums[1])
        yield frames
        octets = CounterMetricFamily(f"{PREFIX}_bytes", "Payload bytes relayed, by direction.", labels=["direction"])
        octets.add_metric(["upstream"], sums[2])
        octets.add_metric(["downstream"], sums[3])
        yield octets
        yield GaugeMetricFamily(f"{PREFIX}_held_events", "Client events held back by running resets now.", value=held)
        yield CounterMetricFamily(
            f"{PREFIX}_events_held", "Client events held back by resets since start.", value=sums[4]
        )
