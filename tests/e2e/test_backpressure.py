"""Back-pressure during a reset and loud faults, over real sockets (client → proxy → simulator on loopback)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from proxy.core.session import Session
from proxy.simulator import SimulatorConfig
from tests.e2e.conftest import StackFactory, item_event
from tests.e2e.probes import client_bytes_held, client_reading_paused, record, relays, rss_kib, wait_for
from tests.e2e.test_faults import closed_with, deletes_seen


async def test_a_client_pushing_160_mb_behind_a_stalled_reset_is_pushed_back_not_buffered(
    make_stack: StackFactory, request: pytest.FixtureRequest
) -> None:
    """While a reset waits on a silent upstream, the proxy stops reading the client: a client pushing 160 MB of
    appends is blocked by TCP, the proxy holds one frame plus aiohttp's small queue, and once the reset ends every
    append reaches the upstream, in order, with no hole and no error."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 60})
    client, upstream = await stack.client(write_limit=2**16)
    await client.send(item_event("hello"))
    item_id = (await client.until("conversation.item.done"))["item"]["id"]
    (relay,) = relays()
    await client.send({"type": "session.reset", "event_id": "r"})
    await upstream.wait_until(deletes_seen(1))

    n, size = 1000, 160 * 1000
    audio = base64.b64encode(b"\x01" * (size * 3 // 4)).decode()
    sent = 0
    before = rss_kib()

    async def push() -> None:
        nonlocal sent
        for i in range(n):
            await client.send({"type": "input_audio_buffer.append", "event_id": f"a{i}", "audio": audio})
            sent += 1

    pusher = asyncio.create_task(push())
    await wait_for(lambda: client_reading_paused(relay), "the proxy to stop reading the client")
    # An observation window, not a synchronisation: while the reset is stalled, nothing may grow.
    held = []
    for _ in range(40):
        held.append(client_bytes_held(relay))
        await asyncio.sleep(0.005)
    grown = rss_kib() - before
    assert client_reading_paused(relay) and relay.session.paused
    assert relay.session.held_count <= 1, "the core buffered more than the frame it had read"
    assert max(held) < 2 * 1024 * 1024, f"the proxy held {max(held)} bytes for a client it should push back"
    assert sent < n // 4, f"the client pushed {sent} of {n} frames through a stalled reset"
    record(request, proxy_held_max_bytes=max(held), client_frames_sent_while_paused=sent, rss_growth_kib=grown)
    print(f"\nflood: held {max(held)} bytes, {sent} of {n} frames sent while paused, RSS +{grown} KiB")

    # The upstream answers at last: the reset completes, reading resumes, and all of it flows.
    await upstream.send_event({"type": "input_audio_buffer.cleared"})
    await upstream.send_event({"type": "conversation.item.deleted", "item_id": item_id})
    done = await client.until("session.reset.completed")
    assert done["deleted_item_ids"] == [item_id]
    await pusher
    await client.send({"type": "input_audio_buffer.commit", "event_id": "k"})
    await upstream.wait_until(lambda s: any(e.get("event_id") == "k" for e in s.received))
    appends = [e["event_id"] for e in upstream.received if e["type"] == "input_audio_buffer.append"]
    assert appends == [f"a{i}" for i in range(n)]
    assert not [e for e in client.events if e["type"] == "error"]


async def test_an_exception_in_a_pump_is_logged_and_closes_both_sides_with_1011(
    make_stack: StackFactory, json_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the core (here: an exception on one upstream event) is never swallowed: a `relay_fault` line with
    its traceback, close 1011 to the client and to the upstream."""
    stack = await make_stack()
    client, upstream = await stack.client()
    original, original_passes = Session.upstream_frame, Session.upstream_passes

    def broken(self: Session, data: bytes | str) -> None:
        if b"boom" in (data if isinstance(data, bytes) else data.encode()):
            raise RuntimeError("core bug for the test")
        original(self, data)

    def broken_passes(self: Session, data: bytes, text: bool) -> bool:
        if b"boom" in data:  # the Protocol relay asks this first (its fast path): a bug there is as loud
            raise RuntimeError("core bug for the test")
        return original_passes(self, data, text)

    monkeypatch.setattr(Session, "upstream_frame", broken)
    monkeypatch.setattr(Session, "upstream_passes", broken_passes)
    await upstream.send_event({"type": "response.output_text.delta", "delta": "boom"})
    assert await closed_with(client) == (1011, "proxy internal error")
    await upstream.wait_until(lambda s: s.close_code is not None)
    assert upstream.close_code == 1011
    (fault,) = [line for line in json_logs() if line.get("event") == "relay_fault"]
    (exc,) = fault["exception"]
    assert (exc["exc_type"], exc["exc_value"]) == ("RuntimeError", "core bug for the test") and exc["frames"]


async def test_an_exception_in_the_reset_timer_is_logged_and_closes_both_sides_with_1011(
    make_stack: StackFactory, json_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reset timer's faults are loud too: without this, resets would silently never time out."""
    stack = await make_stack(sim=SimulatorConfig(stall_acks=True), reset={"timeout_seconds": 0.2})
    client, _ = await stack.client()
    await client.send(item_event("hello"))
    await client.until("conversation.item.done")

    def broken(self: Session) -> None:
        raise RuntimeError("timer bug for the test")

    monkeypatch.setattr(Session, "handle_timeout", broken)
    await client.send({"type": "session.reset"})
    assert await closed_with(client) == (1011, "proxy internal error")
    (fault,) = [line for line in json_logs() if line.get("event") == "relay_fault"]
    (exc,) = fault["exception"]
    assert (exc["exc_type"], exc["exc_value"]) == ("RuntimeError", "timer bug for the test") and exc["frames"]
