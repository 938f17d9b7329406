"""Swap and rollover on the protocol engine (proxy/wire.py) where its I/O differs from relay.py's: a spare is a
second socket read by its own frame reader, a switch happens between two frames of one read, and the spare's
dial is a task the relay owns. tests/e2e/test_swap.py checks the behaviour both engines share."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from proxy import wire
from proxy.core.frames import Frame, FrameReader, Opcode
from proxy.core.replay import Dial
from proxy.core.swap import MAX_FAILURES, SpareState
from proxy.server import ServerState
from proxy.simulator import SimulatorConfig
from proxy.wire import WireRelay
from tests.e2e import test_swap
from tests.e2e.conftest import StackFactory, item_event
from tests.e2e.probes import live_objects, settled, wait_for
from tests.e2e.test_swap import spare_ready
from tests.e2e.test_wire import DOWN, UP, RawClient, texts_created

PROTOCOL = {"engine": "protocol"}


def the_relay() -> WireRelay:
    relay = test_swap.the_relay()
    assert isinstance(relay, WireRelay)
    return relay


def frame(event: dict[str, Any]) -> bytes:
    return UP.frame(Opcode.TEXT, orjson.dumps(event))


def gate_spare_dials(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, list[Dial]]:
    """Spare dials (every dial after a client's first) wait for the returned event; the dials are listed."""
    gate = asyncio.Event()
    dials: list[Dial] = []
    original = ServerState.wire_connect

    async def connect(self: ServerState, dial: Dial) -> wire.Upstream:
        dials.append(dial)
        if len(dials) > 1:
            await gate.wait()
        return await original(self, dial)

    monkeypatch.setattr(ServerState, "wire_connect", connect)
    return gate, dials


def redirect_spare_dials(monkeypatch: pytest.MonkeyPatch, url: str) -> list[Dial]:
    """Spare dials (every dial after a client's first) go to `url`, with the client's headers; the dials are listed."""
    original = ServerState.wire_connect
    dials: list[Dial] = []

    async def connect(self: ServerState, dial: Dial) -> wire.Upstream:
        dials.append(dial)
        if len(dials) > 1:
            dial = Dial(url, dial.headers, dial.subprotocols)
        return await original(self, dial)

    monkeypatch.setattr(ServerState, "wire_connect", connect)
    return dials


@pytest.mark.parametrize("how", ["closes", "drops"])
async def test_a_spare_that_goes_away_is_replaced_and_the_swap_uses_the_replacement(
    make_stack: StackFactory, how: str
) -> None:
    """The ready spare closes its connection (1011), or its TCP connection drops without a close frame: the client
    hears nothing of it, a third session is dialed and configured, and the reset swaps to that one."""
    stack = await make_stack(reset={"strategy": "swap"}, relay=PROTOCOL)
    client, old = await stack.client()
    lost = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    if how == "closes":
        await lost.close(1011, "going")
    else:
        lost._ws._req.transport.abort()  # RST, no close frame
    await lost.wait_until(lambda s: s.closed)
    replacement = await stack.sim.wait_for_sessions(3)
    await spare_ready()
    await client.send(item_event("old"))
    await client.until("conversation.item.added")
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "swap" and done["upstream_session_id"] == replacement.id
    assert "error" not in client.types() and client.types().count("session.created") == 1
    assert old.close_code == 1000 and not client.ws.close_code


async def test_a_switch_in_the_middle_of_a_read_sends_the_rest_of_it_to_the_new_upstream(
    make_stack: StackFactory,
) -> None:
    """A reset and three creates in one write (one read): the reset switches at once (nothing to quiet), and the
    creates after it in that same read reach the new upstream only, in order; the old one got none of them."""
    stack = await make_stack(reset={"strategy": "swap"}, relay=PROTOCOL)
    raw = await RawClient.connect(stack)
    await raw.event("session.created")
    old = await stack.sim.wait_for_sessions(1)
    spare = await stack.sim.wait_for_sessions(2)
    await spare_ready()
    creates = [item_event(f"new {i}", f"new_{i}") for i in range(3)]
    raw.writer.write(b"".join(frame(e) for e in [{"type": "session.reset", "event_id": "r1"}, *creates]))
    done = await raw.event("session.reset.completed")
    assert done["strategy"] == "swap" and done["upstream_session_id"] == spare.id
    added = [(await raw.event("conversation.item.added"))["item"]["id"] for _ in range(3)]
    assert added == ["new_0", "new_1", "new_2"] == spare.item_ids
    assert texts_created(spare) == ["new 0", "new 1", "new 2"] and texts_created(old) == []
    await old.wait_until(lambda s: s.closed)
    assert old.close_code == 1000
    await raw.close()


async def test_client_frames_read_during_a_rollover_reach_the_fresh_upstream_in_order(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream ends at its cap (1001) while the spare's dial is held up: three creates the client sends then
    are read and held by the proxy; once the fresh session is configured they reach it, in order, and the client
    never hears of the move."""
    gate, dials = gate_spare_dials(monkeypatch)
    stack = await make_stack(sim=SimulatorConfig(session_max_s=0.3, session_expired_error=False), relay=PROTOCOL)
    raw = await RawClient.connect(stack)
    await raw.event("session.created")
    first = await stack.sim.wait_for_sessions(1)
    await first.wait_until(lambda s: s.closed)
    await wait_for(lambda: len(dials) == 2, "the spare's dial")
    creates = b"".join(frame(item_event(f"held {i}", f"held_{i}")) for i in range(3))
    raw.writer.write(creates)
    relay = the_relay()
    await wait_for(lambda: relay.client_buffered == len(creates), "the proxy to read and hold the creates")
    gate.set()
    second = await stack.sim.wait_for_sessions(2)
    added = [(await raw.event("conversation.item.added"))["item"]["id"] for _ in range(3)]
    assert added == ["held_0", "held_1", "held_2"] == second.item_ids
    assert relay.stats.upstream_switches == 1 and dials[1] == dials[0]
    await raw.close()


async def test_a_spare_dial_in_flight_when_the_client_leaves_is_ended_with_the_relay(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under "swap" the spare's dial is held up; the client closes: the dial is cancelled, and no task, relay,
    session or upstream socket is left; the proxy's upstream saw one session only."""
    gate, dials = gate_spare_dials(monkeypatch)
    stack = await make_stack(reset={"strategy": "swap"}, relay=PROTOCOL)
    client, upstream = await stack.client()
    await wait_for(lambda: len(dials) == 2, "the spare's dial")
    await client.ws.close()
    await settled(stack.proxy)
    assert live_objects() == (0, 0, 0) and len(stack.sim.sessions) == 1 and upstream.closed
    assert not gate.is_set()


async def test_spares_that_cannot_be_reached_leave_resets_to_deletes(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, json_logs: Callable[[], list[dict[str, Any]]]
) -> None:
    """Spare dials meet a closed port (connection refused): three tries, each logged, then none; nothing of it
    reaches the client, whose resets delete on its own upstream."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    dials = redirect_spare_dials(monkeypatch, f"ws://127.0.0.1:{closed_port}/v1/realtime")
    stack = await make_stack(reset={"strategy": "swap"}, relay=PROTOCOL)
    client, upstream = await stack.client()
    swapper = the_relay().swapper
    assert swapper is not None
    await wait_for(lambda: swapper.spare_state is SpareState.ABSENT and not swapper.actions, "the dials to give up")
    await client.send(item_event("x"))
    await client.until("conversation.item.added")
    await client.send({"type": "session.reset"})
    done = await client.until("session.reset.completed")
    assert done["strategy"] == "delete" and upstream.item_ids == [] and not upstream.closed
    assert "error" not in client.types() and client.types().count("session.created") == 1
    failed = [line for line in json_logs() if line["event"] == "spare_failed"]
    assert len(dials) == 1 + MAX_FAILURES and len(failed) == MAX_FAILURES
    assert all(line["reason"].startswith("upstream unreachable") for line in failed)


class ScriptedUpstream:
    """An upstream on a bare socket: the 101 by hand, then frames the test writes in one write each (so they
    reach the proxy in one read), and the frames the proxy sent, parsed. One per connection the proxy opens."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader(masked=True, max_message_bytes=None)
        self.pending: list[Frame] = []

    def send(self, *frames: bytes | dict[str, Any]) -> None:
        """Events (dicts) as text frames, or frames as they are, all in one write."""
        encoded = (f if isinstance(f, bytes) else DOWN.frame(Opcode.TEXT, orjson.dumps(f)) for f in frames)
        self.writer.write(b"".join(encoded))

    async def next_frame(self) -> Frame:
        while not self.pending:
            self.pending.extend(self.frames.receive_data(await self.reader.read(65536)))
        return self.pending.pop(0)

    async def event(self) -> dict[str, Any]:
        """The next text frame's event (control frames before it are passed over)."""
        while True:
            frame = await self.next_frame()
            if frame.opcode is Opcode.TEXT:
                return dict(orjson.loads(bytes(frame.payload())))


@contextlib.asynccontextmanager
async def scripted_upstreams() -> AsyncIterator[tuple[str, asyncio.Queue[ScriptedUpstream]]]:
    """A listener whose connections, once upgraded, are queued for the test to script; its URL and the queue."""
    accepted: asyncio.Queue[ScriptedUpstream] = asyncio.Queue()
    every: list[ScriptedUpstream] = []

    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        fields = (line.split(":", 1) for line in head.split("\r\n")[1:] if line)
        key = next(value.strip() for name, value in fields if name.lower() == "sec-websocket-key")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        every.append(ScriptedUpstream(reader, writer))
        await accepted.put(every[-1])

    server = await asyncio.start_server(upgrade, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime", accepted
    finally:
        server.close()
        for upstream in every:
            upstream.writer.close()
        await asyncio.gather(*(u.writer.wait_closed() for u in every), return_exceptions=True)
        await server.wait_closed()


async def test_what_the_old_upstream_sent_after_the_frame_that_switched_reaches_nobody(
    make_stack: StackFactory,
) -> None:
    """A swap reset cancels a running response; the old upstream answers with its response.done and, in the same
    write (one read), one more event: the switch comes between the two, so the client gets the done, then
    completed, then what the new upstream sends, and never the old upstream's last event."""
    async with scripted_upstreams() as (url, accepted):
        stack = await make_stack(upstream={"url": url}, reset={"strategy": "swap"}, relay=PROTOCOL)
        raw = await RawClient.connect(stack)
        old = await accepted.get()
        old.send({"type": "session.created", "session": {"id": "sess_old"}})
        await raw.event("session.created")
        spare = await accepted.get()
        spare.send({"type": "session.created", "session": {"id": "sess_new"}})
        await spare_ready()
        raw.writer.write(frame({"type": "response.create"}))
        assert (await old.event())["type"] == "response.create"
        old.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}})
        await raw.event("response.created")
        raw.writer.write(frame({"type": "session.reset", "event_id": "r1"}))
        cancel = await old.event()
        assert cancel["type"] == "response.cancel"
        done = {"type": "response.done", "response": {"id": "resp_1", "status": "cancelled", "output": []}}
        old.send(done, {"type": "rate_limits.updated", "event_id": "old_last", "rate_limits": []})
        assert (await raw.event("response.done"))["response"]["status"] == "cancelled"
        completed = await raw.event("session.reset.completed")
        assert completed["strategy"] == "swap" and completed["upstream_session_id"] == "sess_new"
        spare.send({"type": "rate_limits.updated", "event_id": "new_first", "rate_limits": []})
        assert (await raw.event("rate_limits.updated"))["event_id"] == "new_first"
        closing = await old.next_frame()
        assert closing.opcode is Opcode.CLOSE and closing.close is not None
        assert (closing.close.code, closing.close.reason) == (1000, "session moved")
        await raw.close()


async def test_a_spare_that_becomes_the_upstream_in_the_middle_of_a_read_hands_the_rest_to_the_client(
    make_stack: StackFactory,
) -> None:
    """A rollover waits for the spare; the spare's first write is a ping, its session.created in two fragments,
    and an event: the ping is answered, the (reassembled) session.created makes it ready and switches the client
    to it there, and the event after it, in that same read, reaches the client as the new upstream's."""
    async with scripted_upstreams() as (url, accepted):
        stack = await make_stack(upstream={"url": url}, relay=PROTOCOL)
        raw = await RawClient.connect(stack)
        old = await accepted.get()
        old.send({"type": "session.created", "session": {"id": "sess_old"}})
        await raw.event("session.created")
        old.send(DOWN.close(1001, "session cap"))  # idle and empty: a rollover, the client held until the switch
        answer = await old.next_frame()
        assert answer.opcode is Opcode.CLOSE and answer.close is not None and answer.close.code == 1001
        spare = await accepted.get()
        created = orjson.dumps({"type": "session.created", "session": {"id": "sess_new"}})
        spare.send(
            DOWN.frame(Opcode.PING, b"hi"),
            DOWN.frame(Opcode.TEXT, created[:9], fin=False),
            DOWN.frame(Opcode.CONT, created[9:]),
            {"type": "rate_limits.updated", "event_id": "new_first", "rate_limits": []},
        )
        pong = await spare.next_frame()
        assert (pong.opcode, bytes(pong.payload())) == (Opcode.PONG, b"hi")
        assert (await raw.event("rate_limits.updated"))["event_id"] == "new_first"
        relay = the_relay()
        assert relay.stats.upstream_switches == 1 and relay.session.upstream_session_id == "sess_new"
        raw.writer.write(frame(item_event("after", "after")))
        assert (await spare.event())["item"]["id"] == "after"  # the client's events go to the new upstream
        await raw.close()


async def test_a_spare_that_stops_answering_pings_is_replaced(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, json_logs: Callable[[], list[dict[str, Any]]]
) -> None:
    """The heartbeat pings the spare too: one that says nothing for two periods is closed (1000) and another is
    dialed, while the client's own upstream (which answers) carries on."""
    monkeypatch.setattr(wire, "HEARTBEAT_SECONDS", 0.05)
    async with scripted_upstreams() as (url, accepted):
        redirect_spare_dials(monkeypatch, url)
        stack = await make_stack(reset={"strategy": "swap"}, relay=PROTOCOL)
        client, upstream = await stack.client()
        silent = await accepted.get()
        silent.send({"type": "session.created", "session": {"id": "sess_silent"}})
        ping = await silent.next_frame()
        assert ping.opcode is Opcode.PING
        closing = await silent.next_frame()
        assert closing.opcode is Opcode.CLOSE and closing.close is not None and closing.close.code == 1000
        await accepted.get()  # the replacement's dial
        reasons = {line["reason"] for line in json_logs() if line["event"] == "spare_failed"}
        assert reasons == {"the spare stopped answering pings"}  # (the replacement, silent too, may follow it)
        await client.send(item_event("still here", "here"))
        await client.until("conversation.item.added")
        assert upstream.item_ids == ["here"] and not client.ws.close_code
