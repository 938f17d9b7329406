"""Probes into a running proxy for the fault and hostile-input tests: resources, relays, and quiet points."""

from __future__ import annotations

import asyncio
import gc
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.core.session import Session
from proxy.relay import Relay
from proxy.server import ProxyServer
from proxy.wire import Upstream, WireRelay


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll a condition that no event signals (a socket buffer, a task count) until it holds, within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)


def live(kind: type) -> int:
    """How many objects of `kind` are alive (after a full collection)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def live_objects() -> tuple[int, int, int]:
    """(relays, core sessions, upstream sockets) alive, either engine's: all zero once every connection has ended."""
    # Only the proxy dials with aiohttp (or with proxy.wire.dial).
    upstreams = live(aiohttp.ClientWebSocketResponse) + live(Upstream)
    return live(Relay) + live(WireRelay), live(Session), upstreams


def record(request: pytest.FixtureRequest, **figures: object) -> None:
    """Attach figures to the test's report (junit properties), like record_property but without its xunit2 warning."""
    request.node.user_properties.extend(figures.items())


def relays() -> list[Relay | WireRelay]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, Relay | WireRelay)]


# Where back-pressure stands in a relay, either engine's. The aiohttp engine's figures are private state of
# aiohttp's, read (never written).


def client_reading_paused(relay: Relay | WireRelay) -> bool:
    """The proxy stopped reading the client's socket: TCP pushes back on the client."""
    if isinstance(relay, WireRelay):
        return relay.client_reading_paused
    return bool(relay.client._reader._protocol._reading_paused)  # type: ignore[attr-defined]


def client_bytes_held(relay: Relay | WireRelay) -> int:
    """Bytes the proxy holds from this client: frames the core holds back plus those read and not yet fed to it."""
    unread = relay.client_buffered if isinstance(relay, WireRelay) else relay.client._reader._size  # type: ignore[attr-defined]
    return int(relay.session._held_bytes) + int(unread)


def upstream_reading_paused(relay: Relay | WireRelay) -> bool:
    if isinstance(relay, WireRelay):
        return relay.upstream_reading_paused
    return bool(relay.upstream._writer.protocol._reading_paused)  # type: ignore[attr-defined]


def upstream_bytes_held(relay: Relay | WireRelay) -> int:
    """Bytes the proxy holds for this connection: read from the upstream and not yet passed on, plus the client
    socket's write buffer."""
    if isinstance(relay, WireRelay):
        assert relay.client.transport is not None
        return relay.upstream_buffered + relay.client.transport.get_write_buffer_size()
    read = relay.upstream._reader._size  # type: ignore[attr-defined]
    return int(read) + int(relay.client._writer.transport.get_write_buffer_size())  # type: ignore[attr-defined]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        match = re.search(r"^VmRSS:\s+(\d+) kB$", f.read(), re.M)
    assert match is not None
    return int(match.group(1))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_names(tasks: set[asyncio.Task[Any]]) -> list[str]:
    return sorted(f"{t.get_name()}:{getattr(t.get_coro(), '__qualname__', '?')}" for t in tasks)


@dataclass(frozen=True)
class Footprint:
    """What one process holds: the figures a leak would move."""

    tasks: int
    fds: int
    rss_kib: int
    relays: int
    sessions: int
    upstream_sockets: int
    objects: int

    @classmethod
    def now(cls) -> Footprint:
        relays, sessions, upstream_sockets = live_objects()
        return cls(
            tasks=len(asyncio.all_tasks()),
            fds=fd_count(),
            rss_kib=rss_kib(),
            relays=relays,
            sessions=sessions,
            upstream_sockets=upstream_sockets,
            objects=len(gc.get_objects()),
        )


async def settled(proxy: ProxyServer) -> None:
    """Wait until the proxy tracks no connection and no task but the caller's is left (every connection closed)."""
    state = proxy.state
    await wait_for(lambda: not state.sockets and state.metrics.open_connections == 0, "the proxy to drop its sockets")
    me = asyncio.current_task()
    try:
        await wait_for(lambda: asyncio.all_tasks() == {me}, "every other task to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: left {task_names(asyncio.all_tasks() - {me})}") from None
