"""The Protocol relay's edges a review of issue 12 found (each test failed before its fix): a swap reset whose
spares all fail, a client that never reads, a close frame behind the frame that made the proxy close."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from typing import Any

import pytest

from proxy.core.frames import Opcode
from proxy.wire import CLIENT_BUFFER_CAP, WireRelay
from tests.e2e.conftest import StackFactory, item_event
from tests.e2e.probes import wait_for
from tests.e2e.test_swap import the_relay
from tests.e2e.test_wire import UP, RawClient


@pytest.mark.parametrize("engine", ["aiohttp", "protocol"])
async def test_a_swap_reset_past_the_cap_whose_spares_all_fail_deletes_at_once(
    make_stack: StackFactory, engine: str
) -> None:
    """Past the cap a full reset waits for the spare it dials; every dial is refused (429). After MAX_FAILURES
    the controller gives up and the session turns the reset into deletes (`swap_failed`): those deletes must go
    to the upstream now and the reset complete by deletes, well before its 10 s timeout. relay.py drains the
    session after `spare_failed`; wire.py's `_spare_failed` -> `_swap_step` never takes the session's output,
    so the deletes sit in the session until the reset times out."""
    stack = await make_stack(
        upstream={"max_session_seconds": 0.3, "warn_before_seconds": 0.0}, relay={"engine": engine}
    )
    client, upstream = await stack.client()
    await client.send(item_event("x", "x"))
    await client.until("conversation.item.added")
    await client.until("session.expiring")
    stack.sim.config.refuse_status = 429  # every spare dial from now on
    await client.send({"type": "session.reset", "event_id": "r"})
    done = await asyncio.wait_for(client.until("session.reset.completed"), 3.0)
    assert done["strategy"] == "delete" and done["deleted_item_ids"] == ["x"]
    assert upstream.item_ids == []
    assert the_relay().session.reset is None


async def _drop(client: Any) -> None:
    """End a raw client's connection at once (RST) and mark its writer closed."""
    client.writer.transport.abort()
    client.writer.close()
    with contextlib.suppress(OSError):
        await client.writer.wait_closed()


async def _raw_client_with_a_small_window(stack: Any) -> Any:
    """A RawClient whose socket has a tiny receive buffer (set before connect), so it pushes back at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{stack.proxy.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    return RawClient(reader, writer)


async def test_pongs_to_a_client_that_does_not_read_are_not_buffered_without_bound(make_stack: StackFactory) -> None:
    """A client sends pings and never reads. Each ping is answered on its own socket; past CLIENT_BUFFER_CAP
    waiting for it, the proxy stops reading it (TCP pushes back on its pings), as it does for audio."""
    stack = await make_stack(relay={"engine": "protocol"})
    client = await _raw_client_with_a_small_window(stack)
    relay = the_relay()
    assert isinstance(relay, WireRelay)
    ping = UP.frame(Opcode.PING, b"p" * 125)
    chunk = ping * 1000

    async def flood() -> None:
        for _ in range(64):  # ~8.4 MB of pings
            client.writer.write(chunk)
            await client.writer.drain()

    task = asyncio.create_task(flood())
    try:
        transport = relay.client.transport
        assert transport is not None
        await wait_for(lambda: relay.client_reading_paused, "the client no longer read", 10)
        # One read of pings past the cap at most (a read is at most 256 KiB: as many bytes of pongs).
        assert CLIENT_BUFFER_CAP < transport.get_write_buffer_size() <= CLIENT_BUFFER_CAP + 512 * 1024
        # (Whether the flood's own writes wait by now depends on how much the kernel's buffers take: not asserted.)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await _drop(client)


async def test_a_client_that_reads_nothing_is_dropped_after_two_heartbeats(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same client, still reading nothing: two heartbeats later the proxy gives up on it (1008 to it, 1001
    to the upstream) and, as it cannot drain, aborts its connection after close_timeout; the relay ends."""
    monkeypatch.setattr("proxy.wire.HEARTBEAT_SECONDS", 0.2)
    stack = await make_stack(relay={"engine": "protocol"})
    client = await _raw_client_with_a_small_window(stack)
    upstream = await stack.sim.wait_for_sessions(1)  # SimSession
    relay = the_relay()
    assert isinstance(relay, WireRelay)
    client.writer.write(UP.frame(Opcode.PING, b"p" * 125) * 40_000)  # ~5 MB of pongs owed
    try:
        await wait_for(lambda: relay.client_reading_paused, "the client no longer read", 10)
        await wait_for(lambda: relay.client.sent_close, "the proxy to give up on it", 5)
        await upstream.wait_until(lambda s: s.close_code is not None)
        assert upstream.close_code == 1001
        await wait_for(lambda: relay.closed, "the relay to end (close_timeout is 5 s)", timeout=8.0)
    finally:
        await _drop(client)


async def test_a_client_close_in_the_same_read_as_invalid_utf8_completes_the_close_handshake(
    make_stack: StackFactory,
) -> None:
    """Invalid UTF-8 then the client's own close frame, in one write (one read): the proxy closes with 1007, and
    the client's close frame right behind is its answer, so the connection ends at once (the handshake is
    complete). `_feed_client` returns when `_closing` turns true and drops the rest of the read, close frame
    included (`_upstream_read` hands it to `_closes_only`), so the proxy waits close_timeout (5 s), then aborts."""
    stack = await make_stack(relay={"engine": "protocol"})
    client = await RawClient.connect(stack)
    await client.event("session.created")
    relay = the_relay()
    assert isinstance(relay, WireRelay)
    client.writer.write(UP.frame(Opcode.TEXT, b'{"type":"x","a":"\xff"}') + UP.close(1000))
    closing = await client.next_frame(lambda f: f.opcode is Opcode.CLOSE)
    assert closing.close is not None and closing.close.code == 1007
    try:
        await wait_for(lambda: relay.client.lost, "the client's connection to end (close_timeout is 5 s)", 2.0)
    finally:
        await _drop(client)
