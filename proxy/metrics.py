"""Prometheus metrics, cheap on the hot path.

Per-frame counts stay plain ints on each relay (no lock, no call per frame); a collector sums the open relays
and the closed totals when /metrics is scraped. Rare events (connects, resets, token usage) go straight into
prometheus_client objects. One registry per app, so several proxies in one process (tests) do not clash.
No ids as labels: labels are directions, outcomes, HTTP statuses and token kinds only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "realtime_proxy"


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
        self.connections_total = 0
        self._closed = [0, 0, 0, 0, 0]  # frames up, frames down, bytes up, bytes down, events held: closed conns
        self._open: set[LiveConnection] = set()
        r.register(self)

    def opened(self, conn: LiveConnection) -> None:
        self.connections_total += 1
        self._open.add(conn)

    def closed(self, conn: LiveConnection) -> None:
        self._open.discard(conn)
        s = conn.stats
        totals = self._closed
        totals[0] += s.frames_up
        totals[1] += s.frames_down
        totals[2] += s.bytes_up
        totals[3] += s.bytes_down
        totals[4] += conn.held_total

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def collect(self) -> Iterator[Metric]:
        sums = list(self._closed)
        held = 0
        for conn in self._open:
            s = conn.stats
            sums[0] += s.frames_up
            sums[1] += s.frames_down
            sums[2] += s.bytes_up
            sums[3] += s.bytes_down
            sums[4] += conn.held_total
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
