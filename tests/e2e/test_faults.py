"""Faults over real sockets (client → proxy → simulator on loopback): what breaks, what the client is told, and
that nothing is left behind.

Covered elsewhere and reused, not repeated here: a stalled upstream (no acks) ends a reset in
``session_reset_timeout`` and releases the held events (test_reset.py); ``session_expired`` then close 1001
outside a reset (test_relay.py); a client frame over the size limit closes with 1009 (test_relay.py).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import WSMsgType
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from proxy.config import config_from_dict
from proxy.server import ProxyServer
from proxy.simulator import SimSession, SimulatorConfig
from tests.e2e.conftest import Client, StackFactory, item_event
from tests.e2e.probes import (
    Footprint,
    live_objects,
    record,
    relays,
    settled,
    upstream_bytes_held,
    upstream_reading_paused,
    wait_for,
)


async def add_items(client: Client, n: int) -> list[str]:
    """Create `n` items; returns once each one's last event (GA: `conversation.item.done`) has arrived."""
    ids = []
    for i in range(n):
        await client.send(item_event(f"text {i}"))
        ids.append((await client.until("conversation.item.done"))["item"]["id"])
    return ids


def deletes_seen(n: int) -> Any:
    return lambda s: sum(e["type"] == "conversation.item.delete" for e in s.received) >= n


async def closed_with(client: Client) -> tuple[int, str]:
    """Read until the proxy closes the client; the close frame's code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await client.recv()
    rcvd = info.value.rcvd
    assert rcvd is not None, f"the client got no close frame: {info.value!r}"
    return rcvd.code, rcvd.reason


def vanish(upstream: SimSession) -> None:
    """The upstream's TCP connection ends without a close frame (a crash, a dropped link)."""
    sock = upstream._ws.get_extra_info("socket")
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)


# --- the upstream fails mid-reset ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "expected"),
    [("close", (1011, "upstream failed mid-reset")), ("vanish", (1014, "upstream connection lost"))],
)
async def test_upstream_closing_mid_reset_closes_the_client_with_a_code_that_says_why(
    make_stack: StackFactory, how: str, expected: tuple[int, str]
) -> None:
    """An upstream that closes (1011 passes on) or vanishes (1014) during a reset closes the client; no task stays."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 30})
    client, upstream = await stack.client()
    await add_items(client, 2)
    await client.send({"type": "session.reset", "event_id": "r"})
    await client.send(item_event("held behind the reset"))
    await upstream.wait_until(deletes_seen(2))  # the reset runs, its deletes unanswered
    if how == "close":
        await upstream.close(1011, "upstream failed mid-reset")
    else:
        vanish(upstream)
    assert await closed_with(client) == expected
    assert "session.reset.completed" not in client.types()
    await settled(stack.proxy)
    assert live_objects() == (0, 0, 0)


async def test_session_expired_mid_reset_reaches_the_client_then_closes(make_stack: StackFactory) -> None:
    """The upstream's session_expired error during a stalled reset is forwarded, then its 1001 close; nothing stays."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True, session_max_s=0.5), reset={"timeout_seconds": 30})
    client, upstream = await stack.client()
    await add_items(client, 1)
    await client.send({"type": "session.reset", "event_id": "r"})
    await upstream.wait_until(deletes_seen(1))
    error = await client.until("error")
    assert error["error"]["code"] == "session_expired"
    assert await closed_with(client) == (1001, "Your session hit the maximum duration of 60 minutes.")
    await settled(stack.proxy)
    assert live_objects() == (0, 0, 0)


# --- the upstream sends garbage --------------------------------------------------------------------------

GARBAGE: list[str | bytes] = [
    "{nope",
    "[]",
    "null",
    '"a string"',
    '{"type": 12}',
    '{"type": null}',
    '{"type":"conversation.item.deleted"}',
    '{"type":"conversation.item.deleted","item_id":7}',
    '{"type":"error"}',
    '{"type":"error","error":"boom"}',
    '{"type":"error","error":{"event_id":["rrp_1"],"code":{}}}',
    '{"type":"response.done","response":[]}',
    '{"type":"response.created","response":{"id":{}}}',
    '{"type":"conversation.item.added","item":"x"}',
    '{"type":"conversation.item.created","item":{"id":5}}',
    '{"type":"input_audio_buffer.committed","item_id":null}',
    '{"type":"session.created","session":7}',
    '{"type":"response.output_item.added","item":[]}',
    '{"type":"input_audio_buffer.cleared","x":' + "[" * 5_000 + "]" * 5_000 + "}",  # too deep to parse
    "[" * 100_000 + "]" * 100_000,
    "\u00e9\u2603\U0001f600 not JSON",
    b"\x00\xff\xfe binary",
]
MARKER = '{"type":"test.marker"}'


async def send_garbage(upstream: SimSession) -> None:
    for frame in [*GARBAGE, MARKER]:
        await upstream.send_raw(frame)


async def garbage_received(client: Client) -> list[str | bytes]:
    frames: list[str | bytes] = []
    while (frame := await client.ws.recv()) != MARKER:
        frames.append(frame)
    return frames


async def test_garbage_from_the_upstream_mid_session_and_mid_reset_is_forwarded_and_harmless(
    make_stack: StackFactory,
) -> None:
    """Unparsable, mistyped and too-deep upstream frames reach the client as sent and change nothing, in a reset too."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 30})
    client, upstream = await stack.client()
    ids = await add_items(client, 2)

    await send_garbage(upstream)
    assert await garbage_received(client) == GARBAGE

    await client.send({"type": "session.reset", "event_id": "r"})
    await upstream.wait_until(deletes_seen(2))
    await send_garbage(upstream)
    assert await garbage_received(client) == GARBAGE
    # The simulator swallowed the reset's commands (stall_acks); answer them now, as a late upstream would.
    await upstream.send_event({"type": "input_audio_buffer.cleared"})
    for item_id in ids:
        await upstream.send_event({"type": "conversation.item.deleted", "item_id": item_id})
    done = await client.until("session.reset.completed")
    assert done["deleted_item_ids"] == ids and done["failed_item_ids"] == []
    await client.send(item_event("after", item_id="after"))
    await client.until(lambda e: e.get("item", {}).get("id") == "after")


async def test_invalid_utf8_text_from_the_upstream_closes_1007_upstream_and_1014_to_the_client(
    make_stack: StackFactory,
) -> None:
    """A TEXT frame that is not UTF-8 is not passed on: the upstream is closed with 1007, the client with 1014."""
    stack = await make_stack()
    client, upstream = await stack.client()
    await upstream._ws.send_frame(b'{"type":"response.output_text.delta","delta":"\xff\xfe"}', WSMsgType.TEXT)
    assert await closed_with(client) == (1014, "upstream sent invalid UTF-8 in a text frame")
    await upstream.wait_until(lambda s: s.closed)
    assert upstream.close_code == 1007
    await settled(stack.proxy)


# --- the client fails -----------------------------------------------------------------------------------


async def test_clients_vanishing_mid_reset_leave_no_task_socket_or_session(
    make_stack: StackFactory, request: pytest.FixtureRequest
) -> None:
    """20 clients that drop their TCP connection mid-reset (no close frame) leave no task, relay or session behind."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 30})
    warm, _ = await stack.client()  # the first dial makes the proxy's client session: not a leak
    await warm.ws.close()
    await settled(stack.proxy)
    before = Footprint.now()
    for _ in range(20):
        client, upstream = await stack.client()
        await add_items(client, 1)
        await client.send({"type": "session.reset", "event_id": "r"})
        await client.send(item_event("held behind the reset"))
        await upstream.wait_until(deletes_seen(1))
        assert stack.proxy.state.metrics.open_connections == 1
        client.ws.transport.abort()  # RST, no close frame
        await upstream.wait_until(lambda s: s.closed)
        assert upstream.close_code == 1001  # the proxy told the upstream its client went away
    await settled(stack.proxy)
    after = Footprint.now()
    record(request, **{f"{k}_before": v for k, v in vars(before).items()})
    record(request, **{f"{k}_after": v for k, v in vars(after).items()})
    assert (after.relays, after.sessions, after.upstream_sockets) == (0, 0, 0), after
    assert after.tasks == before.tasks and after.fds == before.fds, (before, after)
    assert not stack.proxy.state.sockets


async def test_a_client_that_stops_reading_pauses_the_upstream_and_the_proxy_holds_little(
    make_stack: StackFactory, request: pytest.FixtureRequest
) -> None:
    """50 MiB of deltas to a client that reads nothing: the proxy stops reading the upstream and buffers < 4 MiB."""
    stack = await make_stack()
    n, size = 200, 256 * 1024
    # websockets stops reading the socket once one frame waits unread: the client's TCP window closes.
    client, upstream = await stack.client(max_queue=1, max_size=None)
    (relay,) = relays()
    delta = "A" * size
    for i in range(n):
        await upstream.send_event({"type": "response.output_audio.delta", "event_id": f"d{i}", "delta": delta})

    def upstream_paused() -> bool:
        return upstream_reading_paused(relay) and simulator_writer_paused(upstream)

    await wait_for(upstream_paused, "the proxy to stop reading the upstream and the simulator to stop sending")
    # An observation window, not a synchronisation: while the client still reads nothing, nothing may grow.
    held = []
    for _ in range(40):
        held.append(upstream_bytes_held(relay))
        await asyncio.sleep(0.005)
    assert upstream_paused()
    sent, relayed = len(upstream.sent), relay.stats.frames_down
    record(request, proxy_buffered_max_bytes=max(held))
    record(request, simulator_frames_sent_while_paused=sent)
    record(request, proxy_frames_relayed_while_paused=relayed)
    assert max(held) < 4 * 1024 * 1024, f"the proxy buffered {max(held)} bytes for a client that reads nothing"
    assert sent < n // 2 and relayed < n // 2, f"the upstream kept sending: {sent} of {n} frames sent"

    ids = [(await client.recv())["event_id"] for _ in range(n)]  # the client reads again: all of it, in order
    assert ids == [f"d{i}" for i in range(n)]
    assert upstream_bytes_held(relay) == 0


# Private state of the simulator's websockets, read (never written) to show where back-pressure stands.


def simulator_writer_paused(upstream: SimSession) -> bool:
    writer: Any = upstream._ws._writer
    return bool(writer.protocol._paused)


# --- churn ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def simulator_process() -> AsyncIterator[str]:
    """The simulator in its own process, so this process's figures are the proxy's (and the clients')."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "simulate", "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            line = (await process.stdout.readline()).decode()
        assert "listening on" in line, line
        yield line.split()[-1]
    finally:
        process.terminate()
        await process.wait()


async def test_1000_connect_disconnect_cycles_leave_rss_tasks_and_fds_flat(request: pytest.FixtureRequest) -> None:
    """1,000 sessions opened and closed through the proxy leave RSS, tasks, fds and live objects where they were."""
    async with simulator_process() as sim_url:
        config = config_from_dict({"listen": {"port": 0}, "upstream": {"url": sim_url}})
        async with ProxyServer(config) as proxy:
            url = f"ws://127.0.0.1:{proxy.port}/v1/realtime?model=gpt-realtime"

            async def cycles(n: int) -> None:
                for _ in range(n):
                    async with connect(url, compression=None) as ws:
                        await ws.recv()  # session.created: the upstream session was opened

            await cycles(100)  # warm-up: allocator pools, caches, the proxy's client session
            await settled(proxy)
            before = Footprint.now()
            await cycles(1_000)
            await settled(proxy)
            after = Footprint.now()
            assert proxy.state.metrics.connections_total == 1_100
    record(request, **{f"{k}_before": v for k, v in vars(before).items()})
    record(request, **{f"{k}_after": v for k, v in vars(after).items()})
    assert (after.relays, after.sessions, after.upstream_sockets) == (0, 0, 0), after
    assert after.tasks == before.tasks, (before, after)
    assert after.fds == before.fds, (before, after)
    assert after.objects - before.objects < 2_000, f"{after.objects - before.objects} more live objects"
    assert after.rss_kib - before.rss_kib < 4 * 1024, f"RSS grew by {after.rss_kib - before.rss_kib} KiB"


async def test_more_than_a_hundred_sessions_at_once(make_stack: StackFactory) -> None:
    """150 sessions stay open at once (aiohttp's default connector would have stopped the 101st upstream dial)."""
    stack = await make_stack()
    clients = [await stack.client() for _ in range(150)]
    assert len(stack.sim.sessions) == 150
    client, upstream = clients[-1]
    await client.send(item_event("the 150th works"))
    await client.until("conversation.item.added")
    assert len(upstream.item_ids) == 1
